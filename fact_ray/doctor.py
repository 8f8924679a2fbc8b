"""`fact-ray doctor`: what this machine and the configured services provide, each with the fix when missing.

Every check is quick (short timeouts, no cluster start) and never raises: a failure is a row.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fact_ray.config import Settings
from fact_ray.errors import NotAvailable


@dataclass(frozen=True)
class Check:
    item: str
    ok: bool
    detail: str
    fix: str = ""
    optional: bool = False  # missing is allowed: the run does what it can without it


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return ""


def check_gpu() -> list[Check]:
    try:
        import torch
    except Exception as e:  # a broken torch install is reported by check_torch
        return [Check("GPU", False, f"torch not importable ({e})", "install torch", optional=True)]
    if not torch.cuda.is_available():
        return [Check("GPU", False, "no CUDA GPU visible to torch: capture, discover, emit and compile still run",
                      "run on a GPU node, or pass --address of a Ray cluster with GPU workers", optional=True)]
    from fact_ray.toolchain import arch_of, driver_version

    gpus = []
    for i in range(torch.cuda.device_count()):  # every GPU, not only the one a run would ask
        cap = tuple(torch.cuda.get_device_capability(i))
        arch = arch_of(cap)
        gpus.append(f"{torch.cuda.get_device_name(i)} (sm{cap[0]}{cap[1]}: "
                    f"{f'builds for {arch.value}' if arch else 'not a fact-ray target'})")
    out = [Check("GPU", True, ", ".join(gpus))]
    if shutil.which("nvidia-smi"):
        driver = driver_version()
        out.append(Check("driver", bool(driver), driver or "nvidia-smi does not answer",
                         "install an NVIDIA driver >= 580 for CUDA 13"))
    else:
        out.append(Check("driver", True, f"CUDA {torch.version.cuda} runtime works (nvidia-smi not on PATH)"))
    return out


def check_nvcc(nvcc: str) -> Check:
    path = shutil.which(nvcc)
    if not path:
        return Check("nvcc", False, f"{nvcc!r} not found", "install the CUDA toolkit (12.4+), or set FACT_RAY_NVCC")
    from fact_ray.toolchain import nvcc_version

    try:
        return Check("nvcc", True, f"{path}: release {nvcc_version(nvcc)}")
    except NotAvailable as e:
        return Check("nvcc", False, str(e), "reinstall the CUDA toolkit (12.4+), or set FACT_RAY_NVCC")


def check_cutlass() -> list[Check]:
    ver = _version("nvidia-cutlass")
    try:
        import cutlass_library
    except Exception as e:
        return [Check("CUTLASS package", False, f"cutlass_library not importable ({e})",
                      "pip install nvidia-cutlass==4.2.0.0")]
    inc = Path(cutlass_library.__file__).parent / "source" / "include"
    return [Check("CUTLASS package", True, f"nvidia-cutlass {ver or '?'}"),
            Check("CUTLASS headers", (inc / "cutlass" / "cutlass.h").is_file(), str(inc),
                  "reinstall nvidia-cutlass: its wheel ships the headers under cutlass_library/source")]


def check_attention_headers(nvcc: str) -> Check:
    """CUTLASS example 41 (our attention kernels) includes <curand_kernel.h>; CUDA 13 toolkits may not ship it."""
    from fact_ray.realize.attention import curand_include_dir

    found = curand_include_dir((), nvcc)
    return Check("cuRAND headers", found is not None, found or "curand_kernel.h not found (attention kernels "
                 "cannot compile; GEMMs and norms can)", "" if found else "pip install nvidia-curand",
                 optional=True)


def check_torch() -> Check:
    try:
        import torch
    except Exception as e:
        return Check("torch", False, str(e), "make setup (installs torch==2.13.0 where none is importable)")
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    return Check("torch", True, f"{torch.__version__} ({build})")


def _tcp_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_ray(address: str) -> Check:
    ver = _version("ray")
    if not ver:
        return Check("Ray", False, "ray not installed", "make setup")
    if not address:
        return Check("Ray", True, f"ray {ver}; local cluster (ray.init()) when a run starts")
    if address == "auto":
        return Check("Ray", True, f"ray {ver}; address auto (the cluster this node belongs to)")
    u = urllib.parse.urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = u.hostname or "127.0.0.1", u.port or 10001
    except ValueError as e:  # a port that is not a number or out of range
        return Check("Ray", False, f"--address {address!r} is not a valid address ({e})",
                     "pass ray://host:10001, host:6379 or auto")
    ok = _tcp_open(host, port)
    return Check("Ray", ok, f"ray {ver}; {address} {'answers' if ok else 'does not answer'}",
                 "" if ok else "start the cluster (ray up cluster.yaml) or fix --address")


def check_tracking(uri: str) -> Check:
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        ok = folder.exists() or os.access(folder.parent if folder.parent.exists() else ".", os.W_OK)
        return Check("MLflow tracking", ok, uri, "" if ok else f"make {folder} writable")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as r:
                ok = r.status == 200
        except OSError as e:
            return Check("MLflow tracking", False, f"{uri}: {e}", "start `mlflow server` or fix --tracking-uri")
        return Check("MLflow tracking", ok, uri)
    return Check("MLflow tracking", True, f"{uri} (not probed)")


def check_table(uri: str) -> Check:
    try:
        import pyarrow.fs as pafs

        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
        else:
            fs, path = pafs.LocalFileSystem(), str(Path(uri).absolute())
        info = fs.get_file_info(path)
    except Exception as e:  # any storage error is a row here; the run itself fails with TableError
        return Check("pattern table", False, f"{uri}: {e}", "fix --table or the storage credentials")
    state = "exists" if info.type.name != "NotFound" else "will be created on the first run"
    return Check("pattern table", True, f"{uri} ({state})")


def check_llm(settings: Settings) -> Check:
    base = os.environ.get("OPENAI_BASE_URL", "")
    if settings.llm == "off" and not base:
        return Check("LLM endpoint", True, "off: rules rank alone", optional=True)
    if not base:
        return Check("LLM endpoint", False, f"--llm {settings.llm} but OPENAI_BASE_URL is not set",
                     "export OPENAI_BASE_URL (and OPENAI_API_KEY) of an OpenAI-compatible server", optional=True)
    u = urllib.parse.urlparse(base)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:
        return Check("LLM endpoint", False, f"OPENAI_BASE_URL {base!r} is not a valid URL ({e})",
                     "fix OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1)", optional=True)
    ok = _tcp_open(u.hostname or "127.0.0.1", port)
    return Check("LLM endpoint", ok, f"{base} {'answers' if ok else 'does not answer'}",
                 "" if ok else "start the server or fix OPENAI_BASE_URL", optional=True)


def check_inputs(settings: Settings, env: dict[str, str] | None = None) -> None:
    """What the user typed, before any probe: a --address or OPENAI_BASE_URL that is not an address at all (a
    port that is not a number) is one ConfigError line, not a row."""
    from fact_ray.redact import check_url

    env = dict(os.environ) if env is None else env
    base = env.get("OPENAI_BASE_URL", "").strip()
    if base:
        check_url(base, "OPENAI_BASE_URL")
    address = settings.ray_address.strip()
    if address and address not in ("auto", "local"):
        check_url(address if "://" in address else f"ray://{address}", "--address", schemes=("ray",))


def run_checks(settings: Settings) -> list[Check]:
    """Every check, with credentials in URIs masked (fact_ray.redact): doctor output is pasted into tickets."""
    import dataclasses

    from fact_ray.redact import redact

    checks = [*check_gpu(), check_nvcc(settings.nvcc), *check_cutlass(), check_attention_headers(settings.nvcc),
              check_torch(),
              check_ray(settings.ray_address), check_tracking(settings.resolved_tracking_uri),
              check_table(settings.resolved_table_uri), check_llm(settings)]
    return [dataclasses.replace(c, detail=redact(c.detail), fix=redact(c.fix)) for c in checks]
