"""What the tests share: the markers' skip logic, a few fixtures, and the fault-injection suite's tally.

A test marked `gpu` needs a CUDA GPU, `sm90` a Hopper one (sm_90), `nvcc` the real nvcc on PATH; each is
skipped, with the reason, where the machine lacks it. Test files mark tests and never redefine the conditions.
"""

from __future__ import annotations

import functools
import os
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
    # The files holding a `slow` test (a real sm90a compile, a Ray cluster: tens of seconds each) run first, the
    # quick files after them. make test's xdist workers take whole files in this order (--no-loadscope-reorder),
    # so the quick files fill in at the end and both workers finish together; a long file dealt last would leave
    # one worker idle for its whole length. The sort is stable: files and tests keep their order otherwise.
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def session_build_cache(tmp_path_factory) -> str:
    """One build cache for the whole session, for tests whose subject is not the compile itself (a farm run, a
    composition, a night): the cache is content-addressed, so a translation unit that several of them build
    compiles once. Tests of the build and its cache keep their own. Under pytest-xdist the workers share it (the
    session's folder is their common parent; entries are installed atomically, so concurrent builders are safe).
    FACT_RAY_TEST_CACHE names a cache kept across sessions instead."""
    if os.environ.get("FACT_RAY_TEST_CACHE"):
        return os.environ["FACT_RAY_TEST_CACHE"]
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "session-build-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def fc1_gelu_kernel(session_build_cache):
    """(KernelConfig, library path, symbol) of one real sm80 build: the fc1 + GELU kernel of compose_mlp (and of
    shaped_mlp's buckets), the winner that the compose, night and shape tests put in place."""
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.search_spaces import space
    from fact_ray.types import Arch, GemmProblem, Precision

    if not has_nvcc():
        pytest.skip("nvcc not on PATH")
    fc1 = GemmProblem(M=16, N=128, K=64, epilogue="bias_act", activation="gelu")
    cfg = next(c for c in space(fc1, Arch.SM80, Precision.FP32) if c.opclass == "simt" and c.split_k == 1)
    (source,) = emit([cfg], Arch.SM80)
    lib = build(source, session_build_cache)
    assert lib.ok, lib.log[-2000:]
    return cfg, lib.path, source.symbols[0]


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


# --------------------------------------------------------------------------------------------- fault-injection tally
# The fault-injection suite's own tally (tests/faults), printed at the end of a session that ran it: faults injected
# (one per test case), their kinds (one per module), the cases whose test asserts that the next run, build, read or
# load succeeds after the fault (marker `recovers`) and passed, and table rows lost (reported by the tests that
# commit rows and count them back, through the `rows_checked` fixture). The README's reliability figures are this
# output, not estimates. It lives here, not in tests/faults/conftest.py: under pytest-xdist the reports reach the
# controlling process, which loads this conftest but collects nothing (so never tests/faults' own), and the row
# counts travel on the reports (user properties) instead of in a worker's memory.

ROWS = "fault_rows_committed_found"


def pytest_configure(config):
    config.addinivalue_line("markers", "recovers: the test asserts that the next run succeeds after the fault")


@pytest.fixture
def rows_checked(request):
    """Call with (committed, found) after counting a table's rows back."""

    def record(committed: int, found: int) -> None:
        request.node.user_properties.append((ROWS, (committed, found)))

    return record


KINDS = {
    "test_compile_faults": "compiler killed mid-compile, dead runs' temp folders and orphaned compilers",
    "test_artifact_faults": "tampered or foreign artifacts",
    "test_llm_faults": "hostile LLM endpoint",
    "test_table_faults": "pattern table: unsafe exports, foreign files, bad rows, writer SIGKILLed",
    "test_tracking_faults": "MLflow store: concurrent first runs, corruption, killed runs, secrets",
    "test_signal_faults": "SIGTERM to a run",
    "test_input_faults": "hostile or clumsy input",
}

_TALLY = {"cases": {}, "rows_committed": 0, "rows_lost": 0}


def pytest_runtest_logreport(report):
    if report.when != "call" or "/faults/" not in report.nodeid.replace("\\", "/"):
        return
    module = report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    _TALLY["cases"][report.nodeid] = (module, report.passed, "recovers" in report.keywords)
    for name, value in report.user_properties:
        if name == ROWS:
            committed, found = value
            _TALLY["rows_committed"] += committed
            _TALLY["rows_lost"] += max(0, committed - found)


def pytest_terminal_summary(terminalreporter):
    cases = _TALLY["cases"].values()
    if not cases:
        return
    kinds = sorted({m for m, _, _ in cases})
    passed = sum(ok for _, ok, _ in cases)
    recovered = sum(ok and rec for _, ok, rec in cases)
    tr = terminalreporter
    tr.section("fault-injection suite")
    tr.write_line(f"faults injected: {len(cases)} ({passed} handled as specified), in {len(kinds)} kinds")
    for m in kinds:
        n = sum(1 for k, _, _ in cases if k == m)
        tr.write_line(f"  {n:3d}  {KINDS.get(m, m)}")
    tr.write_line(f"runs that recovered (the next run/build/read/load succeeded): {recovered}")
    tr.write_line(f"table rows committed and counted back: {_TALLY['rows_committed']}, rows lost: "
                  f"{_TALLY['rows_lost']}")
