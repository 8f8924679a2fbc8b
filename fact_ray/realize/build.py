"""Sources -> shared libraries with nvcc, through a content-addressed cache.

Cache key: sha256 over the source text, the nvcc version string, the flags (without include paths, which
differ between machines sharing a cache), the CUTLASS version and the target architectures. An entry is
`<cache>/<key[:2]>/<key>/` holding `lib.so`, `meta.json`, `build.log` and the source (`<name>.cu`, to rerun the
logged command by hand); it is assembled in a temporary folder
beside it and moved into place with one `os.replace`, so a crash leaves no entry, only an ignored temp folder.
A damaged entry (no .so, unreadable meta.json, size or hash mismatch) is a miss and is rebuilt.

A compile error is a fact about the candidates in that TU, not a failure of the run: it comes back as
Library(ok=False, log=<whole log>) and is cached like a success. A failure of the machine is not: nvcc or one of
its children (cicc, ptxas, cudafe++) killed by a signal (the OOM killer on a several-GB sm90a TU, a user), nvcc
exiting 128 + a signal number, or the time limit. Such a build is retried (`MACHINE_RETRIES`), and if it fails
again it comes back as Library(ok=False) with a log that says so, and nothing is cached: the next run compiles it
again. A missing nvcc is the user's to fix: NotAvailable.

nvcc runs in its own process group, killed whole on a timeout or an interrupt, so no orphaned cicc or cudafe++
keeps eating memory. A build killed with its driver (SIGKILL, a lost Ray worker) leaves a `.tmp-*` folder
holding an `owner` file (host, pid); `sweep_stale` (run by `build_many`) removes the folders whose owner on this
host is dead, after killing any compiler process still working inside them.

A miss compiles once per cache, not once per builder: the compile runs under an exclusive flock on
`<cache>/.locks/<key>` (single flight), and a builder that waited there finds the entry the other installed and
returns it as a hit. The kernel drops a flock when its holder dies, so a killed builder never blocks the next; the
lock files stay (a few bytes each; unlinking one while another process waits on it would let a third lock a new
file beside it). Where the file system refuses flock, builds run unserialised, as safe as before (atomic
installs), only doing the work twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from fact_ray.errors import NotAvailable
from fact_ray.toolchain import resolve_nvcc, cutlass_version, nvcc_version  # what the cache key names
from fact_ray.types import Library, Source, file_sha256

BASE_FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-shared",
              "-Xcompiler", "-fvisibility=hidden")  # see FR_EXPORT in fr_abi.h

META_VERSION = 1
DEFAULT_TIMEOUT_S = 1800.0
# A machine failure (signal, OOM, timeout) is retried this many times before the build is reported failed
# (uncached). One retry: an OOM kill under a burst of parallel sm90a compiles rarely repeats.
MACHINE_RETRIES = 1
OWNER = "owner"  # in a temp build folder: "<host> <pid>" of the process building there
LOCKS = ".locks"  # in a cache: one flock file per key being (or once) built; see the module docstring


@functools.lru_cache(maxsize=None)
def include_paths() -> tuple[str, ...]:
    import cutlass_library

    root = Path(cutlass_library.__file__).parent / "source"
    paths = (root / "include", root / "tools" / "util" / "include")
    for p in paths:
        if not (p / "cutlass").is_dir():
            raise NotAvailable(f"CUTLASS headers missing under {p}: reinstall nvidia-cutlass")
    return tuple(str(p) for p in paths)


def _gencodes(source: Source) -> list[str]:
    codes = [f for f in source.flags if f.startswith("-gencode=")]
    if not codes:
        raise ValueError(f"source {source.name}: its flags name no -gencode target (the family that emitted it "
                         "sets them)")
    return codes


def flags_for(source: Source) -> tuple[str, ...]:
    """nvcc flags for a source: ours and the ones its family put on it; include paths excluded (they are added at
    invocation and not keyed)."""
    _gencodes(source)
    return BASE_FLAGS + tuple(source.flags)


def arch_targets(source: Source) -> str:
    return "+".join(g.rsplit(",code=", 1)[1] for g in _gencodes(source))


def header_dir(header: str, hints: Sequence[str] = (), nvcc: str = "nvcc") -> Optional[str]:
    """A folder holding `header`: the first of `hints`, the CUDA toolkit of `nvcc`, or an installed nvidia-* wheel
    (`nvidia/cu13/include`, `nvidia/<lib>/include`). None when there is none (the caller decides what that means)."""
    candidates = [Path(h) for h in hints]
    nvcc_path = shutil.which(nvcc)
    if nvcc_path:
        top = Path(nvcc_path).resolve().parent.parent
        candidates += [top / "include", *sorted(top.glob("targets/*/include"))]
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        candidates += [Path(base) / "cu13" / "include", *sorted(Path(base).glob("*/include"))]
    for c in candidates:
        if (c / header).is_file():
            return str(c)
    return None


def resolve_include(spec: str, source_name: str, nvcc: str = "nvcc", hints: Sequence[str] = ()) -> str:
    """One of a Source's include folders on this machine (see Source.include_dirs); NotAvailable (one line) when
    it is not here."""
    if spec.startswith("cutlass:"):
        path = Path(include_paths()[0]).parent / spec.removeprefix("cutlass:")
        if not path.is_dir():
            raise NotAvailable(f"{path} missing (the {source_name} TU needs it): reinstall nvidia-cutlass==4.2.0.0")
        return str(path)
    if spec.startswith("header:"):
        header = spec.removeprefix("header:")
        found = header_dir(header, hints, nvcc)
        if found is None:
            raise NotAvailable(f"{header} not found (the {source_name} TU includes it): neither the CUDA toolkit of "
                               f"{nvcc} nor an installed nvidia-* wheel has it; install the wheel that ships it "
                               "or pass its include folder")
        return found
    return spec


def build_key(source_text: str, nvcc_version: str, flags: Sequence[str], cutlass_version: str, arch: str) -> str:
    """sha256 over everything that decides the bytes of lib.so."""
    h = hashlib.sha256()
    for part in ("fact-ray-build", str(META_VERSION), source_text, nvcc_version, "\0".join(flags), cutlass_version,
                 arch):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def key_of(source: Source, nvcc: str = "nvcc") -> str:
    """The cache key `build` files `source` under (for a shared cache to look it up before building)."""
    return build_key(source.code, nvcc_version(nvcc), flags_for(source), cutlass_version(), arch_targets(source))


def entry_dir(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / key[:2] / key




def read_entry(cache_dir: str | os.PathLike, key: str) -> dict | None:
    """The entry's meta.json if the entry is whole, else None (a miss)."""
    d = entry_dir(cache_dir, key)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("meta_version") != META_VERSION:
        return None
    if not (d / "build.log").is_file():
        return None
    if meta.get("ok"):
        so = d / "lib.so"
        try:
            if so.stat().st_size != meta.get("so_size") or file_sha256(so) != meta.get("so_sha256"):
                return None
        except OSError:
            return None
    return meta


