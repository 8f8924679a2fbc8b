"""Compiled GEMM kernels as PyTorch callables.

A `Library` is one .so exporting, per configuration, `<sym>_workspace`, `<sym>_can_implement` and `<sym>_run`
over the plain C struct `fr_gemm_args` (fr_abi.h, ABI version 1). This module:

* loads the .so with ctypes and checks its ABI version (`load_library`);
* wraps one symbol as a `GemmKernel` that takes torch tensors, checks them (dtype, shape, contiguity, 16-byte
  pointer alignment: CUTLASS's `can_implement` does not check pointers), fills the args, allocates the workspace
  from torch's caching allocator and launches on torch's current stream;
* registers a kernel as a `torch.library` custom op with a fake (meta) implementation, so a module that calls it
  still traces and exports (`register_op`);
* gives the PyTorch op of a problem (`torch_op`): the baseline every kernel is timed against, and in float64
  the reference it is verified against.

Semantics of every kernel and of `torch_op`: D[l] = act(A[l] @ B[l] + bias) + residual, where bias ([N]),
activation and residual are present only when the problem's epilogue says so.
"""

import ctypes
import hashlib
import math
import re
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fact_ray.errors import CannotImplement, CompileError, LaunchError
from fact_ray.realize.abi import load_checked
from fact_ray.types import GemmProblem, KernelConfig, Library, content_hash

ABI_VERSION = 1

# Pointers handed to CUTLASS must be 16-byte aligned (TMA, vectorised loads); can_implement only checks strides.
POINTER_ALIGN = 16

_BIAS_EPILOGUES = ("bias", "bias_act", "bias_residual")


