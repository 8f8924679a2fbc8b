"""What this host builds and runs kernels with, found once per process, and the one key the table reuses by.

`detect()` asks the machine once (nvcc's `--version`, the installed CUTLASS package, torch, its CUDA, cuBLAS and
cuDNN, the NVIDIA driver, the GPU) and returns a frozen `Host`. `key_toolchain(host)` is the only builder of
the pattern table key's toolchain part (`Toolchain`: nvcc, CUTLASS, torch, the benchmark method); the farm, the
artifact and `fact-ray compose` all go through it, so the same host always gets the same key. `target_arch` is
the one place a GPU's compute capability and a requested `--arch` become the arch kernels are built for.

Versions are parsed, not copied: nvcc's is the `V13.0.88` of its banner ("13.0.88"), never a path or a whole
line. The driver, GPU model, cuBLAS and cuDNN are recorded (table rows, artifact manifests, MLflow) but are not
in the key: a row verified under one driver stays reusable under the next (issue 13 decides whether a serve-time
check should look at them).

This module sits at the bottom beside `config`: it imports only `types` and `errors`, and torch and nvcc only
when `detect` runs.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from importlib import metadata

from fact_ray.errors import NotAvailable
from fact_ray.types import Arch, content_hash

# The version of the benchmark method (realize/bench.py: L2 flush, interleaving, medians). Bump it whenever what a
# timing there means changes: timings of another method are not comparable, so it is part of every key. It lives
# here, not there, because this bottom module builds the keys and must not import a stage.
BENCH_METHOD_VERSION = 1

# pip distributions that carry cuBLAS, newest naming first (CUDA 13 wheels dropped the -cuXX suffix).
_CUBLAS_DISTS = ("nvidia-cublas", "nvidia-cublas-cu13", "nvidia-cublas-cu12")

_VERSION = re.compile(r"^\d+(\.\d+)+$")
_NVCC_BUILD = re.compile(r"\bV(\d+(?:\.\d+)+)\b")  # "Cuda compilation tools, release 13.0, V13.0.88"
_NVCC_RELEASE = re.compile(r"\brelease (\d+(?:\.\d+)+)\b")


def parse_nvcc_version(text: str) -> str:
    """The version in `nvcc --version` output (or in one line of it), e.g. "13.0.88"; an already bare version is
    returned as is. Raises ValueError for anything else: a path, an empty string, an unknown banner."""
    t = text.strip()
    if _VERSION.match(t):
        return t
    m = _NVCC_BUILD.search(t) or _NVCC_RELEASE.search(t)
    if m is None:
        raise ValueError(f"no nvcc version in {t[:120]!r}")
    return m.group(1)


# --------------------------------------------------------------------------------------------- the key


@dataclass(frozen=True)
class Toolchain:
    """The toolchain part of a pattern table key: versions that make timings and compiled libraries comparable.
    Built by `key_toolchain`; the table stores and compares it and never asks the machine."""

    cuda: str  # nvcc version, e.g. "13.0.88"
    cutlass: str  # e.g. "4.2.0.0"
    torch: str  # e.g. "2.13.0+cu130"
    bench_method: str  # BENCH_METHOD_VERSION

    @property
    def fingerprint(self) -> str:
        return content_hash("toolchain", self.cuda, self.cutlass, self.torch, self.bench_method)[:16]


# --------------------------------------------------------------------------------------------- the host


@dataclass(frozen=True)
class Host:
    """What one machine has. Empty strings are facts too: no nvcc asked for, no GPU, no cuDNN in this torch."""

    nvcc: str = ""  # parsed version ("13.0.88"); "" when nvcc was not asked (loading, GPU workers)
    cutlass: str = ""  # the nvidia-cutlass package; "" when not installed
    torch: str = ""
    torch_cuda: str = ""  # the CUDA torch was built with; "" for a CPU build
    cublas: str = ""  # the cuBLAS wheel torch runs on; "" where none is installed as a package
    cudnn: str = ""  # torch.backends.cudnn.version(), e.g. "91002"
    driver: str = ""  # NVIDIA driver (nvidia-smi), e.g. "580.95.05"
    gpu_name: str = ""  # "" without a CUDA GPU
    capability: tuple[int, int] | None = None  # the GPU's compute capability
    bench_method: str = str(BENCH_METHOD_VERSION)

    @property
    def arch(self) -> Arch | None:
        """The arch of this host's GPU; None without a GPU or for a GPU fact-ray does not target."""
        return arch_of(self.capability)

    def built_by(self, compiler: "Host") -> "Host":
        """This (GPU) host's facts with the compiler facts of the node that builds its kernels: on a cluster the
        libraries come from a compile node and the timings from a GPU node."""
        return replace(self, nvcc=compiler.nvcc, cutlass=compiler.cutlass)

    def recorded(self) -> dict[str, str]:
        """Every version, for a manifest or a run's record (names as the artifact manifest has always used)."""
        return {"nvcc": self.nvcc, "cutlass": self.cutlass, "torch": self.torch, "bench_method": self.bench_method,
                "torch_cuda": self.torch_cuda, "cublas": self.cublas, "cudnn": self.cudnn, "driver": self.driver}