def _library(source: Source, key: str, meta: dict, cache_dir: str | os.PathLike, cached: bool) -> Library:
    d = entry_dir(cache_dir, key)
    log = (d / "build.log").read_text(errors="replace")
    return Library(source=source, key=key, ok=bool(meta["ok"]), path=str(d / "lib.so") if meta["ok"] else "",
                   log=log, seconds=0.0 if cached else float(meta["seconds"]), cached=cached)


def build(source: Source, cache_dir: str, nvcc: str = "nvcc", timeout_s: float = DEFAULT_TIMEOUT_S,
          include_dirs: Sequence[str] = ()) -> Library:
    """Compile one Source (or fetch it from the cache), whichever family wrote it: its flags and include folders
    travel on it. Never raises for bad C++; raises NotAvailable if the toolchain, or a folder the source needs, is
    missing. `include_dirs` come after CUTLASS's and, like them, are not keyed (machine paths)."""
    nvcc_path = resolve_nvcc(nvcc)
    flags = flags_for(source)
    key = key_of(source, nvcc)
    meta = read_entry(cache_dir, key)
    if meta is not None:
        return _library(source, key, meta, cache_dir, cached=True)
    # The source's own include folders, resolved on this node (every caller, the compile actor included, builds a
    # source the same way); a header it names may also be in one of the caller's folders.
    own = (resolve_include(spec, source.name, nvcc, include_dirs) for spec in source.include_dirs)
    include_dirs = tuple(dict.fromkeys((*include_dirs, *own)))

    final = entry_dir(cache_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with single_flight(cache_dir, key):
        meta = read_entry(cache_dir, key)  # built by the builder this one waited for
        if meta is not None:
            return _library(source, key, meta, cache_dir, cached=True)
        for attempt in range(MACHINE_RETRIES + 1):
            lib, cacheable = _compile(source, key, final, nvcc_path, nvcc, flags, include_dirs, timeout_s, cache_dir)
            if cacheable or attempt == MACHINE_RETRIES:
                return lib
    raise AssertionError("unreachable")


# errno values for "this file system does not do flock" (some NFS and FUSE mounts)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def single_flight(cache_dir: str | os.PathLike, key: str) -> Iterator[None]:
    """Hold the exclusive per-key build lock of a cache (blocking while another process or thread holds it).
    Each call opens its own file description, so threads of one process exclude each other too."""
    locks = Path(cache_dir) / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def machine_failure(rc: int, log: str) -> str:
    """Why a failed nvcc run is the machine's fault and not the source's ("" when it is the source's).

    nvcc reports a child killed by signal N as exit status 128 + N and prints "Killed" (the OOM killer sends
    SIGKILL to the biggest process, which is cicc); nvcc itself killed gives a negative status here."""
    if rc < 0:
        return f"nvcc was killed by signal {-rc}"
    if 128 < rc <= 128 + 64:
        return f"a compiler process was killed by signal {rc - 128} (out of memory?)"
    for marker in ("died due to signal", "out of memory", "std::bad_alloc", "Cannot allocate memory"):
        if marker in log:
            return f"the compiler ran out of memory or was killed ({marker!r} in its log)"
    return ""


def _compile(source: Source, key: str, final: Path, nvcc_path: str, nvcc: str, flags: Sequence[str],
             include_dirs: Sequence[str], timeout_s: float, cache_dir: str | os.PathLike) -> tuple[Library, bool]:
    """One nvcc run in a temp folder beside the entry: (library, whether its outcome was cached)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
    try:
        (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        (tmp / f"{source.name}.cu").write_text(source.code)
        includes = (f"-I{p}" for p in (*include_paths(), *include_dirs))
        cmd = [nvcc_path, *flags, *includes, "-o", "lib.so", f"{source.name}.cu"]
        t0 = time.monotonic()
        rc, log, timed_out = _run_group(cmd, tmp, timeout_s)
        if timed_out:
            log += f"\nfact-ray: nvcc timed out after {timeout_s:.0f} s\n"
            why = f"nvcc timed out after {timeout_s:.0f} s"
        else:
            why = machine_failure(rc, log) if rc != 0 else ""
        seconds = time.monotonic() - t0
        ok = rc == 0 and (tmp / "lib.so").is_file()
        header = f"$ {' '.join(cmd)}\n# exit status {rc}, {seconds:.1f} s\n"
        if why:
            header += f"# fact-ray: {why}: a failure of the machine, not of the source; not cached\n"
            return Library(source=source, key=key, ok=False, log=header + log, seconds=seconds), False
        (tmp / "build.log").write_text(header + log)
        meta = {"meta_version": META_VERSION, "key": key, "ok": ok, "source": source.name,
                "symbols": sorted(set(source.symbols)), "nvcc_version": nvcc_version(nvcc),
                "cutlass_version": cutlass_version(), "flags": list(flags), "arch": arch_targets(source),
                "seconds": round(seconds, 3), "exit_status": rc, "built_at": time.time()}
        if ok:
            meta |= {"so_size": (tmp / "lib.so").stat().st_size, "so_sha256": file_sha256(tmp / "lib.so")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        (tmp / OWNER).unlink()
        install_entry(tmp, final, lambda: read_entry(cache_dir, key) is not None)
        meta = read_entry(cache_dir, key) or meta
        return _library(source, key, meta, cache_dir, cached=False), True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_group(cmd: Sequence[str], cwd: Path, timeout_s: float) -> tuple[int, str, bool]:
    """Run nvcc in a process group of its own: (exit status, output, timed out). On a timeout or anything
    raised while waiting (KeyboardInterrupt), the whole group is killed: nvcc's children too."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, _ = proc.communicate()
        return -1, out or "", True
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass  # already gone


def _owner_alive(folder: Path) -> bool:
    """False only when the folder's owner file names a dead process of this host; a folder without one (an
    older fact-ray, or one just being created) or owned elsewhere (a shared cache) is left alone."""
    try:
        host, pid = (folder / OWNER).read_text().split()
        pid_n = int(pid)
    except (OSError, ValueError):
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _processes_in(folder: Path) -> list[int]:
    """Pids of this host's processes whose working folder is `folder` (orphaned cicc, cudafe++, ptxas)."""
    pids = []
    target = str(folder.resolve())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if cwd == target or cwd.startswith(target + "/"):
            pids.append(int(entry.name))
    return pids


def sweep_stale(cache_dir: str | os.PathLike) -> list[str]:
    """Remove temp build folders left by a build whose process died (killed run, lost node), after killing any
    compiler process still running in them. Returns the folders removed."""
    removed = []
    for tmp in Path(cache_dir).glob("*/.tmp-*"):
        if not tmp.is_dir() or _owner_alive(tmp):
            continue
        for pid in _processes_in(tmp) if Path("/proc").is_dir() else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(str(tmp))
    return removed


def install_entry(tmp: Path, final: Path, final_is_whole: Callable[[], bool]) -> None:
    """Move a finished entry folder into place atomically; a damaged entry there is moved aside first.
    (Also the native dispatcher's cache, realize/dispatch.py.)"""
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if final_is_whole():
            return  # another process finished the same build first: keep theirs
    trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(final, trash)
    except OSError:
        pass
    os.replace(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def build_many(sources: Sequence[Source], cache_dir: str, jobs: int = 0, nvcc: str = "nvcc",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Library]:
    """Build sources with up to `jobs` nvcc processes at once (0: one per CPU); results in input order.

    Identical sources are compiled once. Memory, not cores, bounds `jobs` for sm90 TUs (3.5-5.5 GB each).
    """
    resolve_nvcc(nvcc)  # fail once, up front, with the one-line fix
    sweep_stale(cache_dir)
    jobs = jobs or os.cpu_count() or 1
    unique: dict[str, Source] = {}
    for s in sources:
        unique.setdefault(s.code, s)
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(unique) or 1))) as pool:
        built = dict(zip(unique, pool.map(lambda s: build(s, cache_dir, nvcc, timeout_s), unique.values())))
    return [replace(built[s.code], source=s) for s in sources]


def exported_symbols(path: str | os.PathLike) -> set[str]:
    """Dynamic symbols a shared library defines (nm -D --defined-only), e.g. to check the C ABI."""
    nm = shutil.which("nm")
    if nm is None:
        raise NotAvailable("nm not found: install binutils to list a library's symbols")
    out = subprocess.run([nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return {parts[-1] for parts in (ln.split() for ln in out.splitlines()) if len(parts) >= 3 and parts[-2] in "TtWiu"}
