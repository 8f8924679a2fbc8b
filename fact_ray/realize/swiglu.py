"""SwiGLU kernels of our own: silu(x @ Wg^T + bg) * (x @ Wu^T + bu) as ONE CUTLASS 3.x GEMM (sm_90a), rendered
from templates/sm90_swiglu.cu.in with the epilogue of templates/fr_swiglu_epilogue.hpp.

How one GEMM computes both halves: the weights are interleaved by rows, B' = [Wg[0]; Wu[0]; Wg[1]; Wu[1]; ...]
([2F, K], an nn.Linear weight's layout; biases alike), so accumulator columns 2j and 2j+1 of a tile are the gate
and the up projection of output column j, held by one thread in consecutive registers; the epilogue writes
silu(gate) * up, F columns, and the [M, 2F] intermediate never reaches memory. Interleaving is a copy of the
weights: the native dispatcher (templates/fr_dispatch.cpp, `fact_ray_native.swiglu`) makes it once per weight
tensor and version and keeps it beside the model (one more copy of the gate and up weights in GPU memory); the
Python path here keeps its own (`packed`).

The libraries speak the GEMM ABI of fr_abi.h (ABI version 1) with N = 2F, bias the interleaved [2F] bias or NULL,
and D [M, F]: `SwiGluKernel` calls one symbol on torch tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import weakref
from typing import Any, Iterable, Optional

from fact_ray.errors import CannotImplement, LaunchError
from fact_ray.realize.emit import (LAUNCH_FIELDS, LAUNCH_HEADER, abi_header, balanced, kernel_of, key_of, launch_values,
                                   render, template_text)
from fact_ray.realize.targets import HOPPER_ONLY
from fact_ray.types import Arch, KernelConfig, Library, Source

TEMPLATE = "sm90_swiglu"
# Distinct kernels per TU: sm90 instances cost 5-11 s each after the first; a trial batch rarely needs more than a TU
# or two. Launch variants of a kernel (raster order, swizzle) ride along in its TU and do not count.
MAX_PER_TU = 4
# KernelConfig fields that change an instance's C++ (the others are implied or fixed by the family). The launch
# fields join a config's key only when set (emit.key_of), so the symbols of configs without them stay as they were.
COMPILE_FIELDS = ("template", "element", "tile", "cluster", "kernel_schedule", "tile_scheduler") + tuple(LAUNCH_FIELDS)
ELEMENT_TAG = {"bfloat16_t": "cutlass::bfloat16_t", "half_t": "cutlass::half_t"}
POINTER_ALIGN = 16


# --------------------------------------------------------------------------------------------- emit


def compile_key(cfg: KernelConfig) -> tuple:
    return key_of(cfg, COMPILE_FIELDS)


def kernel_key(cfg: KernelConfig) -> str:
    """The compiled kernel of a config: equal for configs that differ only in their launch choices."""
    return kernel_of(compile_key(cfg))


def symbol(cfg: KernelConfig) -> str:
    """The C symbol prefix of a config's instance: equal for configs that compile to the same code."""
    key = compile_key(cfg)
    return f"frsw_{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}"


def _instance(cfg: KernelConfig) -> str:
    from cutlass_library import library as lib

    if cfg.template != TEMPLATE or cfg.element not in ELEMENT_TAG:
        raise ValueError(f"{cfg.name}: not a swiglu config (template {cfg.template}, element {cfg.element})")
    if cfg.layout_a != "row" or cfg.layout_b != "col" or cfg.cluster[2] != 1:
        raise ValueError(f"{cfg.name}: swiglu kernels take a row-major x, [F, K] weights and a cluster of depth 1")
    scheduler = {"persistent": lib.TileSchedulerType.Persistent, "": lib.TileSchedulerType.Default}
    if cfg.tile_scheduler not in scheduler:
        raise ValueError(f"{cfg.name}: tile scheduler {cfg.tile_scheduler!r} is not persistent")
    launch = launch_values(cfg)  # raster and swizzle; a decomposition (stream-K scheduler only) is refused here
    sym = symbol(cfg)
    return render(template_text("sm90_swiglu_instance.cu.in"), {
        "sym": sym, "name": " ".join(f"{f}={v}" for f, v in compile_key(cfg)[1:]), **launch,
        "element": ELEMENT_TAG[cfg.element],
        "kernel_schedule": lib.KernelScheduleTag[lib.KernelScheduleType[cfg.kernel_schedule]],
        "tile_scheduler": lib.TileSchedulerTag[scheduler[cfg.tile_scheduler]],
        "tile_m": cfg.tile[0], "tile_n": cfg.tile[1], "tile_k": cfg.tile[2],
        "cluster_m": cfg.cluster[0], "cluster_n": cfg.cluster[1],
    })


