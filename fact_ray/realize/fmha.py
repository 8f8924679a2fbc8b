"""Causal multi-head, grouped-query and multi-query attention from CUTLASS example 88, the Hopper FMHA
(templates/fmha_sm90.cu.in): render, build, load, call. The second attention candidate beside example 41
(realize/attention.py) on sm90: TMA and warp-specialized WGMMA where example 41 runs Ampere mma.sync, so expected
much faster in bf16/fp16.

What it serves (`fits`): bf16/fp16, head dim a multiple of 8 up to 128, S_q a multiple of 8, causal from the top
left (the example's CausalFusion, torch's is_causal) with S_k >= S_q, and no mask when the TU carries the
non-causal kernel (HAS_FULL); K and V may hold fewer heads than Q (H_kv dividing H: query head h reads key/value
head h / G, nothing repeated in memory). Each TU is one tile of the search space in search_spaces/attention.py
(queries x keys x a head-dim tile sized to the head dim: 64, 96 or 128). The TU is header-only use of the
example's folder inside the nvidia-cutlass package; unlike example 41 it needs no cuRAND headers.

The C ABI is example 41's argument layout plus the key/value head count at the end, with the same dtype codes, so
`FmhaKernel` is `AttentionKernel` calling other symbols: one place checks shapes, strides and workspaces for both.
"""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import Optional

from fact_ray.errors import CannotImplement, NotAvailable, UnsupportedDtype
from fact_ray.realize.abi import load_checked
from fact_ray.realize import attention
from fact_ray.realize.targets import HOPPER_ONLY
from fact_ray.realize.emit import render, template_text
from fact_ray.search_spaces import attention as space
from fact_ray.types import Arch, AttentionConfig, Library, Source

TEMPLATE = "fmha_sm90"  # AttentionConfig.template of example-88 kernels; sm_90a only (WGMMA/TMA)
FMHA_ABI_VERSION = 2  # 2: the key/value head count (H_kv) at the end of the argument struct
HEAD_DIM_TILE = max(space.HEAD_DIM_TILES)  # the largest head dim any tile serves
DEFAULT_BLOCK = (128, 128, 128)  # the example's "tma ws cooperative 128x128x128" for head dim 128
ALIGN = 8  # 16 bytes of bf16/fp16: TMA's vector, and example 88's can_implement on D and S_q
EINVAL, ENOTSUP = attention.EINVAL, attention.ENOTSUP
EXAMPLE_DIR = ("examples", "88_hopper_fmha")
# The non-causal kernel (ResidualFusion) is a second instantiation in the same TU.
HAS_FULL = True

# torch dtype name -> (FR_FMHA_* code, cutlass element, precision): example 41's codes minus fp32, which example 88
# has no kernel for (the tf32 GMMA's K-major operands do not fit its PV GEMM).
_DTYPES = {d: v for d, v in attention._DTYPES.items() if d in ("bfloat16", "float16")}


class FrFmhaArgs(attention.FrAttnArgs):
    """Mirror of `fr_fmha_args` in fmha_sm90.cu.in: the layout of `fr_attn_args` plus the key/value head count
    (ctypes appends a subclass's fields after its base's, as the C struct has it)."""

    _fields_ = [("H_kv", ctypes.c_int64)]


def fits(dtype: str, head_dim: int, seq_q: int, causal: bool, seq_k: Optional[int] = None,
         heads: int = 1, kv_heads: Optional[int] = None) -> bool:
    """Whether the FMHA kernel runs this problem (what fr_fmha_run would not refuse on shapes alone)."""
    seq_k = seq_q if seq_k is None else seq_k
    kv_heads = heads if kv_heads is None else kv_heads
    return (dtype in _DTYPES and 0 < head_dim <= HEAD_DIM_TILE and head_dim % ALIGN == 0 and seq_q % ALIGN == 0
            and (seq_k >= seq_q if causal else HAS_FULL) and 0 < kv_heads <= heads and heads % kv_heads == 0)


