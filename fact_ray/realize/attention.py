"""Causal multi-head attention from CUTLASS example 41 (templates/attention_sm80.cu.in): render, build, load, call.

The farm and `fact-ray tune` reach it through realize/attention_family.py (the attention family). The TU
includes example 41's `kernel_forward.h` (shipped inside the nvidia-cutlass package) which includes
`<curand_kernel.h>` unconditionally, even with dropout compiled out; a toolkit without cuRAND headers needs the ones of the `nvidia-curand` wheel (`nvidia/cu13/include`)
or `nvidia-curand-cu12` (`nvidia/curand/include`). `curand_include_dir` finds them; the build fails with
NotAvailable, one line, when they are nowhere.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

from fact_ray.errors import CannotImplement, LaunchError, NotAvailable, UnsupportedDtype
from fact_ray.realize.abi import load_checked
from fact_ray.realize.targets import AMPERE_AND_HOPPER
from fact_ray.realize.emit import render, template_text
from fact_ray.types import Arch, AttentionConfig, Library, Precision, Source

TEMPLATE = "attention_sm80"  # AttentionConfig.template of example-41 kernels; built for sm_80 and sm_90a
ATTN_ABI_VERSION = 1
MAX_HEAD_DIM = 128
# (queries, keys, max head dim) per block, as example 41 chooses them: 64x64 for head dims up to 64 (most GPT-2
# style models), 32x128 up to 128 (MiniGPT's 96). The first is the default.
BLOCKS = ((32, 128, MAX_HEAD_DIM), (64, 64, 64))
EINVAL, ENOTSUP = -1, -2
# How float32 operands multiply -> the AttentionConfig math_op it is recorded as.
F32_MATH = {"3xtf32": "multiply_add_fast_f32", "tf32": "multiply_add"}
EXAMPLE_DIR = ("examples", "41_fused_multi_head_attention")

# torch dtype name -> (FR_ATTN_* code, cutlass element, precision)
_DTYPES = {
    "float32": (0, "float", Precision.FP32),
    "bfloat16": (1, "bfloat16_t", Precision.BF16),
    "float16": (2, "half_t", Precision.FP16),
}


class FrAttnArgs(ctypes.Structure):
    """Mirror of `fr_attn_args` in attention_sm80.cu.in; field order and types must match it exactly."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("o", ctypes.c_void_p),
        ("q_stride_b", ctypes.c_int64), ("q_stride_h", ctypes.c_int64), ("q_stride_s", ctypes.c_int64),
        ("k_stride_b", ctypes.c_int64), ("k_stride_h", ctypes.c_int64), ("k_stride_s", ctypes.c_int64),
        ("v_stride_b", ctypes.c_int64), ("v_stride_h", ctypes.c_int64), ("v_stride_s", ctypes.c_int64),
        ("o_stride_b", ctypes.c_int64), ("o_stride_h", ctypes.c_int64), ("o_stride_s", ctypes.c_int64),
        ("B", ctypes.c_int64), ("H", ctypes.c_int64), ("S_q", ctypes.c_int64), ("S_k", ctypes.c_int64),
        ("D", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("causal", ctypes.c_int32),
        ("dtype", ctypes.c_int32),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
        ("stream", ctypes.c_void_p),
    ]


def blocks_for(head_dim: int) -> tuple[tuple[int, int, int], ...]:
    """The block shapes (queries, keys, max head dim) that run `head_dim`, the default first."""
    return tuple(b for b in BLOCKS if head_dim <= b[2])


