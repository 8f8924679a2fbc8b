"""What the tests share: the markers' skip logic and a few fixtures.

A test marked `gpu` needs a CUDA GPU, `sm90` a Hopper one (sm_90), `nvcc` the real nvcc on PATH; each is
skipped, with the reason, where the machine lacks it. Test files mark tests and never redefine the conditions.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parent / "models"


def has_nvcc() -> bool:
    return shutil.which("nvcc") is not None


@functools.cache
def gpu_capability() -> tuple[int, int] | None:
    """The first CUDA GPU's compute capability; None without one (asked once, and only when a test needs it)."""
    import torch

    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def has_gpu() -> bool:
    return gpu_capability() is not None


_NEEDS = {
    "gpu": (has_gpu, "no CUDA GPU"),
    "sm90": (lambda: gpu_capability() == (9, 0), "needs an sm90 (H100/H200) GPU"),
    "nvcc": (has_nvcc, "nvcc not on PATH"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, (present, reason) in _NEEDS.items():
            if item.get_closest_marker(marker) is not None and not present():
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def tmp_tracking_uri(tmp_path: Path) -> str:
    """A fresh MLflow store (real sqlite) for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tmp_table(tmp_path: Path):
    """A fresh pattern table (real Parquet files) for one test."""
    from fact_ray.pattern_table import PatternTable

    return PatternTable(str(tmp_path / "table"))


@pytest.fixture
def small_model() -> str:
    """A small KernelBench-format model file: a transformer-ish block (GEMMs, LayerNorm, GELU) that captures in
    about a second on a CPU."""
    return str(MODELS / "small_block.py")


# benchmarks/models/ files read their sizes from these variables when called: tests run them small on a CPU.
SUITE_SMALL = {"FR_BATCH": "2", "FR_SEQ": "16", "FR_EMBD": "32", "FR_HEADS": "4", "FR_KV_HEADS": "2", "FR_FFN": "64"}


@pytest.fixture
def small(monkeypatch):
    """The suite's KernelBench-format models at test sizes."""
    for k, v in SUITE_SMALL.items():
        monkeypatch.setenv(k, v)