def emit_swiglu(configs: Iterable[KernelConfig], arch: Arch) -> list[Source]:
    """Translation units holding `configs` (each in exactly one, in the given order), grouped by element and
    kernel schedule so that a TU instantiates one mainloop collective family, at most MAX_PER_TU distinct kernels
    each; launch variants of a kernel always land in its TU (one compile of the kernel for all of them)."""
    arch = Arch(arch)
    if arch is not Arch.SM90:
        raise ValueError(f"swiglu kernels are sm_90a only, not {arch.value}")
    groups: dict[tuple, list[KernelConfig]] = {}
    for cfg in configs:
        if Arch(cfg.arch) is not arch:
            raise ValueError(f"{cfg.name}: config for {cfg.arch}, emitting for {arch.value}")
        groups.setdefault((cfg.element, cfg.kernel_schedule), []).append(cfg)
    sources = []
    for group in groups.values():
        kernels = list(dict.fromkeys(kernel_key(c) for c in group))
        for members in map(set, balanced(kernels, MAX_PER_TU)):
            chunk = [c for c in group if kernel_key(c) in members]
            blocks = {symbol(c): _instance(c) for c in chunk}
            code = render(template_text("sm90_swiglu.cu.in"), {
                "listing": "\n".join(f"//   {s}" for s in blocks), "abi_header": abi_header(),
                "common_header": template_text("fr_common.h"), "launch_header": template_text(LAUNCH_HEADER),
                "epilogue_header": template_text("fr_swiglu_epilogue.hpp"),
                "instances": "\n".join(blocks.values()),
            })
            name = f"{TEMPLATE}_{hashlib.sha256(code.encode()).hexdigest()[:16]}"
            sources.append(Source(name=name, arch=arch, code=code, configs=tuple(chunk),
                                  symbols=tuple(symbol(c) for c in chunk), flags=HOPPER_ONLY))
    return sources


# --------------------------------------------------------------------------------------------- packing


def pack(gate: Any, up: Any) -> Any:
    """Rows (or elements, for biases) of gate and up interleaved: out[2j] = gate[j], out[2j + 1] = up[j]."""
    import torch

    return torch.stack((gate, up), dim=1).reshape((2 * gate.shape[0],) + tuple(gate.shape[1:]))


class _Packed:
    """The interleaved weight and bias of one (gate, up, bias_gate, bias_up), valid while those very tensors live
    unmodified (their version counters unchanged)."""

    def __init__(self, sources: tuple, weight: Any, bias: Any) -> None:
        self.refs = tuple(weakref.ref(t) if t is not None else None for t in sources)
        self.versions = tuple(t._version if t is not None else None for t in sources)
        self.weight, self.bias = weight, bias

    def serves(self, sources: tuple) -> bool:
        return all((r is None and t is None) or (r is not None and t is not None and r() is t and v == t._version)
                   for r, t, v in zip(self.refs, sources, self.versions))


_PACKED: dict[tuple[int, ...], _Packed] = {}


def packed(b_gate: Any, b_up: Any, bias_gate: Any = None, bias_up: Any = None) -> tuple[Any, Any]:
    """(interleaved weight, interleaved bias or None), made once per set of weight tensors and their versions
    (an in-place update of a weight makes it again). Inference tensors have no version counter: packed each call."""
    sources = (b_gate, b_up, bias_gate, bias_up)
    bias = (bias_gate, bias_up)
    if any(t is not None and t.is_inference() for t in sources):
        return pack(b_gate, b_up).contiguous(), pack(*bias).contiguous() if bias_gate is not None else None
    for key in [k for k, e in _PACKED.items() if any(r is not None and r() is None for r in e.refs)]:
        del _PACKED[key]  # a weight that is gone: free its copy
    key = tuple(id(t) for t in sources)
    entry = _PACKED.get(key)
    if entry is None or not entry.serves(sources):
        w = pack(b_gate, b_up).contiguous()
        b = pack(*bias).contiguous() if bias_gate is not None else None
        entry = _PACKED[key] = _Packed(sources, w, b)
    return entry.weight, entry.bias


# --------------------------------------------------------------------------------------------- calling


