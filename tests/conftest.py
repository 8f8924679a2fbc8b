"""Shared fixtures."""

import pytest

# benchmarks/models/ files read their sizes from these variables when called: tests run them small on a CPU.
SUITE_SMALL = {"FR_BATCH": "2", "FR_SEQ": "16", "FR_EMBD": "32", "FR_HEADS": "4", "FR_KV_HEADS": "2", "FR_FFN": "64"}


@pytest.fixture
def small(monkeypatch):
    """The suite's KernelBench-format models at test sizes."""
    for k, v in SUITE_SMALL.items():
        monkeypatch.setenv(k, v)
