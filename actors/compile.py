"""Compile work as Ray CPU tasks, and the driver-side fan-out that accounts for every translation unit.

A compile task builds one `Source` with `fact_ray.realize.build.build` on whichever node Ray picks and returns two
objects: the `Compiled` metadata (small: the driver reads it for progress) and the `.so` bytes (about 1 MB: they
stay in the object store until a GPU worker, or the table writer, asks for them). Nothing travels through a
shared local path, so compile and GPU nodes need no common file system.

Retries: `max_retries` covers only system failures (a worker process or node died mid-compile); Ray then runs
the task again elsewhere. `retry_exceptions=False`: a compile error is a result (`Library.ok` False with the
log), never an exception, and an exception from `build` is a bug or a user error (no nvcc) that must show.
"""

from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import ray

from fact_ray.errors import UserError, first_line
from fact_ray.types import Arch, Library, Source

# Peak host memory of one nvcc (cutlass-notes §7): a fused sm90 TU about 3.5-5.4 GB, sm80 TUs under 1 GB. Asking
# Ray for it keeps a node from running more sm90 compiles than its memory holds (memory, not cores, is the limit).
COMPILE_MEMORY = {Arch.SM90: 5 * 2**30, Arch.SM80: 1 * 2**30}
DEFAULT_MAX_RETRIES = 3


@dataclass(frozen=True)
class Compiled:
    """What a compile task reports. `library.path` is local to the node that built it (`host`)."""

    library: Library
    host: str
    node_id: str
    so_sha256: str = ""  # of the bytes returned beside this record ("" when the build failed)
    so_size: int = 0


@ray.remote(num_cpus=1, max_retries=DEFAULT_MAX_RETRIES, retry_exceptions=False, num_returns=2)
def compile_source(source: Source, cache_dir: str, nvcc: str, shared: str = "") -> tuple[Compiled, bytes]:
    """Build one translation unit. Returns (metadata, .so bytes or b""). `shared`: the cluster's shared build cache
    (fact_ray.shared_cache), pulled from before building and pushed to after a fresh build."""
    from fact_ray.realize.build import build, key_of  # the codegen stack loads on the worker, not at import

    remote = None
    if shared:
        from fact_ray.shared_cache import SharedBuildCache

        remote = SharedBuildCache(shared)
        remote.pull(key_of(source, nvcc), cache_dir)
    lib = build(source, cache_dir, nvcc)
    if remote is not None and lib.ok and not lib.cached:
        remote.push(lib.key, cache_dir)
    data = b""
    if lib.ok:
        with open(lib.path, "rb") as f:
            data = f.read()
    return (Compiled(lib, socket.gethostname(), ray.get_runtime_context().get_node_id(),
                     hashlib.sha256(data).hexdigest() if data else "", len(data)), data)


@dataclass(frozen=True)
class CompileOutcome:
    """One translation unit's fate as the driver saw it: built, failed to compile (a result: `library.log`), or
    lost (its task could not finish on any node within its retries; the reason is in `library.log`)."""

    source: Source
    library: Library
    host: str = ""
    node_id: str = ""  # the Ray node that built it
    lost: bool = False
    seconds: float = 0.0  # wall time from submission to result, as the driver saw it
    so_sha256: str = ""
    so_ref: Any = None  # ObjectRef of the .so bytes when built
    meta_ref: Any = None  # ObjectRef of the task's `Compiled` record (what a GPU worker gets with the bytes)

    @property
    def ok(self) -> bool:
        return self.library.ok


def unwrap_user_error(e: BaseException) -> None:
    """Re-raise the user-caused error (no nvcc, ...) carried by a failed Ray task as itself: one clear line."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        raise cause from None


def compile_all(sources: Sequence[Source], cache_dir: str, nvcc: str = "nvcc", *, max_in_flight: int = 0,
                max_retries: int = DEFAULT_MAX_RETRIES, on_done: Callable[[CompileOutcome], None] | None = None,
                shared: str = "") -> list[CompileOutcome]:
    """Compile every source on the cluster, reporting each outcome as it finishes (in completion order through
    `on_done`); returns them in the order of `sources`. `max_in_flight` 0 lets Ray's CPU slots bound the
    parallelism; a positive value also caps it from the driver (`--jobs`). `shared`: see `compile_source`."""
    pending = list(range(len(sources)))
    pending.reverse()  # pop() from the end keeps submission in source order
    running: dict[Any, tuple[int, Any, float]] = {}
    out: dict[int, CompileOutcome] = {}
    cap = max_in_flight if max_in_flight > 0 else len(sources)
    while pending or running:
        while pending and len(running) < cap:
            i = pending.pop()
            src = sources[i]
            meta_ref, so_ref = compile_source.options(
                max_retries=max_retries, memory=COMPILE_MEMORY.get(src.arch, COMPILE_MEMORY[Arch.SM90]),
            ).remote(src, cache_dir, nvcc, shared)
            running[meta_ref] = (i, so_ref, time.monotonic())
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            i, so_ref, t0 = running.pop(ref)
            outcome = _collect(sources[i], ref, so_ref, time.monotonic() - t0)
            out[i] = outcome
            if on_done is not None:
                on_done(outcome)
    return [out[i] for i in range(len(sources))]


def _collect(source: Source, meta_ref: Any, so_ref: Any, seconds: float) -> CompileOutcome:
    try:
        c: Compiled = ray.get(meta_ref)
    except ray.exceptions.RayTaskError as e:
        unwrap_user_error(e)
        raise  # a bug in build: let it show with its traceback
    except ray.exceptions.RayError as e:
        # Worker or node deaths beyond the retries: the unit is accounted for as lost, with the reason.
        reason = f"compile task lost: {first_line(e)}"
        lib = Library(source=source, key="", ok=False, log=reason)
        return CompileOutcome(source, lib, lost=True, seconds=seconds)
    # The Source object built on the worker equals ours; keep ours so identity-based lookups stay valid.
    lib = replace(c.library, source=source)
    return CompileOutcome(source, lib, host=c.host, node_id=c.node_id, seconds=seconds, so_sha256=c.so_sha256,
                          so_ref=so_ref if lib.ok else None, meta_ref=meta_ref)