def emit_attention(dtypes: Iterable[str], arch: Arch = Arch.SM80,
                   block: tuple[int, int, int] = BLOCKS[0], f32_math: str = "3xtf32") -> Source:
    """One TU holding the causal forward kernel for each of `dtypes` (torch names: float32|bfloat16|float16), of
    one block shape (see BLOCKS). The same text builds for sm_80 and sm_90a (2.x components); `arch` only names
    the target it is tuned for. `f32_math` is how float32 multiplies (F32_MATH): "3xtf32", fp32-class accuracy,
    or "tf32", one TF32 product, for the tf32 policy."""
    asked = set(dtypes)
    bad = sorted(asked - set(_DTYPES))
    wanted = [d for d in _DTYPES if d in asked]  # a fixed order: the same set renders the same text
    if bad or not wanted:
        raise UnsupportedDtype(f"attention kernels take {', '.join(_DTYPES)}, got {bad or 'none'}")
    if tuple(block) not in BLOCKS:
        raise ValueError(f"attention block {block} is not one of {BLOCKS}")
    if f32_math not in F32_MATH:
        raise ValueError(f"attention f32_math {f32_math!r} is not one of {tuple(F32_MATH)}")
    queries, keys, max_k = block
    text = render(template_text("attention_sm80.cu.in"), {
        "dtypes": ", ".join(wanted),
        "has_f32": int("float32" in wanted), "has_bf16": int("bfloat16" in wanted),
        "has_f16": int("float16" in wanted), "queries": queries, "keys": keys, "max_k": max_k,
        "f32_math": f32_math, "f32_one_pass": int(f32_math == "tf32"),
    })
    name = f"fr_attn_{'_'.join(wanted)}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def config(d: str) -> AttentionConfig:
        one_pass = d == "float32" and f32_math == "tf32"  # f32_math concerns float32 only
        return AttentionConfig(template=TEMPLATE, name=f"attn_causal_{d}{'_tf32' if one_pass else ''}"
                                                       f"_q{queries}_k{keys}_d{max_k}",
                               arch=arch, precision=Precision.TF32 if one_pass else _DTYPES[d][2],
                               element=_DTYPES[d][1], math_op=F32_MATH[f32_math] if d == "float32" else "multiply_add",
                               block=(queries, keys, max_k))

    configs = tuple(config(d) for d in wanted)
    # Example 41's folder and cuRAND's headers (kernel_forward.h includes <curand_kernel.h>), found by the build.
    return Source(name=name, arch=arch, code=text, configs=configs, symbols=("fr_attn_run",) * len(configs),
                  flags=AMPERE_AND_HOPPER, include_dirs=(f"cutlass:{'/'.join(EXAMPLE_DIR)}", "header:curand_kernel.h"))


def example_dir() -> str:
    """example 41's folder inside the nvidia-cutlass package (header-only use)."""
    from fact_ray.realize import build as build_mod  # late: loading a kernel never needs the build step

    root = Path(build_mod.include_paths()[0]).parent
    d = root.joinpath(*EXAMPLE_DIR)
    if not (d / "kernel_forward.h").is_file():
        raise NotAvailable(f"CUTLASS example 41 missing under {d}: reinstall nvidia-cutlass==4.2.0.0")
    return str(d)


def curand_include_dir(hints: Sequence[str] = (), nvcc: str = "nvcc") -> Optional[str]:
    """A folder holding curand_kernel.h: the first of `hints`, the CUDA toolkit of `nvcc`, or an installed
    nvidia-curand wheel. None when there is none (the caller decides what that means)."""
    from fact_ray.realize import build as build_mod  # late, as above

    return build_mod.header_dir("curand_kernel.h", hints, nvcc)


def include_dirs(nvcc: str = "nvcc", curand_hints: Sequence[str] = ()) -> tuple[str, ...]:
    """What an attention TU needs on the include path beyond CUTLASS: example 41's folder and cuRAND's headers."""
    curand = curand_include_dir(curand_hints, nvcc)
    if curand is None:
        raise NotAvailable("curand_kernel.h not found (CUTLASS example 41 includes it): pip install "
                           "nvidia-curand (CUDA 13) or nvidia-curand-cu12, or pass its include folder")
    return example_dir(), curand


def build_attention(dtypes: Iterable[str], cache_dir: str, nvcc: str = "nvcc",
                    curand_hints: Sequence[str] = (), block: tuple[int, int, int] = BLOCKS[0],
                    f32_math: str = "3xtf32") -> Library:
    """emit_attention + build.build with example 41's folder and the cuRAND headers on the include path."""
    source = emit_attention(dtypes, block=block, f32_math=f32_math)
    from fact_ray.realize import build as build_mod  # late, as above

    return build_mod.build(source, cache_dir, nvcc=nvcc, include_dirs=include_dirs(nvcc, curand_hints))


def load_attention(library: Library) -> ctypes.CDLL:
    """dlopen an attention library once per path; check its ABI version. A failed or foreign one: CompileError."""
    ptr = ctypes.POINTER(FrAttnArgs)
    return load_checked(library, "an attention", "attention ABI", ATTN_ABI_VERSION, {
        "fr_attn_supports": ([ctypes.c_int], ctypes.c_int),
        "fr_attn_workspace": ([ptr], ctypes.c_size_t),
        "fr_attn_run": ([ptr], ctypes.c_int),
    })