class SwiGluKernel:
    """One config of a compiled swiglu library as a callable on CUDA tensors of its dtype:
    `kernel(x, b_gate, b_up, bias_gate=None, bias_up=None, out=None)` with x [..., K] (dense rows), the weights
    [F, K] (nn.Linear's) and biases [F] or None; returns [..., F] (written into `out` when given)."""

    def __init__(self, library: Library, config: KernelConfig) -> None:
        from fact_ray.realize.kernel import FrGemmArgs, load_library, symbol_of, torch_dtype

        self.library, self.config = library, config
        self.symbol = symbol_of(library, config)
        handle = load_library(library)
        self._args_type = FrGemmArgs
        self._workspace = getattr(handle, f"{self.symbol}_workspace")
        self._workspace.argtypes, self._workspace.restype = [ctypes.POINTER(FrGemmArgs)], ctypes.c_size_t
        self._run = getattr(handle, f"{self.symbol}_run")
        self._run.argtypes, self._run.restype = [ctypes.POINTER(FrGemmArgs)], ctypes.c_int
        self._can = getattr(handle, f"{self.symbol}_can_implement")
        self._can.argtypes, self._can.restype = [ctypes.POINTER(FrGemmArgs)], ctypes.c_int
        self.dtype = torch_dtype({"bfloat16_t": "bfloat16", "half_t": "float16"}[config.element])

    def __call__(self, x, b_gate, b_up, bias_gate=None, bias_up=None, out=None):
        import torch

        if x.device.type != "cuda":
            raise CannotImplement(f"swiglu kernels run on CUDA tensors, got {x.device}")
        F, K = (int(s) for s in b_gate.shape) if b_gate.dim() == 2 else (0, 0)
        if b_gate.dim() != 2 or tuple(b_up.shape) != (F, K) or x.dim() < 1 or x.shape[-1] != K:
            raise CannotImplement(f"swiglu takes x [..., K] and weights [F, K]; got x {tuple(x.shape)}, gate "
                                  f"{tuple(b_gate.shape)}, up {tuple(b_up.shape)}")
        if (bias_gate is None) != (bias_up is None):
            raise CannotImplement("swiglu takes both biases or neither")
        for name, t in (("x", x), ("gate weight", b_gate), ("up weight", b_up), ("gate bias", bias_gate),
                        ("up bias", bias_up)):
            if t is None:
                continue
            if t.dtype != self.dtype or t.device != x.device or not t.is_contiguous():
                raise CannotImplement(f"{name} must be a contiguous {self.dtype} tensor on {x.device}")
            if t.data_ptr() % POINTER_ALIGN:
                raise CannotImplement(f"{name} is not {POINTER_ALIGN}-byte aligned")
        for name, t in (("gate bias", bias_gate), ("up bias", bias_up)):
            if t is not None and tuple(t.shape) != (F,):
                raise CannotImplement(f"{name} must be [{F}], got {tuple(t.shape)}")
        M = math.prod(int(s) for s in x.shape[:-1])
        shape = tuple(x.shape[:-1]) + (F,)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=x.device)
        elif tuple(out.shape) != shape or out.dtype != self.dtype or not out.is_contiguous():
            raise CannotImplement(f"out must be a contiguous {self.dtype} tensor of shape {shape}")
        if M == 0 or F == 0:
            return out
        w, b = packed(b_gate, b_up, bias_gate, bias_up)
        a = self._args_type()
        a.A, a.B, a.C, a.D = x.data_ptr(), w.data_ptr(), None, out.data_ptr()
        a.bias = b.data_ptr() if b is not None else None
        a.M, a.N, a.K, a.L = M, 2 * F, K, 1
        a.lda, a.ldb, a.ldc, a.ldd = K, K, 0, F
        a.batch_stride_a, a.batch_stride_b, a.batch_stride_c, a.batch_stride_d = M * K, 0, 0, M * F
        a.alpha, a.beta, a.split_k, a.sm_count = 1.0, 0.0, 1, 0
        a.stream = torch.cuda.current_stream(x.device).cuda_stream
        need = int(self._workspace(ctypes.byref(a)))
        ws = torch.empty(need, dtype=torch.uint8, device=x.device) if need else None
        a.workspace, a.workspace_size = (ws.data_ptr() if ws is not None else None), need
        status = int(self._run(ctypes.byref(a)))
        if status != 0:
            if int(self._can(ctypes.byref(a))) != 0:
                raise CannotImplement(f"{self.config.name} cannot implement M={M} F={F} K={K}")
            raise LaunchError(f"{self.config.name}: launch failed with status {status} (M={M} F={F} K={K})")
        return out


def reference(x: Any, b_gate: Any, b_up: Any, bias_gate: Optional[Any] = None, bias_up: Optional[Any] = None):
    """silu(x @ Wg^T + bg) * (x @ Wu^T + bu) in whatever dtype it is given (float64: the reference)."""
    import torch.nn.functional as F

    return F.silu(F.linear(x, b_gate, bias_gate)) * F.linear(x, b_up, bias_up)
