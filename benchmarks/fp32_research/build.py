"""Builds the fp32 research libraries into benchmarks/fp32_research/build/ with nvcc.

    python benchmarks/fp32_research/build.py [--jobs N] [--force] [name ...]

Each library is one translation unit; its .so is rebuilt only when the stamp (sha256 of its sources, the
shared headers, the flags and `nvcc --version`) changes. Outputs are written to a temporary name and moved
into place, so a killed build never leaves a half-written .so. ptxas -v output (registers, spills) is kept
next to each .so as <name>.log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
# The promoted TF32 mainloop the prototypes instantiate is fact-ray's production header, included from here.
TEMPLATES = HERE.parents[1] / "fact_ray" / "realize" / "templates"
FROM_TEMPLATES = frozenset({"fr_tf32x3_mainloop.hpp"})

# name -> (translation unit, uses CUTLASS, headers it includes: from this folder, or from TEMPLATES)
LIBRARIES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "split": ("split.cu", False, ()),
    "promo_a": ("promo_a.cu", True, ("fr_sm90_tf32x3.cuh", "fr_registry.h", "fr_tf32x3_mainloop.hpp")),
    "promo_b": ("promo_b.cu", True, ("fr_sm90_tf32x3.cuh", "fr_registry.h", "fr_tf32x3_mainloop.hpp")),
    "sm80_3xtf32": ("sm80_3xtf32.cu", True, ("fr_registry.h",)),
}

BASE_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
              "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC", "-shared", "-Xptxas", "-v"]


@dataclass(frozen=True)
class BuildResult:
    name: str
    so: str
    status: str  # "built" | "cached" | "stale" (an older .so kept: cannot rebuild here) | "failed"
    seconds: float = 0.0
    message: str = ""


def cutlass_include_dirs() -> list[Path]:
    """CUTLASS headers: $FR_CUTLASS_DIR (a CUTLASS checkout or the wheel's source/ folder) or cutlass_library."""
    root = os.environ.get("FR_CUTLASS_DIR")
    if root:
        base = Path(root)
    else:
        try:
            import cutlass_library  # the nvidia-cutlass wheel ships the headers under source/
        except ImportError as e:
            raise RuntimeError("CUTLASS headers not found: install nvidia-cutlass or set FR_CUTLASS_DIR") from e
        base = Path(cutlass_library.__file__).resolve().parent / "source"
    dirs = [base / "include", base / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "cutlass.h").exists():
        raise RuntimeError(f"CUTLASS headers not found under {base}")
    return dirs


def nvcc_path() -> str | None:
    return shutil.which("nvcc") or (str(Path("/usr/local/cuda/bin/nvcc")) if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _nvcc_version(nvcc: str | None) -> str:
    """The release line only ("Cuda compilation tools, release 13.0, V13.0.88"): build dates differ between
    installs of the same compiler and must not force a rebuild."""
    if not nvcc:
        return "none"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return next((ln.strip() for ln in out.splitlines() if "release" in ln), out)


def source_path(name: str) -> Path:
    return (TEMPLATES if name in FROM_TEMPLATES else HERE) / name


def stamp(name: str, nvcc: str | None) -> str:
    """'<sha256 of sources and flags> <nvcc release line>'."""
    tu, _, headers = LIBRARIES[name]
    h = hashlib.sha256()
    for f in (tu, *headers):
        h.update(f.encode())
        h.update(source_path(f).read_bytes())
    h.update(" ".join(BASE_FLAGS).encode())
    return f"{h.hexdigest()} {_nvcc_version(nvcc)}"


def _same_build(have: str, want: str, nvcc: str | None) -> bool:
    # Without nvcc here the compiler cannot be compared: the sources and flags decide.
    return have == want or (nvcc is None and have.split(" ", 1)[0] == want.split(" ", 1)[0])


def so_path(name: str) -> Path:
    return BUILD / f"{name}.so"


def build_one(name: str, force: bool = False) -> BuildResult:
    tu, uses_cutlass, _ = LIBRARIES[name]
    so = so_path(name)
    nvcc = nvcc_path()
    want = stamp(name, nvcc)
    stamp_file = so.with_suffix(".so.stamp")
    have = stamp_file.read_text().strip() if stamp_file.exists() else ""
    same = _same_build(have, want, nvcc)
    if so.exists() and not force and (same or nvcc is None):
        return BuildResult(name, str(so), "cached" if same else "stale",
                           message="" if same else "sources changed but no nvcc here to rebuild")
    if nvcc is None:
        return BuildResult(name, str(so), "failed", message="no nvcc on PATH and no prebuilt .so")
    BUILD.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, *BASE_FLAGS, f"-I{HERE}", f"-I{TEMPLATES}"]
    if uses_cutlass:
        try:
            cmd += [f"-I{d}" for d in cutlass_include_dirs()]
        except RuntimeError as e:
            # a .so built elsewhere from the same sources (only the compiler line differs) is still usable
            return BuildResult(name, str(so), "stale" if so.exists() else "failed", message=str(e))
    tmp = so.with_name(f".{name}.{os.getpid()}.so")
    cmd += [str(HERE / tu), "-o", str(tmp)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.time() - t0
    log = proc.stdout + proc.stderr
    (BUILD / f"{name}.log").write_text(" ".join(cmd) + "\n\n" + log)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((ln for ln in log.splitlines() if "error" in ln), (log.strip().splitlines() or [""])[-1])
        status = "stale" if so.exists() and have.split(" ", 1)[0] == want.split(" ", 1)[0] else "failed"
        return BuildResult(name, str(so), status, secs, f"nvcc exit {proc.returncode}: {first}")
    os.replace(tmp, so)
    tmp_stamp = stamp_file.with_name(stamp_file.name + f".{os.getpid()}")
    tmp_stamp.write_text(want + "\n")
    os.replace(tmp_stamp, stamp_file)
    serialized = "C7514" in log or "C7510" in log
    return BuildResult(name, str(so), "built", secs, "ptxas: wgmma serialized" if serialized else "")


def build(names: list[str] | None = None, jobs: int = 1, force: bool = False) -> list[BuildResult]:
    names = names or list(LIBRARIES)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda n: build_one(n, force), names))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"libraries to build (default all: {', '.join(LIBRARIES)})")
    ap.add_argument("--jobs", type=int, default=1, help="parallel nvcc processes (2-core hosts: keep 1)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    unknown = [n for n in a.names if n not in LIBRARIES]
    if unknown:
        print(f"unknown library: {', '.join(unknown)}", file=sys.stderr)
        return 2
    results = build(a.names, a.jobs, a.force)
    for r in results:
        print(f"{r.name:14s} {r.status:7s} {r.seconds:6.1f}s  {r.message}")
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