class FrGemmArgs(ctypes.Structure):
    """Mirror of `fr_gemm_args` in fr_abi.h; field order and types must match it exactly."""

    _fields_ = [
        ("A", ctypes.c_void_p),
        ("B", ctypes.c_void_p),
        ("C", ctypes.c_void_p),
        ("D", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("M", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("L", ctypes.c_int64),
        ("lda", ctypes.c_int64),
        ("ldb", ctypes.c_int64),
        ("ldc", ctypes.c_int64),
        ("ldd", ctypes.c_int64),
        ("batch_stride_a", ctypes.c_int64),
        ("batch_stride_b", ctypes.c_int64),
        ("batch_stride_c", ctypes.c_int64),
        ("batch_stride_d", ctypes.c_int64),
        ("alpha", ctypes.c_float),
        ("beta", ctypes.c_float),
        ("split_k", ctypes.c_int32),
        ("sm_count", ctypes.c_int32),
        ("workspace", ctypes.c_void_p),
        ("workspace_size", ctypes.c_size_t),
        ("stream", ctypes.c_void_p),
    ]


# --------------------------------------------------------------------------------------------- loading

def load_library(library: Library) -> ctypes.CDLL:
    """dlopen a built GEMM library once per path and check that it speaks our ABI (see abi.load_checked)."""
    return load_checked(library, "a fact-ray kernel", "fr_abi", ABI_VERSION)


def symbol_of(library: Library, config: KernelConfig) -> str:
    """The C symbol prefix of `config` inside `library` (Source.symbols is in config order)."""
    for cfg, sym in zip(library.source.configs, library.source.symbols):
        if cfg.name == config.name:
            return sym
    raise ValueError(f"config {config.name} is not in library {library.source.name}")


# --------------------------------------------------------------------------------------------- shapes


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dt


def has_bias(problem: GemmProblem) -> bool:
    return problem.epilogue in _BIAS_EPILOGUES


def has_residual(problem: GemmProblem) -> bool:
    return problem.epilogue in ("bias_residual", "residual")


def operand_shapes(problem: GemmProblem) -> dict[str, Optional[tuple[int, ...]]]:
    """Shapes of a, b, bias, residual and out at the problem's own size (None: operand absent)."""
    p = problem
    batch = (p.L,) if p.L > 1 else ()
    a = batch + ((p.M, p.K) if p.layout_a == "row" else (p.K, p.M))
    b_batch = () if p.broadcast_b else batch
    b = b_batch + ((p.N, p.K) if p.layout_b == "col" else (p.K, p.N))
    out = batch + (p.M, p.N)
    return {
        "a": a,
        "b": b,
        "bias": (p.N,) if has_bias(p) else None,
        "residual": out if has_residual(p) else None,
        "out": out,
    }


def output_shape(problem: GemmProblem, a_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape for an A of shape `a_shape` (leading dims of A carry over, as in F.linear / matmul)."""
    if problem.layout_a == "row":
        return tuple(a_shape[:-1]) + (problem.N,)
    return tuple(a_shape[:-2]) + (a_shape[-1], problem.N)


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _dims(problem: GemmProblem, a: torch.Tensor) -> tuple[int, int]:
    """(M, L) as the kernel sees them for this A. For L == 1 problems every leading dim folds into M, so a
    Linear over [B, T, C] is one [B*T, C] GEMM; batched problems keep M and fold the leading dims into L."""
    if a.dim() < 2:
        raise CannotImplement(f"A must have at least 2 dims, got shape {tuple(a.shape)}")
    if problem.L == 1:
        if problem.layout_a == "row":
            return _prod(a.shape[:-1]), 1
        if a.dim() != 2:
            raise CannotImplement(f"column-major A must be 2-D, got shape {tuple(a.shape)}")
        return int(a.shape[1]), 1
    m = int(a.shape[-2] if problem.layout_a == "row" else a.shape[-1])
    return m, _prod(a.shape[:-2])


def check_operands(problem: GemmProblem, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> tuple[int, int]:
    """Raise CannotImplement (one line) unless these tensors fit the problem's kernel; return (M, L)."""
    p = problem
    dtype = torch_dtype(p.dtype)
    named = {"A": a, "B": b, "bias": bias, "residual": residual, "D": out}
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != dtype:
            raise CannotImplement(f"{name} is {str(t.dtype).removeprefix('torch.')}, the kernel takes {p.dtype}")
        if t.device != a.device:
            raise CannotImplement(f"{name} is on {t.device}, A on {a.device}")
        if not t.is_contiguous():
            raise CannotImplement(f"{name} is not contiguous (stride {tuple(t.stride())})")
        if t.data_ptr() % POINTER_ALIGN:
            raise CannotImplement(f"{name} is not {POINTER_ALIGN}-byte aligned (address % {POINTER_ALIGN} = "
                                  f"{t.data_ptr() % POINTER_ALIGN})")
    m, l = _dims(p, a)
    k_of_a = int(a.shape[-1] if p.layout_a == "row" else a.shape[-2])
    if k_of_a != p.K:
        raise CannotImplement(f"A has K = {k_of_a}, the kernel was built for K = {p.K}")
    if p.L > 1 and p.layout_a == "col" and a.dim() < 3:
        raise CannotImplement(f"batched A must be at least 3-D, got shape {tuple(a.shape)}")
    mat_b = (p.N, p.K) if p.layout_b == "col" else (p.K, p.N)
    want_b = mat_b if (p.L == 1 or p.broadcast_b) else tuple(a.shape[:-2]) + mat_b
    if tuple(b.shape) != want_b:
        raise CannotImplement(f"B has shape {tuple(b.shape)}, expected {want_b}")
    want_out = output_shape(p, tuple(a.shape))
    if has_bias(p):
        if bias is None or tuple(bias.shape) != (p.N,):
            raise CannotImplement(f"epilogue {p.epilogue} needs a bias of shape ({p.N},), got "
                                  f"{None if bias is None else tuple(bias.shape)}")
    elif bias is not None:
        raise CannotImplement(f"epilogue {p.epilogue} takes no bias")
    if has_residual(p):
        if residual is None or tuple(residual.shape) != want_out:
            raise CannotImplement(f"epilogue {p.epilogue} needs a residual of shape {want_out}, got "
                                  f"{None if residual is None else tuple(residual.shape)}")
    elif residual is not None:
        raise CannotImplement(f"epilogue {p.epilogue} takes no residual")
    if out is not None and tuple(out.shape) != want_out:
        raise CannotImplement(f"D has shape {tuple(out.shape)}, expected {want_out}")
    return m, l


# --------------------------------------------------------------------------------------------- kernel


class GemmKernel:
    """One configuration of a compiled library, callable on torch tensors.

    `kernel(a, b, bias, residual, out=None) -> out`. Per call it costs a few attribute writes into one reused
    args struct plus the C launch; `can_implement` and the workspace size are asked once per shape.
    Not safe to call from two streams at once (the workspace buffer is shared), as with any CUTLASS op.
    """

    # The kind of device the library's code runs on; the launch path below is CUDA's.
    device_type = "cuda"

    def __init__(self, library: Library, config: KernelConfig, problem: GemmProblem) -> None:
        self.library = library
        self.config = config
        self.problem = problem
        self.name = config.name
        self.symbol = symbol_of(library, config)
        handle = load_library(library)
        try:
            self._workspace_fn = getattr(handle, self.symbol + "_workspace")
            self._can_implement_fn = getattr(handle, self.symbol + "_can_implement")
            self._run_fn = getattr(handle, self.symbol + "_run")
        except AttributeError as e:
            raise CompileError(f"{library.path} lacks a symbol of {self.symbol}: {e}") from None
        ptr = ctypes.POINTER(FrGemmArgs)
        self._workspace_fn.argtypes = [ptr]
        self._workspace_fn.restype = ctypes.c_size_t
        self._can_implement_fn.argtypes = [ptr]
        self._can_implement_fn.restype = ctypes.c_int
        self._run_fn.argtypes = [ptr]
        self._run_fn.restype = ctypes.c_int
        self._args = FrGemmArgs()
        self._args_ref = ctypes.byref(self._args)
        self._dtype = torch_dtype(problem.dtype)
        self._split_k = max(1, int(config.split_k))
        self._shape_cache: dict[tuple, int] = {}  # (device, a.shape) -> workspace bytes, can_implement passed
        self._workspaces: dict[tuple, torch.Tensor] = {}  # (device, bytes) -> buffer
        self._sm_counts: dict[torch.device, int] = {}

    # -- device hooks (a host-side test library overrides these two) --

    def _stream(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def _sm_count(self, device: torch.device) -> int:
        # Persistent 3.x kernels query the SM count on every call when given 0: ask once per device.
        n = self._sm_counts.get(device)
        if n is None:
            n = self._sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return n

    # -- the call --

    def _fill(self, a, b, bias, residual, out, m: int, l: int) -> None:
        p, args = self.problem, self._args
        args.A, args.B, args.D = a.data_ptr(), b.data_ptr(), out.data_ptr()
        args.C = residual.data_ptr() if residual is not None else None
        args.bias = bias.data_ptr() if bias is not None else None
        args.M, args.N, args.K, args.L = m, p.N, p.K, l
        args.lda = p.K if p.layout_a == "row" else m
        args.ldb = p.K if p.layout_b == "col" else p.N
        args.ldc = p.N if residual is not None else 0
        args.ldd = p.N
        args.batch_stride_a = m * p.K
        args.batch_stride_b = 0 if p.broadcast_b else p.N * p.K
        args.batch_stride_c = m * p.N if residual is not None else 0
        args.batch_stride_d = m * p.N
        args.alpha = 1.0
        args.beta = 1.0 if residual is not None else 0.0
        args.split_k = self._split_k

    def _workspace(self, device: torch.device, nbytes: int) -> torch.Tensor:
        key = (device, nbytes)
        buf = self._workspaces.get(key)
        if buf is None:
            buf = self._workspaces[key] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf

    def check(self, a, b, bias=None, residual=None, out=None) -> tuple[int, int]:
        """Raise CannotImplement unless this kernel can run on these tensors (without launching)."""
        if a.device.type != self.device_type:
            raise CannotImplement(f"{self.name} runs on {self.device_type} tensors, got {a.device}")
        m, l = check_operands(self.problem, a, b, bias, residual, out)
        key = (a.device, tuple(a.shape))
        if key not in self._shape_cache:
            self._fill(a, b, bias, residual, out if out is not None else a, m, l)
            self._args.sm_count = self._sm_count(a.device)
            self._args.workspace, self._args.workspace_size, self._args.stream = None, 0, None
            status = int(self._can_implement_fn(self._args_ref))
            if status != 0:
                raise CannotImplement(f"{self.name}: can_implement rejects M={m} N={self.problem.N} "
                                      f"K={self.problem.K} L={l} (status {status})")
            self._shape_cache[key] = int(self._workspace_fn(self._args_ref))
        return m, l

    def __call__(self, a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        m, l = self.check(a, b, bias, residual, out)
        if out is None:
            out = torch.empty(output_shape(self.problem, tuple(a.shape)), dtype=self._dtype, device=a.device)
        nbytes = self._shape_cache[(a.device, tuple(a.shape))]
        self._fill(a, b, bias, residual, out, m, l)
        args = self._args
        args.sm_count = self._sm_count(a.device)
        if nbytes:
            ws = self._workspace(a.device, nbytes)
            args.workspace, args.workspace_size = ws.data_ptr(), nbytes
        else:
            args.workspace, args.workspace_size = None, 0
        args.stream = self._stream(a.device)
        status = int(self._run_fn(self._args_ref))
        if status != 0:
            raise LaunchError(f"{self.name}: run failed with status {status} (M={m} N={self.problem.N} "
                              f"K={self.problem.K} L={l})")
        return out


# --------------------------------------------------------------------------------------------- custom op

_OPS: dict[str, Callable] = {}
_OP_SCHEMA = "(Tensor a, Tensor b, Tensor? bias=None, Tensor? residual=None) -> Tensor"


def op_name(config: KernelConfig, problem: GemmProblem, library_key: str = "") -> str:
    """A stable, unique op name: readable prefix from the config name, suffix from the content."""
    stem = re.sub(r"[^0-9A-Za-z]+", "_", config.name).strip("_")[:48] or "gemm"
    if not stem[0].isalpha():
        stem = "k_" + stem
    digest = hashlib.sha256(content_hash(config, problem, library_key).encode()).hexdigest()[:12]
    return f"{stem}_{digest}"


def register_op(kernel: GemmKernel, problem: GemmProblem) -> Callable:
    """Register `kernel` as `torch.ops.fact_ray.<name>(a, b, bias=None, residual=None) -> Tensor`.

    The fake implementation checks shapes and returns an empty tensor of the right shape and dtype, so a module
    that calls the op traces, exports and compiles without running it. Registering the same kernel content
    twice returns the op already registered (torch allows one definition per name and process).
    """
    name = op_name(kernel.config, problem, kernel.library.key)
    if name in _OPS:
        return _OPS[name]
    dtype = torch_dtype(problem.dtype)

    def real(a, b, bias=None, residual=None):
        return kernel(a, b, bias, residual)

    def fake(a, b, bias=None, residual=None):
        # Same shape rules as the kernel, minus what fake tensors cannot answer (addresses).
        _check_fake(problem, a, b, bias, residual)
        return a.new_empty(output_shape(problem, tuple(a.shape)), dtype=dtype)

    op = torch.library.custom_op(f"fact_ray::{name}", real, mutates_args=(), schema=_OP_SCHEMA)
    op.register_fake(fake)
    _OPS[name] = op
    return op


def _check_fake(problem: GemmProblem, a, b, bias, residual) -> None:
    p = problem
    k_of_a = a.shape[-1] if p.layout_a == "row" else a.shape[-2]
    mat_b = (p.N, p.K) if p.layout_b == "col" else (p.K, p.N)
    problems = []
    if k_of_a != p.K:
        problems.append(f"A has K = {k_of_a}, expected {p.K}")
    if tuple(b.shape[-2:]) != mat_b:
        problems.append(f"B has shape {tuple(b.shape)}, expected [..., {mat_b[0]}, {mat_b[1]}]")
    if has_bias(p) != (bias is not None):
        problems.append(f"epilogue {p.epilogue} {'needs' if has_bias(p) else 'takes no'} bias")
    if has_residual(p) != (residual is not None):
        problems.append(f"epilogue {p.epilogue} {'needs' if has_residual(p) else 'takes no'} residual")
    if problems:
        raise ValueError("fact_ray op: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------- torch op

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "relu": F.relu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def torch_op(problem: GemmProblem) -> Callable:
    """The PyTorch op of the problem: `op(a, b, bias=None, residual=None) -> Tensor`.

    Runs in whatever dtype it is given: the problem's dtype for the baseline (cuBLAS through F.linear, matmul
    or bmm), float64 for the reference.
    """
    try:
        act = _ACTIVATIONS[problem.activation]
    except KeyError:
        raise ValueError(f"unknown activation {problem.activation!r}: one of {', '.join(_ACTIVATIONS)}") from None
    col_a, col_b = problem.layout_a == "col", problem.layout_b == "col"

    def op(a, b, bias=None, residual=None):
        if col_a:
            a = a.transpose(-1, -2)
        if col_b and b.dim() == 2:
            y = F.linear(a, b, bias)  # addmm with the bias fused, as an nn.Linear runs
        else:
            y = torch.matmul(a, b.transpose(-1, -2) if col_b else b)
            if bias is not None:
                y = y + bias
        y = act(y)
        if residual is not None:
            y = y + residual
        return y

    return op