def key_toolchain(host: Host) -> Toolchain:
    """The pattern table key's toolchain part for kernels built and timed on `host`: the only builder of one.
    Raises NotAvailable when the host lacks what the key names (no nvcc asked or found, no CUTLASS, no torch)."""
    missing = [name for name, v in (("nvcc", host.nvcc), ("CUTLASS", host.cutlass), ("torch", host.torch)) if not v]
    if missing:
        raise NotAvailable(f"no {' or '.join(missing)} version on this host: a pattern table key needs the "
                           "toolchain kernels are built with (see `fact-ray doctor`)")
    return Toolchain(cuda=host.nvcc, cutlass=host.cutlass, torch=host.torch, bench_method=host.bench_method)


# --------------------------------------------------------------------------------------------- asking the host


def resolve_nvcc(nvcc: str) -> str:
    """nvcc's path (for running it; a path is never a version)."""
    path = shutil.which(nvcc)
    if path is None:
        raise NotAvailable(f"nvcc not found ({nvcc!r}): install the CUDA toolkit 12.4+ or pass --nvcc /path/to/nvcc")
    return path


@functools.cache
def nvcc_version(nvcc: str = "nvcc") -> str:
    """The version `nvcc --version` names, e.g. "13.0.88" (raises NotAvailable without a working nvcc)."""
    path = resolve_nvcc(nvcc)
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NotAvailable(f"nvcc at {path} does not run ({e}): check the CUDA toolkit install") from None
    try:
        return parse_nvcc_version(out)
    except ValueError:
        raise NotAvailable(f"nvcc at {path}: `nvcc --version` names no version this fact-ray can read") from None


@functools.cache
def cutlass_version() -> str:
    try:
        return metadata.version("nvidia-cutlass")
    except metadata.PackageNotFoundError:
        raise NotAvailable("the nvidia-cutlass package is not installed: pip install nvidia-cutlass==4.2.0.0") from None


def _dist_version(names: tuple[str, ...]) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def driver_version() -> str:
    """The NVIDIA driver nvidia-smi reports; "" where there is none (or it does not answer)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    try:
        r = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = r.stdout.split()
    return lines[0] if r.returncode == 0 and lines else ""


@functools.cache
def detect(nvcc: str | None = "nvcc") -> Host:
    """This host, asked once per process (and per nvcc). `nvcc=None` does not ask nvcc (loading an artifact and
    GPU workers never need it); a named nvcc that is missing raises NotAvailable."""
    import torch

    try:
        cutlass = cutlass_version()
    except NotAvailable:
        cutlass = ""
    gpu_name, capability, driver, cudnn = "", None, "", ""
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name()
        capability = tuple(torch.cuda.get_device_capability())
        driver = driver_version()
    if torch.backends.cudnn.is_available():
        cudnn = str(torch.backends.cudnn.version() or "")
    return Host(nvcc=nvcc_version(nvcc) if nvcc is not None else "", cutlass=cutlass, torch=str(torch.__version__),
                torch_cuda=str(torch.version.cuda or ""), cublas=_dist_version(_CUBLAS_DISTS), cudnn=cudnn,
                driver=driver, gpu_name=gpu_name, capability=capability)


# --------------------------------------------------------------------------------------------- the target arch


def arch_of(capability: tuple[int, int] | None) -> Arch | None:
    """The arch fact-ray builds for on a GPU of this compute capability; None for none, or one it does not target.
    sm_90 is Hopper's sm_90a; every sm_8x (A100, A10, L4, ...) runs the sm80 kernels."""
    if capability is None:
        return None
    major, minor = capability
    if (major, minor) == (9, 0):
        return Arch.SM90
    if major == 8:
        return Arch.SM80
    return None


def target_arch(wanted: Arch | None, capability: tuple[int, int] | None, gpu_name: str = "") -> Arch | None:
    """The arch to build for: `wanted` (the user's --arch) checked against the GPU, or the GPU's own. None only
    without a GPU and without `wanted`: the caller says what that means (discovery targets sm90, compose refuses).
    Raises NotAvailable for a GPU that cannot run the wanted arch, or that fact-ray does not target."""
    if capability is None:
        return wanted
    major, minor = capability
    here = f"{gpu_name or 'the GPU'} (sm_{major}{minor})"
    if wanted is None:
        arch = arch_of(capability)
        if arch is None:
            raise NotAvailable(f"GPU {here} is not a fact-ray target: sm80 (A100) or sm90 (H100/H200); pass --arch "
                               "to compile anyway")
        return arch
    if wanted == Arch.SM90 and (major, minor) != (9, 0):
        raise NotAvailable(f"--arch sm90 kernels (sm_90a) do not run on {here}")
    if wanted == Arch.SM80 and major not in (8, 9):
        raise NotAvailable(f"--arch sm80 kernels do not run on {here}")
    return wanted
