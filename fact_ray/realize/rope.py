"""Rotary position embedding kernels of our own (templates/rope.cu.in): launch shapes, render, build, load, call.

One library per configuration (an element type and a launch shape: threads a block, 16-byte units a thread). Each
exports `fr_abi_version`, `fr_rope_element` and its run function (`rope_symbol(config)`, taking
`const fr_rope_args*`: one tensor, or q and k in one launch). `RopeKernel` calls it on torch tensors on torch's
current stream. The forms: "half" (HF's `rotate_half`: `x * cos + cat(-x2, x1) * sin`) and "interleaved"
(GPT-J's `rotate_every_two`: the pairs (x[2j], x[2j+1]) rotate).
"""

from __future__ import annotations

import ctypes
from typing import Optional

from fact_ray.errors import CannotImplement, CompileError, LaunchError, UnsupportedDtype
from fact_ray.realize.abi import load_checked
# one element table for both element-wise families: rope.cu.in's FR_ROPE_* codes are the norm kernels' (0, 1, 2)
from fact_ray.realize.norm import _DTYPES, DTYPE_OF_ELEMENT, emit_elementwise
from fact_ray.types import Arch, Library, RopeConfig, Source

TEMPLATE = "rope"  # RopeConfig.template; plain CUDA, built for sm_80 and sm_90a
ROPE_ABI_VERSION = 1
FORMS = {"half": 0, "interleaved": 1}
EINVAL = -1
# (threads a block, units a thread), best guess first: an elementwise pass wants many small blocks in flight.
LAUNCH_SHAPES = ((256, 1), (128, 1), (512, 1), (256, 2), (128, 4))


class FrRopeTensor(ctypes.Structure):
    """Mirror of `fr_rope_tensor` in rope.cu.in."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("n", ctypes.c_int64 * 3),
        ("x_stride", ctypes.c_int64 * 3),
        ("y_stride", ctypes.c_int64 * 3),
        ("cos_stride", ctypes.c_int64 * 3),
        ("sin_stride", ctypes.c_int64 * 3),
    ]


class FrRopeArgs(ctypes.Structure):
    """Mirror of `fr_rope_args` in rope.cu.in; field order and types must match it exactly."""

    _fields_ = [
        ("t", FrRopeTensor * 2),
        ("count", ctypes.c_int32),
        ("D", ctypes.c_int64),
        ("form", ctypes.c_int32),
        ("stream", ctypes.c_void_p),
    ]


def _dtype_entry(dtype: str):
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UnsupportedDtype(f"rope kernels take {', '.join(_DTYPES)}, not {dtype!r}") from None


def rope_symbol(config: RopeConfig) -> str:
    return f"fr_rope_t{config.threads}_u{config.units}_run"


def rope_config(dtype: str, arch: Arch = Arch.SM80, threads: int = 256, units: int = 1) -> RopeConfig:
    _, _, element, precision = _dtype_entry(dtype)
    if threads not in (64, 128, 256, 512, 1024) or not 1 <= units <= 8:
        raise ValueError(f"rope launch shape threads={threads} units={units} is not one the kernel runs")
    return RopeConfig(template=TEMPLATE, name=f"rope_{dtype}_t{threads}_u{units}", arch=arch, precision=precision,
                      element=element, threads=threads, units=units)


def rope_candidates(dtype: str, arch: Arch, budget: int) -> list[RopeConfig]:
    return [rope_config(dtype, arch, t, u) for t, u in LAUNCH_SHAPES][:max(budget, 0)]


def emit_rope(dtype: str, arch: Optional[Arch] = None, config: Optional[RopeConfig] = None) -> Source:
    """The translation unit of one configuration (default: the first launch shape) for `arch` (default: the
    config's, else sm80)."""
    _dtype_entry(dtype)
    return emit_elementwise("rope.cu.in", "rope", dtype, arch, config, lambda a: rope_config(dtype, a), rope_symbol,
                            lambda c: {"threads": c.threads, "units": c.units})


def build_rope(dtype: str, cache_dir: str, nvcc: str = "nvcc", config: Optional[RopeConfig] = None) -> Library:
    from fact_ray.realize import build as build_mod  # late: loading a kernel never needs the build step

    return build_mod.build(emit_rope(dtype, config=config), cache_dir, nvcc=nvcc)


def load_rope(library: Library, symbol: Optional[str] = None) -> ctypes.CDLL:
    """dlopen a rope library once per path; check its ABI version. A failed or foreign library: CompileError."""
    symbol = symbol or library.source.symbols[0]
    return load_checked(library, "a rope", "rope ABI", ROPE_ABI_VERSION, {
        "fr_rope_element": ([], ctypes.c_int),
        symbol: ([ctypes.POINTER(FrRopeArgs)], ctypes.c_int),
    })


def broadcasts_to(shape, target) -> bool:
    """Whether a tensor of `shape` broadcasts to `target` without growing it."""
    shape, target = tuple(shape), tuple(target)
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1]))


