"""Row LayerNorm / RMSNorm kernels of our own (templates/layernorm.cu.in): launch shapes, render, build, load, call.

One library per configuration: an element type and a launch shape of the row kernel (threads per row, rows per
block, 16-byte vectors per thread held in registers), or the general kernel alone (`lanes` 0: the configuration
stored before launch shapes were searched). Each library exports `fr_abi_version`, `fr_norm_element` and its run
function (`norm_symbol(config)`, taking `const fr_norm_args*`; see the template's header comment for the
semantics). `NormKernel` calls it on torch tensors on torch's current stream, with an optional residual add in
front (`add_norm`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
from typing import Any, Callable, Optional

from fact_ray.errors import CannotImplement, CompileError, LaunchError, UnsupportedDtype
from fact_ray.realize.abi import load_checked
from fact_ray.realize.targets import AMPERE_AND_HOPPER
from fact_ray.realize.emit import render, template_text
from fact_ray.types import Arch, Library, NormConfig, Precision, Source

TEMPLATE = "norm"  # NormConfig.template; plain CUDA, built for sm_80 and sm_90a
NORM_ABI_VERSION = 2
KIND = {"layernorm": 0, "rmsnorm": 1}
EINVAL = -1
GENERAL_SYMBOL = "fr_norm_run"  # the general kernel's library (lanes 0), as stored before launch shapes
MAX_ITEMS = 16  # 16-byte vectors a thread holds: 64 registers of row, whatever the element type
LANES = (32, 64, 128, 256, 512, 1024)
# Rows per block for each row width: 128 to 512 threads a block (enough warps for the SM's scheduler to hide
# latency, small enough that several blocks share an SM).
ROWS_PER_BLOCK = {32: (4, 8), 64: (2, 4), 128: (1, 2), 256: (1, 2), 512: (1,), 1024: (1,)}

# torch dtype name -> (C++ type, FR_NORM_* code, cutlass element name, precision)
_DTYPES = {
    "float32": ("float", 0, "float", Precision.FP32),
    "bfloat16": ("__nv_bfloat16", 1, "bfloat16_t", Precision.BF16),
    "float16": ("__half", 2, "half_t", Precision.FP16),
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_OF_ELEMENT = {element: d for d, (_, _, element, _) in _DTYPES.items()}


class FrNormArgs(ctypes.Structure):
    """Mirror of `fr_norm_args` in layernorm.cu.in; field order and types must match it exactly."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("residual", ctypes.c_void_p),
        ("h", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("ld_x", ctypes.c_int64),
        ("ld_y", ctypes.c_int64),
        ("ld_r", ctypes.c_int64),
        ("ld_h", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("kind", ctypes.c_int32),
        ("stream", ctypes.c_void_p),
    ]


def _dtype_entry(dtype: str):
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UnsupportedDtype(f"norm kernels take {', '.join(_DTYPES)}, not {dtype!r}") from None


def norm_symbol(config: NormConfig) -> str:
    """The run function a configuration's library exports."""
    if config.lanes == 0:
        return GENERAL_SYMBOL
    return f"fr_norm_l{config.lanes}_r{config.rows_per_block}_i{config.items}_run"


def norm_config(dtype: str, arch: Arch = Arch.SM80, lanes: int = 0, rows_per_block: int = 1,
                items: int = 0) -> NormConfig:
    """A configuration: the row kernel in one launch shape, or (lanes 0) the general kernel alone."""
    _, _, element, precision = _dtype_entry(dtype)
    if lanes:
        if lanes not in LANES or rows_per_block < 1 or lanes * rows_per_block > 1024 or not 1 <= items <= MAX_ITEMS:
            raise ValueError(f"norm launch shape lanes={lanes} rows_per_block={rows_per_block} items={items} is not "
                             f"one the row kernel runs")
        name = f"norm_{dtype}_l{lanes}_r{rows_per_block}_i{items}"
    else:
        rows_per_block, items, name = 1, 0, f"norm_{dtype}"
    return NormConfig(template=TEMPLATE, name=name, arch=arch, precision=precision, element=element, lanes=lanes,
                      rows_per_block=rows_per_block, items=items)


def launch_shapes(cols: int, dtype: str) -> list[tuple[int, int, int]]:
    """(lanes, rows_per_block, items) of the row kernel that hold a row of `cols` in registers, best guess first:
    a few vectors per thread (enough loads in flight, few registers), lanes mostly busy. Empty when the row is not
    whole 16-byte vectors or too long for registers (the general kernel's case)."""
    vec = 16 // _BYTES[dtype]
    if cols % vec:
        return []
    nvec = cols // vec
    shapes = []
    for lanes in LANES:
        items = math.ceil(nvec / lanes)
        if items > MAX_ITEMS:
            continue
        idle = 1 - nvec / (lanes * items)
        if idle > 0.25:  # a quarter of the lanes or more would hold nothing
            continue
        for rows in ROWS_PER_BLOCK[lanes]:
            shapes.append((abs(math.log2(items) - 2), idle, rows != ROWS_PER_BLOCK[lanes][0], lanes, rows, items))
    return [(lanes, rows, items) for *_, lanes, rows, items in sorted(shapes)]


def norm_candidates(cols: int, dtype: str, arch: Arch, budget: int) -> list[NormConfig]:
    """The row kernel's launch shapes for this row length, then the general kernel (it runs any row)."""
    configs = [norm_config(dtype, arch, *shape) for shape in launch_shapes(cols, dtype)]
    configs.append(norm_config(dtype, arch))
    return configs[:max(budget, 0)]


def emit_norm(dtype: str, arch: Optional[Arch] = None, config: Optional[NormConfig] = None) -> Source:
    """The translation unit of one configuration (default: the general kernel of `dtype`, a torch dtype name), for
    `arch` (default: the config's, else sm80)."""
    _dtype_entry(dtype)
    return emit_elementwise("layernorm.cu.in", "norm", dtype, arch, config, lambda a: norm_config(dtype, a),
                            norm_symbol, lambda c: {"lanes": c.lanes, "rows_per_block": c.rows_per_block,
                                                    "items": c.items})


def emit_elementwise(template: str, kind: str, dtype: str, arch: Optional[Arch], config: Optional[Any],
                     default: Callable[[Arch], Any], symbol_of: Callable[[Any], str],
                     params: Callable[[Any], dict[str, Any]]) -> Source:
    """One configuration of an element-wise family (norm, rope: one table of element codes, one library per launch
    shape) rendered into its translation unit: `config` moved to `arch` (default: the config's, else sm80), or
    `default(arch)`; the template gets the element's C++ type and code, the symbol and `params(config)`."""
    ctype, code, element, _ = _DTYPES[dtype]
    arch = Arch(arch or (config.arch if config is not None else Arch.SM80))
    config = dataclasses.replace(config, arch=arch) if config is not None else default(arch)
    if config.element != element:
        raise ValueError(f"{kind} config {config.name} is for {config.element}, not {dtype}")
    symbol = symbol_of(config)
    text = render(template_text(template), {
        "element": dtype, "element_type": ctype, "element_code": code, **params(config), "symbol": symbol})
    name = f"fr_{config.name}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return Source(name=name, arch=arch, code=text, configs=(config,), symbols=(symbol,), flags=AMPERE_AND_HOPPER)


def build_norm(dtype: str, cache_dir: str, nvcc: str = "nvcc", config: Optional[NormConfig] = None) -> Library:
    """emit_norm + build.build (nvcc through the content-addressed cache)."""
    from fact_ray.realize import build as build_mod  # late: loading a kernel never needs the build step

    return build_mod.build(emit_norm(dtype, config=config), cache_dir, nvcc=nvcc)


def load_norm(library: Library, symbol: Optional[str] = None) -> ctypes.CDLL:
    """dlopen a norm library once per path; check its ABI version. A failed or foreign library: CompileError."""
    symbol = symbol or library.source.symbols[0]
    return load_checked(library, "a norm", "norm ABI", NORM_ABI_VERSION, {
        "fr_norm_element": ([], ctypes.c_int),
        symbol: ([ctypes.POINTER(FrNormArgs)], ctypes.c_int),
    })


class NormKernel:
    """One compiled norm library as a callable on CUDA tensors of its dtype.

    `kernel.layer_norm(x, weight=None, bias=None, eps=1e-5)` and `kernel.rms_norm(x, weight=None, eps=1e-6)`
    normalise over the last dim of x (rows: every other dim; the last dim must be contiguous, rows may be strided
    only if x is 2-D). Writes `out` (contiguous, x's shape) when given, else a new tensor, and returns it.
    `kernel.add_norm(x, residual, kind, weight, bias, eps)` adds the residual first and returns (h, y): h = x +
    residual (x's dtype, rounded as PyTorch's add rounds it) and y = norm(h), both from one pass.
    """

    def __init__(self, library: Library) -> None:
        import torch

        self.library = library
        self.symbol = library.source.symbols[0]
        self._handle = load_norm(library, self.symbol)
        self._fn = getattr(self._handle, self.symbol)
        code = int(self._handle.fr_norm_element())
        names = {c: n for n, (_, c, _, _) in _DTYPES.items()}
        if code not in names:
            raise CompileError(f"{library.path}: unknown element code {code}")
        self.dtype = getattr(torch, names[code])
        self._args = FrNormArgs()

    def layer_norm(self, x, weight=None, bias=None, eps: float = 1e-5, out=None):
        return self._run(x, weight, bias, eps, "layernorm", out)[1]

    def rms_norm(self, x, weight=None, eps: float = 1e-6, out=None):
        return self._run(x, weight, None, eps, "rmsnorm", out)[1]

    def add_norm(self, x, residual, kind: str, weight=None, bias=None, eps: float = 1e-5, out=None, h_out=None):
        if residual is None:
            raise CannotImplement("add_norm needs a residual")
        return self._run(x, weight, bias, eps, kind, out, residual, h_out)

    def _rows(self, name: str, t, cols: int):
        """(the [rows, cols] view of t, its row stride); CannotImplement when t is not rows."""
        if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= cols:
            return t, int(t.stride(0))  # a strided row view (e.g. a column slice) folds into the row stride
        if not t.is_contiguous():
            raise CannotImplement(f"{name} of shape {tuple(t.shape)} and stride {tuple(t.stride())} is not rows")
        return t.reshape(-1, cols), cols

    def _output(self, name: str, given, x):
        import torch

        if given is None:
            return torch.empty(tuple(x.shape), dtype=self.dtype, device=x.device)
        if tuple(given.shape) != tuple(x.shape) or given.dtype != self.dtype or not given.is_contiguous() \
                or given.device != x.device:
            raise CannotImplement(f"{name} must be a contiguous {self.dtype} tensor of shape {tuple(x.shape)}")
        return given

    def _run(self, x, weight, bias, eps: float, kind: str, out=None, residual=None, h_out=None):
        import torch

        if x.device.type != "cuda":
            raise CannotImplement(f"norm kernels run on CUDA tensors, got {x.device}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise CannotImplement(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
        if kind not in KIND:
            raise CannotImplement(f"norm kind {kind!r} is not one of {', '.join(KIND)}")
        cols = int(x.shape[-1])
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
            if t is None:
                continue
            if t.dtype != self.dtype:
                raise CannotImplement(f"{name} is {t.dtype}, the kernel takes {self.dtype}")
            if t.device != x.device:
                raise CannotImplement(f"{name} is on {t.device}, x on {x.device}")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and (tuple(t.shape) != (cols,) or not t.is_contiguous()):
                raise CannotImplement(f"{name} must be contiguous of shape ({cols},), got {tuple(t.shape)}")
        if residual is not None and tuple(residual.shape) != tuple(x.shape):
            raise CannotImplement(f"residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}")
        x2, ld_x = self._rows("x", x, cols)
        rows = int(x2.shape[0])
        out = self._output("out", out, x)
        a = self._args
        a.residual = a.h = None
        a.ld_r = a.ld_h = 0
        h = None
        if residual is not None:
            r2, a.ld_r = self._rows("residual", residual, cols)
            h = self._output("h_out", h_out, x)
            a.residual, a.h, a.ld_h = r2.data_ptr(), h.data_ptr(), cols
        a.x, a.y = x2.data_ptr(), out.data_ptr()
        a.weight = weight.data_ptr() if weight is not None else None
        a.bias = bias.data_ptr() if bias is not None else None
        a.rows, a.cols, a.ld_x, a.ld_y = rows, cols, ld_x, cols
        a.eps, a.kind = float(eps), KIND[kind]
        a.stream = torch.cuda.current_stream(x.device).cuda_stream
        status = int(self._fn(ctypes.byref(a)))
        if status == EINVAL:
            raise CannotImplement(f"{self.symbol} refused {kind} rows={rows} cols={cols} eps={eps}")
        if status != 0:
            raise LaunchError(f"{self.symbol}: CUDA error {status} ({kind} rows={rows} cols={cols})")
        return h, out


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
