"""Loading a built library: dlopen once per path, declare its C signatures, check the ABI version it speaks.

Every kernel family (GEMM, attention, FMHA, norm) exports `int fr_abi_version(void)` plus its own functions. A
failed build, a .so that will not load, one without the expected functions or one of another ABI version makes
every configuration in it unusable: that is a `CompileError` (a candidate error), so it costs those trials and
not the run. No torch here: an artifact loads its libraries without the build step or a GPU.
"""

from __future__ import annotations

import ctypes
from typing import Any, Mapping, Sequence

from fact_ray.errors import CompileError, first_line
from fact_ray.types import Library

_LOADED: dict[tuple[str, str], ctypes.CDLL] = {}  # (path, abi): one family's loader never takes another's .so

Signatures = Mapping[str, tuple[Sequence[Any], Any]]  # C function -> (argtypes, restype)


def load_checked(library: Library, kind: str, abi: str, version: int,
                 signatures: Signatures | None = None) -> ctypes.CDLL:
    """`library` dlopened (once per path and ABI) with `signatures` declared and `fr_abi_version() == version`.
    Errors name the library as `kind` ("an attention") and its ABI as `abi` ("attention ABI")."""
    if not library.ok:
        raise CompileError(first_line(library.log), library.log)
    if (library.path, abi) in _LOADED:
        return _LOADED[library.path, abi]
    try:
        handle = ctypes.CDLL(library.path, mode=ctypes.RTLD_LOCAL)
    except OSError as e:
        raise CompileError(f"cannot load {library.path}: {e}") from None
    try:
        for name, (argtypes, restype) in {"fr_abi_version": ([], ctypes.c_int), **(signatures or {})}.items():
            fn = getattr(handle, name)
            fn.argtypes, fn.restype = list(argtypes), restype
    except AttributeError as e:
        raise CompileError(f"{library.path} is not {kind} library: {e}") from None
    found = int(handle.fr_abi_version())
    if found != version:
        raise CompileError(f"{library.path} speaks {abi} version {found}, this fact-ray speaks {version}: "
                           "rebuild it from the current templates")
    _LOADED[library.path, abi] = handle
    return handle