def emit_fmha(dtype: str, arch: Arch = Arch.SM90, block: tuple[int, int, int] = DEFAULT_BLOCK) -> Source:
    """One TU holding the causal (and, with HAS_FULL, the non-causal) forward kernel for `dtype` in one tile
    `block` = (queries, keys, head-dim tile) of search_spaces/attention.py; the key/value head count is a call's
    argument, so the same TU serves multi-head, grouped-query and multi-query attention."""
    if dtype not in _DTYPES:
        raise UnsupportedDtype(f"the Hopper FMHA takes {', '.join(_DTYPES)}, got {dtype!r}")
    if Arch(arch) != Arch.SM90:
        raise CannotImplement(f"the Hopper FMHA (CUTLASS example 88) runs on sm90 only, not {Arch(arch).value}")
    try:
        t = space.tile(*block)
    except (TypeError, ValueError) as e:
        raise CannotImplement(str(e)) from None
    code, element, precision = _DTYPES[dtype]
    text = render(template_text("fmha_sm90.cu.in"), {
        "dtype": dtype, "element": f"cutlass::{element}", "dtype_code": code, "has_full": int(HAS_FULL),
        "q_tile": t.q, "k_tile": t.k, "head_dim_tile": t.head_dim, "warp_groups": t.warp_groups,
        "stages": t.stages,
    })
    name = f"fr_fmha_{dtype}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    # "causal" in the name is historical (the TU holds the non-causal kernel too); stored winners carry it.
    config = AttentionConfig(template=TEMPLATE, name=f"fmha_sm90_causal_{dtype}_q{t.q}_k{t.k}_d{t.head_dim}",
                             arch=Arch.SM90, precision=precision, element=element, math_op="multiply_add",
                             block=t.block)
    # Without the example's --use_fast_math: its softmax calls exp2f/__logf, and the accurate exp2f costs little
    # next to the two GEMMs. Its includes are relative to the example's folder ("collective/...", "kernel/...").
    return Source(name=name, arch=Arch.SM90, code=text, configs=(config,), symbols=("fr_fmha_run",),
                  flags=HOPPER_ONLY, include_dirs=(f"cutlass:{'/'.join(EXAMPLE_DIR)}",))


def example_dir() -> str:
    """example 88's folder inside the nvidia-cutlass package (header-only use)."""
    from fact_ray.realize import build as build_mod  # late: loading a kernel never needs the build step

    d = Path(build_mod.include_paths()[0]).parent.joinpath(*EXAMPLE_DIR)
    if not (d / "kernel" / "fmha_kernel_builder.hpp").is_file():
        raise NotAvailable(f"CUTLASS example 88 missing under {d}: reinstall nvidia-cutlass==4.2.0.0")
    return str(d)


def include_dirs() -> tuple[str, ...]:
    """What an FMHA TU needs on the include path beyond CUTLASS: example 88's folder (its includes are relative
    to it: "collective/...", "kernel/...")."""
    return (example_dir(),)


def build_fmha(dtype: str, cache_dir: str, nvcc: str = "nvcc", block: tuple[int, int, int] = DEFAULT_BLOCK) -> Library:
    """emit_fmha + build.build (the source names example 88's folder as an include folder)."""
    from fact_ray.realize import build as build_mod  # late: loading a kernel never needs the build step

    return build_mod.build(emit_fmha(dtype, block=block), cache_dir, nvcc=nvcc)


def load_fmha(library: Library) -> ctypes.CDLL:
    """dlopen an FMHA library once per path; check its ABI version. A failed or foreign one: CompileError."""
    ptr = ctypes.POINTER(FrFmhaArgs)
    return load_checked(library, "an FMHA", "FMHA ABI", FMHA_ABI_VERSION, {
        "fr_fmha_supports": ([ctypes.c_int], ctypes.c_int),
        "fr_fmha_workspace": ([ptr], ctypes.c_size_t),
        "fr_fmha_run": ([ptr], ctypes.c_int),
    })


class _AsAttention:
    """An FMHA handle under the fr_attn_* names AttentionKernel calls (same argument struct, same statuses)."""

    def __init__(self, handle: ctypes.CDLL) -> None:
        self.fr_attn_supports = handle.fr_fmha_supports
        self.fr_attn_workspace = handle.fr_fmha_workspace
        self.fr_attn_run = handle.fr_fmha_run


class FmhaKernel(attention.AttentionKernel):
    """A compiled FMHA library as a callable with AttentionKernel's signature: `kernel(q, k, v, causal=True,
    scale=None, out=None) -> o` over [B, S, H, D] q and [B, S_k, H_kv, D] k, v (H_kv dividing H: grouped-query
    attention) with any strides and a contiguous head dim; o is `out` (contiguous [B, S_q, H, D]) when given,
    else new. What the kernel does not run (D = 100, S_q = 77, misaligned strides, ...) is refused by fr_fmha_run
    and raised as CannotImplement; the logsumexp workspace it needs is allocated and cached per device and size."""

    RUN_NAME = "fr_fmha_run"
    GROUPED = True

    def __init__(self, library: Library) -> None:  # not super().__init__: that loads an example-41 library
        self.library = library
        self._handle = _AsAttention(load_fmha(library))
        self._args = FrFmhaArgs()
        self._workspaces = {}