def as_rows4(t, name: str):
    """t as [n0, n1, n2, D] (leading 1s for fewer dims; the last dim contiguous): (sizes, strides) of the leading
    three dims. CannotImplement for more than 4 dims or a strided last dim."""
    if t.dim() < 1 or t.dim() > 4:
        raise CannotImplement(f"{name} has {t.dim()} dims; rope kernels take 1 to 4")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise CannotImplement(f"{name}'s last dim is not contiguous (stride {tuple(t.stride())})")
    pad = 4 - t.dim()
    sizes = (1,) * pad + tuple(int(s) for s in t.shape[:-1])
    strides = (0,) * pad + tuple(int(s) for s in t.stride()[:-1])
    return sizes, strides


class RopeKernel:
    """One compiled rope library as a callable on CUDA tensors of its dtype.

    `kernel.apply(x, cos, sin, form)`: x of up to 4 dims, last dim D (even) contiguous; cos and sin broadcast to
    x's shape (e.g. [S, D] tables against [B, H, S, D]). The output has x's layout (`empty_like`).
    `kernel.apply_qk(q, k, cos, sin, form)`: both in one launch, (q_out, k_out).
    """

    def __init__(self, library: Library) -> None:
        import torch

        self.library = library
        self.symbol = library.source.symbols[0]
        handle = load_rope(library, self.symbol)
        self._fn = getattr(handle, self.symbol)
        code = int(handle.fr_rope_element())
        names = {c: n for n, (_, c, _, _) in _DTYPES.items()}
        if code not in names:
            raise CompileError(f"{library.path}: unknown element code {code}")
        self.dtype = getattr(torch, names[code])
        self._args = FrRopeArgs()

    def apply(self, x, cos, sin, form: str = "half", out=None):
        return self._run([(x, out)], cos, sin, form)[0]

    def apply_qk(self, q, k, cos, sin, form: str = "half"):
        return tuple(self._run([(q, None), (k, None)], cos, sin, form))

    def _fill(self, slot, x, y, cos, sin) -> None:
        n, xs = as_rows4(x, "x")
        _, ys = as_rows4(y, "out")
        cb, sb = cos.expand(x.shape), sin.expand(x.shape)
        _, cs = as_rows4(cb, "cos")
        _, ss = as_rows4(sb, "sin")
        slot.x, slot.y, slot.cos, slot.sin = x.data_ptr(), y.data_ptr(), cos.data_ptr(), sin.data_ptr()
        slot.n[:] = n
        slot.x_stride[:], slot.y_stride[:], slot.cos_stride[:], slot.sin_stride[:] = xs, ys, cs, ss

    def _run(self, pairs, cos, sin, form: str):
        import torch

        if form not in FORMS:
            raise CannotImplement(f"rope form {form!r} is not one of {', '.join(FORMS)}")
        x0 = pairs[0][0]
        if x0.device.type != "cuda":
            raise CannotImplement(f"rope kernels run on CUDA tensors, got {x0.device}")
        D = int(x0.shape[-1])
        outs = []
        a = self._args
        for i, (x, out) in enumerate(pairs):
            for name, t in (("x", x), ("cos", cos), ("sin", sin)):
                if t.dtype != self.dtype:
                    raise CannotImplement(f"{name} is {t.dtype}, the kernel takes {self.dtype}")
                if t.device != x0.device:
                    raise CannotImplement(f"{name} is on {t.device}, x on {x0.device}")
            if int(x.shape[-1]) != D:
                raise CannotImplement(f"q and k differ in their last dim ({D} and {int(x.shape[-1])})")
            if not (broadcasts_to(cos.shape, x.shape) and broadcasts_to(sin.shape, x.shape)):
                raise CannotImplement(f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)} do not broadcast to x "
                                      f"{tuple(x.shape)}")
            if out is None:
                out = torch.empty_like(x)
            elif tuple(out.shape) != tuple(x.shape) or out.dtype != self.dtype or out.device != x.device:
                raise CannotImplement(f"out must be a {self.dtype} tensor of shape {tuple(x.shape)}")
            self._fill(a.t[i], x, out, cos, sin)
            outs.append(out)
        a.count, a.D, a.form = len(pairs), D, FORMS[form]
        a.stream = torch.cuda.current_stream(x0.device).cuda_stream
        status = int(self._fn(ctypes.byref(a)))
        if status == EINVAL:
            raise CannotImplement(f"{self.symbol} refused {form} rope of {[tuple(x.shape) for x, _ in pairs]}")
        if status != 0:
            raise LaunchError(f"{self.symbol}: CUDA error {status}")
        return outs


def rotate(x, form: str):
    """rot(x) of the form, in torch ops (the reference and the model's own spelling)."""
    import torch

    if form == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def reference(x, cos, sin, form: str):
    """x * cos + rot(x) * sin in float64 (what the GPU tests compare against)."""
    x64 = x.double()
    return x64 * cos.double() + rotate(x64, form) * sin.double()
