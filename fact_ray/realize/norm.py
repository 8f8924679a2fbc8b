"""Row LayerNorm / RMSNorm kernels of our own (templates/layernorm.cu.in): render, build, load, call.

Standalone for now (issue 6): not yet a search-space family. One Source per element type; each library exports
`fr_abi_version`, `fr_norm_element` and `fr_norm_run(const fr_norm_args*)` (see the template's header comment
for the semantics). `NormKernel` calls it on torch tensors on torch's current stream.
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import Optional

from fact_ray.errors import CannotImplement, CompileError, LaunchError, UnsupportedDtype
from fact_ray.realize.abi import load_checked
from fact_ray.realize.targets import AMPERE_AND_HOPPER
from fact_ray.realize.emit import render, template_text
from fact_ray.types import Arch, Library, NormConfig, Precision, Source

TEMPLATE = "norm"  # NormConfig.template; plain CUDA, built for sm_80 and sm_90a
NORM_ABI_VERSION = 1
KIND = {"layernorm": 0, "rmsnorm": 1}
EINVAL = -1

# torch dtype name -> (C++ type, FR_NORM_* code, cutlass element name, precision)
_DTYPES = {
    "float32": ("float", 0, "float", Precision.FP32),
    "bfloat16": ("__nv_bfloat16", 1, "bfloat16_t", Precision.BF16),
    "float16": ("__half", 2, "half_t", Precision.FP16),
}


class FrNormArgs(ctypes.Structure):
    """Mirror of `fr_norm_args` in layernorm.cu.in; field order and types must match it exactly."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("ld_x", ctypes.c_int64),
        ("ld_y", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("kind", ctypes.c_int32),
        ("stream", ctypes.c_void_p),
    ]


def _dtype_entry(dtype: str):
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UnsupportedDtype(f"norm kernels take {', '.join(_DTYPES)}, not {dtype!r}") from None


def emit_norm(dtype: str, arch: Arch = Arch.SM80) -> Source:
    """The LayerNorm/RMSNorm translation unit for one element type (a torch dtype name: float32|bfloat16|float16)."""
    ctype, code, element, precision = _dtype_entry(dtype)
    text = render(template_text("layernorm.cu.in"), {"element": dtype, "element_type": ctype, "element_code": code})
    name = f"fr_norm_{dtype}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    cfg = NormConfig(template=TEMPLATE, name=f"norm_{dtype}", arch=arch, precision=precision, element=element)
    return Source(name=name, arch=arch, code=text, configs=(cfg,), symbols=("fr_norm_run",), flags=AMPERE_AND_HOPPER)


def build_norm(dtype: str, cache_dir: str, nvcc: str = "nvcc") -> Library:
    """emit_norm + build.build (nvcc through the content-addressed cache)."""
    from fact_ray.realize import build as build_mod  # late: loading a kernel never needs the build step

    return build_mod.build(emit_norm(dtype), cache_dir, nvcc=nvcc)


def load_norm(library: Library) -> ctypes.CDLL:
    """dlopen a norm library once per path; check its ABI version. A failed or foreign library: CompileError."""
    return load_checked(library, "a norm", "norm ABI", NORM_ABI_VERSION, {
        "fr_norm_element": ([], ctypes.c_int),
        "fr_norm_run": ([ctypes.POINTER(FrNormArgs)], ctypes.c_int),
    })


class NormKernel:
    """One compiled norm library as a callable on CUDA tensors of its dtype.

    `kernel.layer_norm(x, weight=None, bias=None, eps=1e-5)` and `kernel.rms_norm(x, weight=None, eps=1e-6)`
    normalise over the last dim of x (rows: every other dim; the last dim must be contiguous, rows may be strided
    only if x is 2-D). Writes `out` (contiguous, x's shape) when given, else a new tensor, and returns it.
    """

    def __init__(self, library: Library) -> None:
        import torch

        self.library = library
        self._handle = load_norm(library)
        code = int(self._handle.fr_norm_element())
        names = {c: n for n, (_, c, _, _) in _DTYPES.items()}
        if code not in names:
            raise CompileError(f"{library.path}: unknown element code {code}")
        self.dtype = getattr(torch, names[code])
        self._args = FrNormArgs()

    def layer_norm(self, x, weight=None, bias=None, eps: float = 1e-5, out=None):
        return self._run(x, weight, bias, eps, "layernorm", out)

    def rms_norm(self, x, weight=None, eps: float = 1e-6, out=None):
        return self._run(x, weight, None, eps, "rmsnorm", out)

    def _run(self, x, weight, bias, eps: float, kind: str, out=None):
        import torch

        if x.device.type != "cuda":
            raise CannotImplement(f"norm kernels run on CUDA tensors, got {x.device}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise CannotImplement(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
        cols = int(x.shape[-1])
        for name, t in (("x", x), ("weight", weight), ("bias", bias)):
            if t is None:
                continue
            if t.dtype != self.dtype:
                raise CannotImplement(f"{name} is {t.dtype}, the kernel takes {self.dtype}")
            if t.device != x.device:
                raise CannotImplement(f"{name} is on {t.device}, x on {x.device}")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and (tuple(t.shape) != (cols,) or not t.is_contiguous()):
                raise CannotImplement(f"{name} must be contiguous of shape ({cols},), got {tuple(t.shape)}")
        if x.dim() == 2 and x.stride(1) == 1 and x.stride(0) >= cols:
            x2, ld_x = x, int(x.stride(0))  # a strided row view (e.g. a column slice) folds into ld_x
        else:
            x2 = x.reshape(-1, cols) if x.is_contiguous() else None
            if x2 is None:
                raise CannotImplement(f"x of shape {tuple(x.shape)} and stride {tuple(x.stride())} is not rows")
            ld_x = cols
        rows = int(x2.shape[0])
        if out is None:
            out = torch.empty(tuple(x.shape), dtype=self.dtype, device=x.device)
        elif tuple(out.shape) != tuple(x.shape) or out.dtype != self.dtype or not out.is_contiguous() \
                or out.device != x.device:
            raise CannotImplement(f"out must be a contiguous {self.dtype} tensor of shape {tuple(x.shape)}")
        y = out.view(rows, cols)
        a = self._args
        a.x, a.y = x2.data_ptr(), y.data_ptr()
        a.weight = weight.data_ptr() if weight is not None else None
        a.bias = bias.data_ptr() if bias is not None else None
        a.rows, a.cols, a.ld_x, a.ld_y = rows, cols, ld_x, cols
        a.eps, a.kind = float(eps), KIND[kind]
        a.stream = torch.cuda.current_stream(x.device).cuda_stream
        status = int(self._handle.fr_norm_run(ctypes.byref(a)))
        if status == EINVAL:
            raise CannotImplement(f"fr_norm_run refused {kind} rows={rows} cols={cols} eps={eps}")
        if status != 0:
            raise LaunchError(f"fr_norm_run: CUDA error {status} ({kind} rows={rows} cols={cols})")
        return out


def reference(x, weight: Optional[object], bias: Optional[object], eps: float, kind: str):
    """float64 torch reference for either kind (what the GPU tests compare against)."""
    import torch
    import torch.nn.functional as F

    x64 = x.double()
    w64 = weight.double() if weight is not None else None
    if kind == "layernorm":
        return F.layer_norm(x64, (x.shape[-1],), w64, bias.double() if bias is not None else None, eps)
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return y * w64 if w64 is not None else y
