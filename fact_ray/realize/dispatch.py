"""The native dispatcher: the composed module's kernel calls with no Python on the hot path.

`templates/fr_dispatch.cpp` is one small torch extension that the kernel libraries plug into: it defines the ops
`torch.ops.fact_ray_native.{gemm, attention, norm, rope, swiglu}` (CUDA impls that fill the C ABI structs, allocate from the
caching allocator and launch on the current stream; Meta impls for FakeTensor, torch.compile, torch.export and
AOTInductor) and `register_kernel`, which dlopens a kernel library, checks its ABI version and files its entry
points under a kernel id. The libraries themselves stay torch-free.

The kernel id is `"<library sha256>:<symbol>:<dtype>"`: content, not a path, so a graph (or an AOTInductor
package) that names it means the same bytes in any process. A fresh process registers the artifact's libraries
(`register_gemm` / `register_fused`, which `compose` calls), then runs.

Build: `torch.utils.cpp_extension.load` (JIT, `is_python_module=False`) into `<build cache>/dispatch/<key>/`,
where the key is a sha256 over the source, the ABI header, the flags and the torch, CUDA and Python versions. It
is built in a child process, in a temporary folder beside its entry, and moved into place with one `os.replace`
(as realize/build.py does), so a crash leaves no entry.

Load: `dlopen(RTLD_NOW | RTLD_LOCAL)` (its TORCH_LIBRARY registrations run as it loads), not
`torch.ops.load_library`, which loads with RTLD_GLOBAL. On the GPU image (torch 2.11, g++ 13) the extension came out
carrying C++ standard-library code of its own, and loaded globally it interposed on libraries loaded after it: an
AOTInductor package's wrapper crashed compiling a std::regex in a fresh process. Loaded locally, and built with
hidden visibility, its symbols serve itself only. (The same mix is why its error messages format numbers with std::to_string: see fr_dispatch.cpp.) A CPU-only torch builds it without the CUDA impls (`FR_DISPATCH_CUDA` unset):
the schemas, Meta impls and `register_kernel` are all there, so CPU tests check them. A failed build is one typed
error, `DispatchUnavailable`, whose message is the first compiler error line and the log's path.

Which path a composed module takes is `FACT_RAY_DISPATCH`: `auto` (default: native, or, where the extension cannot
be built, the Python custom ops of kernel.py / fused.py, said once on the log), `native` (a build failure is an
error) or `python` (the Python custom ops, asked for explicitly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ctypes
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from fact_ray.errors import CompileError, ConfigError, DispatchUnavailable, first_line
from fact_ray.types import file_sha256

log = logging.getLogger("fact_ray.dispatch")

NAMESPACE = "fact_ray_native"
SOURCE = "fr_dispatch.cpp"
HEADERS = ("fr_abi.h",)
DISPATCH_VERSION = 1  # bumped whenever what an entry holds changes
MODES = ("auto", "native", "python")
# Hidden visibility, inline template instantiations included, and whatever static archive the toolchain links
# in: the extension exports nothing a later library could bind to (see "Load" above); its ops register through
# static initialisers, which need no exported symbol. No GNU unique symbols either: g++ marks the static locals of
# inline standard-library code (to_chars' digit tables here) STB_GNU_UNIQUE, which the dynamic linker binds
# process-wide whatever RTLD_LOCAL and visibility say, so a library loaded after ours (an AOTInductor package)
# would share them.
_CFLAGS = ("-O2", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-fno-gnu-unique")
_LDFLAGS = ("-Wl,--exclude-libs,ALL",)
_LIB = "fact_ray_dispatch.so"

_TEMPLATES = Path(__file__).parent / "templates"
_state: dict[str, Any] = {"path": None, "failed": None, "said": False, "handle": None}

# Run in a child process: cpp_extension.load() would load the result into this process with RTLD_GLOBAL.
_BUILD_CHILD = """
import json, sys
from torch.utils import cpp_extension
a = json.loads(sys.argv[1])
print(cpp_extension.load(name=a["name"], sources=[a["source"]], extra_cflags=a["cflags"],
                         extra_ldflags=a["ldflags"], extra_include_paths=[a["include"]],
                         build_directory=a["build"], with_cuda=a["cuda"], is_python_module=False, verbose=False))
