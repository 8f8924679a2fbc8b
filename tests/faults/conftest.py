"""The fault-injection suite's own tally, printed at the end of a pytest session that ran it: faults injected
(one per test case), their kinds (one per module), the cases whose test asserts that the next run, build, read
or load succeeds after the fault (marker `recovers`) and passed, and table rows lost (reported by the tests
that commit rows and count them back, through the `rows_checked` fixture). The README's reliability figures are
this output, not estimates."""

from __future__ import annotations

import pytest

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


def pytest_configure(config):
    config.addinivalue_line("markers", "recovers: the test asserts that the next run succeeds after the fault")


@pytest.fixture
def rows_checked():
    """Call with (committed, found) after counting a table's rows back."""

    def record(committed: int, found: int) -> None:
        _TALLY["rows_committed"] += committed
        _TALLY["rows_lost"] += max(0, committed - found)

    return record


def pytest_runtest_logreport(report):
    if report.when != "call" or "/faults/" not in report.nodeid.replace("\\", "/"):
        return
    module = report.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    _TALLY["cases"][report.nodeid] = (module, report.passed, "recovers" in report.keywords)


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