class AttentionKernel:
    """A compiled attention library as a callable: `kernel(q, k, v, causal=True, scale=None) -> o`.

    q, k, v are [B, S, H, D] tensors (BMHK; any strides, so a [B, H, S, D] tensor passed as
    `x.transpose(1, 2)` works without a copy). o is `out` (contiguous [B, S_q, H, D]) when given, else new.
    """

    RUN_NAME = "fr_attn_run"  # named in errors; a subclass with the same argument struct names its own
    GROUPED = False  # whether k and v may hold fewer heads than q (the FMHA's H_kv); example 41 takes as many

    def __init__(self, library: Library) -> None:
        self.library = library
        self._handle = load_attention(library)
        self._args = FrAttnArgs()
        self._workspaces: dict[tuple, object] = {}

    def supports(self, dtype_name: str) -> bool:
        return dtype_name in _DTYPES and bool(self._handle.fr_attn_supports(_DTYPES[dtype_name][0]))

    def __call__(self, q, k, v, causal: bool = True, scale: Optional[float] = None, out=None):
        import torch

        name = str(q.dtype).removeprefix("torch.")
        if not self.supports(name):
            raise CannotImplement(f"{self.library.source.name} has no kernel for {name}")
        for n, t in (("k", k), ("v", v)):
            if t.dtype != q.dtype or t.device != q.device:
                raise CannotImplement(f"{n} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
        if q.device.type != "cuda":
            raise CannotImplement(f"attention kernels run on CUDA tensors, got {q.device}")
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise CannotImplement("q, k, v must be 4-D [B, S, H, D]")
        B, S_q, H, D = (int(s) for s in q.shape)
        S_k, H_kv = int(k.shape[1]), int(k.shape[2])
        grouped_ok = self.GROUPED and 0 < H_kv <= H and H % H_kv == 0
        if tuple(k.shape) != (B, S_k, H_kv, D) or tuple(v.shape) != (B, S_k, H_kv, D) or \
                (H_kv != H and not grouped_ok):
            raise CannotImplement(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
        for n, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(3) != 1:
                raise CannotImplement(f"{n}'s head dim must be contiguous (stride {tuple(t.stride())})")
        if out is None:
            out = torch.empty((B, S_q, H, D), dtype=q.dtype, device=q.device)
        elif tuple(out.shape) != (B, S_q, H, D) or out.dtype != q.dtype or not out.is_contiguous() \
                or out.device != q.device:
            raise CannotImplement(f"out must be a contiguous {q.dtype} tensor of shape {(B, S_q, H, D)}")
        o = out
        a = self._args
        a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr()
        a.q_stride_b, a.q_stride_s, a.q_stride_h = q.stride(0), q.stride(1), q.stride(2)
        a.k_stride_b, a.k_stride_s, a.k_stride_h = k.stride(0), k.stride(1), k.stride(2)
        a.v_stride_b, a.v_stride_s, a.v_stride_h = v.stride(0), v.stride(1), v.stride(2)
        a.o_stride_b, a.o_stride_s, a.o_stride_h = o.stride(0), o.stride(1), o.stride(2)
        a.B, a.H, a.S_q, a.S_k, a.D = B, H, S_q, S_k, D
        if self.GROUPED:
            a.H_kv = H_kv
        a.scale = float(scale) if scale is not None else D ** -0.5
        a.causal = 1 if causal else 0
        a.dtype = _DTYPES[name][0]
        a.workspace, a.workspace_size = None, 0
        nbytes = int(self._handle.fr_attn_workspace(ctypes.byref(a)))
        if nbytes:
            key = (q.device, nbytes)
            ws = self._workspaces.get(key)
            if ws is None:
                ws = self._workspaces[key] = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
            a.workspace, a.workspace_size = ws.data_ptr(), nbytes
        a.stream = torch.cuda.current_stream(q.device).cuda_stream
        status = int(self._handle.fr_attn_run(ctypes.byref(a)))
        if status in (EINVAL, ENOTSUP):
            raise CannotImplement(f"{self.RUN_NAME} refused B={B} H={H} S_q={S_q} S_k={S_k} D={D} {name} "
                                  f"strides q={tuple(q.stride())} ({'invalid' if status == EINVAL else 'unsupported'})")
        if status != 0:
            raise LaunchError(f"{self.RUN_NAME}: CUDA error {status} (B={B} H={H} S_q={S_q} D={D} {name})")
        return o


def reference(q, k, v, causal: bool = True, scale: Optional[float] = None):
    """float64 explicit softmax attention over [B, S, H, D] inputs, causal from the top left. k and v may hold
    fewer heads (H_kv dividing H): query head h reads key/value head h // (H / H_kv), as repeat_interleave."""
    import torch

    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    group = q64.shape[1] // k64.shape[1]
    k64, v64 = (t.repeat_interleave(group, dim=1) for t in (k64, v64))
    s = (q64 @ k64.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        S_q, S_k = s.shape[-2], s.shape[-1]
        mask = torch.ones(S_q, S_k, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v64).transpose(1, 2)