"""


# --------------------------------------------------------------------------------------------- build


def _cuda_build() -> bool:
    """A CUDA build of torch gets the CUDA impls (whether or not a GPU is present here)."""
    import torch

    return torch.version.cuda is not None


def build_key(source_text: str, headers_text: str, flags: tuple[str, ...], torch_version: str,
              cuda_version: str, python: str) -> str:
    h = hashlib.sha256()
    for part in ("fact-ray-dispatch", str(DISPATCH_VERSION), source_text, headers_text, "\0".join(flags),
                 torch_version, cuda_version, python):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _inputs() -> tuple[str, tuple[str, ...], str]:
    """(source text, flags, key) for this process's torch."""
    import torch

    source = (_TEMPLATES / SOURCE).read_text()
    headers = "".join((_TEMPLATES / h).read_text() for h in HEADERS)
    flags = _CFLAGS + (("-DFR_DISPATCH_CUDA",) if _cuda_build() else ()) + _LDFLAGS
    python = f"{sys.implementation.cache_tag}-{platform.machine()}"
    key = build_key(source, headers, flags, torch.__version__, str(torch.version.cuda), python)
    return source, flags, key


def entry_dir(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / "dispatch" / key


def _read_entry(d: Path, key: str) -> Optional[Path]:
    """The entry's library if the entry is whole, else None (a miss: rebuilt)."""
    try:
        meta = json.loads((d / "meta.json").read_text())
        so = d / _LIB
        if meta.get("key") != key or meta.get("version") != DISPATCH_VERSION:
            return None
        if so.stat().st_size != meta.get("so_size") or file_sha256(so) != meta.get("so_sha256"):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return so


def _default_cache_dir() -> str:
    from fact_ray.config import load

    return load().resolved_cache_dir


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """The extension's library for this torch, built if the cache has none. Raises DispatchUnavailable."""
    cache_dir = Path(cache_dir or _default_cache_dir())
    source, flags, key = _inputs()
    final = entry_dir(cache_dir, key)
    so = _read_entry(final, key)
    if so is not None:
        return so
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
    name = f"fact_ray_dispatch_{key[:16]}"
    try:
        (tmp / SOURCE).write_text(source)
        t0 = time.monotonic()
        log.warning("building the native dispatcher for torch %s (once per torch version)", _torch_version())
        args = {"name": name, "source": str(tmp / SOURCE), "include": str(_TEMPLATES), "build": str(tmp),
                "cflags": [f for f in flags if f not in _LDFLAGS], "ldflags": list(_LDFLAGS), "cuda": _cuda_build()}
        try:
            proc = subprocess.run([sys.executable, "-c", _BUILD_CHILD, json.dumps(args)], capture_output=True,
                                  text=True, timeout=1800)
            ok, text = proc.returncode == 0, proc.stdout + proc.stderr
        except (OSError, subprocess.SubprocessError) as e:
            ok, text = False, f"error: the build process did not run: {e}"
        built = Path(proc.stdout.strip().splitlines()[-1]) if ok and proc.stdout.strip() else None
        if built is None or not built.is_file():
            failed = final.parent / f"failed-{key[:16]}.log"
            failed.write_text(text)
            raise DispatchUnavailable(f"the native dispatcher did not build: {first_line(text)} "
                                      f"(log: {failed})")
        shutil.copyfile(built, tmp / _LIB)
        meta = {"version": DISPATCH_VERSION, "key": key, "torch": _torch_version(), "flags": list(flags),
                "seconds": round(time.monotonic() - t0, 3), "built_at": time.time(),
                "so_size": (tmp / _LIB).stat().st_size, "so_sha256": file_sha256(tmp / _LIB)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        from fact_ray.realize.build import install_entry  # late: loading from the cache never needs build.py

        install_entry(tmp, final, lambda: _read_entry(final, key) is not None)
        return final / _LIB
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _torch_version() -> str:
    import torch

    return f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"


def load(cache_dir: str | os.PathLike | None = None) -> str:
    """Build (or find) and load the extension once per process; its path. Raises DispatchUnavailable."""
    import torch

    if _state["path"] is not None:
        return _state["path"]
    if _state["failed"] is not None:
        raise DispatchUnavailable(_state["failed"])
    try:
        so = build(cache_dir)
        try:
            _state["handle"] = ctypes.CDLL(str(so), mode=os.RTLD_NOW | os.RTLD_LOCAL)  # see "Load" above
        except OSError as e:
            raise DispatchUnavailable(f"the native dispatcher does not load: {first_line(e, named=False)}") from None
        torch.ops.loaded_libraries.add(str(so))  # as torch.ops.load_library records what it loads
        _state["path"] = str(so)
    except DispatchUnavailable as e:
        _state["failed"] = str(e)
        raise
    return _state["path"]


def mode() -> str:
    value = os.environ.get("FACT_RAY_DISPATCH", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"FACT_RAY_DISPATCH={value!r}: one of {', '.join(MODES)}")
    return value


def available(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether composed modules call the native ops here (see the module doc for FACT_RAY_DISPATCH). In `auto`
    mode a build that fails is said once, on the log, and the Python custom ops are used."""
    m = mode()
    if m == "python":
        return False
    try:
        load(cache_dir)
        return True
    except DispatchUnavailable as e:
        if m == "native":
            raise
        if not _state["said"]:
            _state["said"] = True
            log.warning("%s; composed modules call their kernels through Python custom ops instead "
                        "(FACT_RAY_DISPATCH=python says this is meant)", e)
        return False


def has_cuda() -> bool:
    """Whether the loaded extension carries the CUDA impls (False on a CPU-only torch)."""
    import torch

    load()
    return bool(torch.ops.fact_ray_native.has_cuda())


# --------------------------------------------------------------------------------------------- registration


def kernel_id(library_sha256: str, symbol: str, dtype: str) -> str:
    return f"{library_sha256}:{symbol}:{dtype}"


_DIGESTS: dict[tuple, str] = {}


def _digest(path: str) -> str:
    """The library's sha256, hashed once per file version (trials register many configs of one library)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def _register(kid: str, path: str, symbol: str, family: str, dtype: str, **gemm: Any) -> str:
    import torch

    load()
    try:
        torch.ops.fact_ray_native.register_kernel(kid, str(path), symbol, family, dtype, **gemm)
    except (RuntimeError, ValueError) as e:  # the library is not one of ours: that kernel's verdict
        raise CompileError(first_line(e, named=False)) from None
    return kid


def register_gemm(library_path: str, symbol: str, problem: Any, split_k: int = 1,
                  digest: Optional[str] = None) -> str:
    """File one GEMM configuration of a library with the dispatcher; returns its kernel id (idempotent)."""
    from fact_ray.realize.kernel import has_bias, has_residual

    digest = digest or _digest(library_path)
    kid = kernel_id(digest, symbol, problem.dtype)
    return _register(kid, library_path, symbol, "gemm", problem.dtype, col_a=problem.layout_a == "col",
                     col_b=problem.layout_b == "col", bias=has_bias(problem), residual=has_residual(problem),
                     split_k=max(1, int(split_k)))


# KernelConfig.template -> the dispatcher's family (the C ABI the library speaks)
_FUSED_FAMILY = {"attention_sm80": "attention", "fmha_sm90": "fmha", "norm": "norm", "rope": "rope"}
# The entry point each family's library is filed under: attention and FMHA libraries export fixed prefixes; a
# norm or rope library exports one run function per launch shape, named by its config (default: the general norm).
_FIXED_SYMBOL = {"attention": "fr_attn", "fmha": "fr_fmha", "norm": "fr_norm_run"}


def register_fused(library_path: str, template: str, problem: Any, digest: Optional[str] = None,
                   symbol: Optional[str] = None) -> str:
    """File an attention, FMHA, norm or rope library (for the problem's dtype) with the dispatcher; its kernel id.
    `symbol`: the norm or rope run function (the library's Source.symbols[0])."""
    family = _FUSED_FAMILY.get(template)
    if family is None:
        raise CompileError(f"template {template!r} is not one the dispatcher runs ({', '.join(_FUSED_FAMILY)})")
    if family in ("attention", "fmha") or not symbol:
        symbol = _FIXED_SYMBOL.get(family)
        if symbol is None:
            raise CompileError(f"a {family} library is registered under its run function's name: none given")
    digest = digest or _digest(library_path)
    kid = kernel_id(digest, symbol, problem.dtype)
    return _register(kid, library_path, symbol, family, problem.dtype)


# Templates whose libraries the dispatcher runs as `fact_ray_native.swiglu` (the GEMM ABI, one symbol per config).
SWIGLU_TEMPLATES = ("sm90_swiglu",)


def register_swiglu(library_path: str, symbol: str, problem: Any, digest: Optional[str] = None) -> str:
    """File one SwiGLU configuration of a library (realize/swiglu.py) with the dispatcher; its kernel id. One
    kernel serves SwiGLUs with and without biases (the bias pointer is an argument), so the id names no bias."""
    digest = digest or _digest(library_path)
    kid = kernel_id(digest, symbol, problem.dtype)
    return _register(kid, library_path, symbol, "swiglu", problem.dtype)


def is_registered(kid: str) -> bool:
    import torch

    load()
    return bool(torch.ops.fact_ray_native.is_registered(kid))


# --------------------------------------------------------------------------------------------- binding


@dataclass(frozen=True)
class Binding:
    """How a composed graph calls one kernel: `op(*operands, *extra)`. `name` is the op's qualified name
    (`fact_ray_native.gemm`, or `fact_ray.<name>` for a Python custom op); `kernel` the native kernel id."""

    op: Any
    name: str
    extra: tuple = ()
    kernel: str = ""

    @property
    def native(self) -> bool:
        return bool(self.kernel)


def bind_gemm(library: Any, config: Any, problem: Any, symbol: str, native: bool,
              digest: Optional[str] = None) -> Binding:
    """`fact_ray_native.gemm(a, b, bias, residual, kernel)` where `native`, else the Python custom op. `digest`:
    the library file's sha256 where the caller knows it."""
    import torch

    if native:
        kid = register_gemm(library.path, symbol, problem, config.split_k, digest=digest)
        return Binding(torch.ops.fact_ray_native.gemm.default, f"{NAMESPACE}.gemm", (kid,), kid)
    from fact_ray.realize.kernel import GemmKernel, op_name, register_op

    register_op(GemmKernel(library, config, problem), problem)
    name = op_name(config, problem, library.key)
    return Binding(getattr(torch.ops.fact_ray, name).default, f"fact_ray.{name}")


def bind_fused(family: Any, library: Any, config: Any, problem: Any, native: bool,
               digest: Optional[str] = None) -> Binding:
    """`fact_ray_native.attention(q, k, v, causal, scale, kernel)` / `norm(x, weight, bias, eps, kind, kernel)` /
    `rope(x, cos, sin, form, kernel)` where `native` and the dispatcher runs the family's template, else the
    family's Python custom op (realize/fused.py's FusedFamily)."""
    import torch

    if native and config.template in _FUSED_FAMILY:
        symbols = library.source.symbols
        kid = register_fused(library.path, config.template, problem, digest=digest,
                             symbol=symbols[0] if symbols else None)
        op, extra = family.native_call(problem, kid)
        return Binding(getattr(torch.ops.fact_ray_native, op).default, f"{NAMESPACE}.{op}", (*extra, kid), kid)
    name, _ = family.register_op(problem, config, library)
    return Binding(getattr(torch.ops.fact_ray, name).default, f"fact_ray.{name}")


def bind_swiglu(library: Any, problem: Any, symbol: str, digest: Optional[str] = None) -> Binding:
    """`fact_ray_native.swiglu(a, b_gate, b_up, bias_gate, bias_up, kernel)`: the native op of the swiglu family
    (its Python custom op is the family's own, realize/swiglu_family.py)."""
    import torch

    kid = register_swiglu(library.path, symbol, problem, digest=digest)
    return Binding(torch.ops.fact_ray_native.swiglu.default, f"{NAMESPACE}.swiglu", (kid,), kid)


def caller(binding: Binding) -> Callable[..., Any]:
    """The bound op as a function of the operands alone."""
    op, extra = binding.op, binding.extra
    return lambda *operands: op(*operands, *extra)


# --------------------------------------------------------------------------------------------- trials


def composed_gemm(kernel: Any, device: Any) -> Callable[..., Any]:
    """What a trial times for a verified GEMM kernel: the very call a composed module will make, the native op
    where the dispatcher runs here, else the kernel itself (a Python custom op adds only its own wrapper). Planted
    test kernels (not a GemmKernel) and non-CUDA devices time the kernel as given."""
    from fact_ray.realize.kernel import GemmKernel

    if type(kernel) is not GemmKernel or getattr(device, "type", str(device)) != "cuda" or not available():
        return kernel
    binding = bind_gemm(kernel.library, kernel.config, kernel.problem, kernel.symbol, True)
    return caller(binding)


def composed_fused(family: Any, problem: Any, config: Any, library: Any) -> Callable[..., Any]:
    """As composed_gemm, for a fused family's library: `fn(*operands)` through the native op where the dispatcher
    runs here (and runs the family's template), else the family's kernel_fn (what its Python custom op wraps)."""
    if config.template in _FUSED_FAMILY and available():
        return caller(bind_fused(family, library, config, problem, True))
    if config.template in SWIGLU_TEMPLATES and available():
        from fact_ray.realize.kernel import symbol_of

        return caller(bind_swiglu(library, problem, symbol_of(library, config)))
    return family.kernel_fn(problem, library)
