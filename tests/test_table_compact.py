"""The partitioned table, its compaction (with a process killed at every durable step), and current truth per key:
real Parquet files in a temporary folder, real subprocesses, no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from fact_ray.pattern_table import PatternTable, RowContext, TableKey, Toolchain, row_from_trial
from fact_ray.pattern_table import partition as part
from fact_ray.pattern_table.compact import compact, content_hash
from fact_ray.pattern_table.truth import DEMOTED, INVALIDATED
from fact_ray.types import Arch, KernelConfig, Match, Precision, TimeStats, Trial

TC = Toolchain(cuda="13.0", cutlass="4.2.0", torch="2.13.0", bench_method="1")
T0 = datetime(2026, 6, 1, tzinfo=timezone.utc)


def _match(rule: str, m: int) -> Match:
    return Match(rule=rule, family="gemm", nodes=(rule,), anchor=rule, params=(("M", m), ("N", 64), ("K", 64)),
                 dtype="float32", shapes=((m, 64), (64, 64)))


def _config(name: str) -> KernelConfig:
    return KernelConfig(template="sm80_gemm", name=name, arch=Arch.SM80, precision=Precision.FP32, element="float",
                        opclass="simt", math_op="multiply_add", instruction=(1, 1, 1), tile=(128, 128, 8),
                        warps=(4, 2, 1), stages=3, alignment=(1, 1, 1))


def _row(match: Match, name: str, ms: float, night: int, status: str = "ok", policy: str = "fp32"):
    trial = Trial(candidate_name=name, status=status, rel_err=1e-7, max_abs_err=1e-6,
                  time=TimeStats(ms, ms * 0.9, ms * 1.1, 50), baseline=TimeStats(2.0, 1.9, 2.1, 50))
    return row_from_trial(trial, match, RowContext(TC, f"night-{night}", "NVIDIA H200", "node"),
                          policy=Precision(policy), arch=Arch.SM80, config=None if name == "torch" else _config(name),
                          created_at=T0 + timedelta(days=night))


def _fill(root, nights: int = 4) -> PatternTable:
    """A few nights of per-pattern commits over two rules and two policies, and one legacy flat file."""
    table = PatternTable(str(root))
    for night in range(nights):
        for rule in ("linear", "bmm"):
            for m in (32, 64):
                for policy in ("fp32", "bf16"):
                    table.commit([_row(_match(rule, m), f"k{night}", 1.0 + night / 10, night, policy=policy)])
    # A commit spanning partitions goes to the flat folder, as every commit of a table made before partitions.
    table.commit([_row(_match("linear", 32), "flat_a", 0.5, nights), _row(_match("bmm", 64), "flat_b", 0.5, nights)])
    return table


def _snapshot(root) -> tuple[int, str]:
    recs = [r.to_record() for r in PatternTable(str(root)).all_rows()]
    return len(recs), content_hash(recs)


def test_commits_go_to_their_partition_and_flat_files_stay_readable(tmp_path):
    table = _fill(tmp_path)
    flat = os.listdir(tmp_path / "rows")
    assert len(flat) == 1
    assert os.path.isdir(tmp_path / "parts" / "arch=sm80" / "policy=bf16" / "rule=bmm")
    key = TableKey.of(_match("linear", 32).key, "fp32", "sm80", TC)
    # The flat file's row is found by a key lookup, which reads only this partition and the flat folder.
    assert PatternTable(str(tmp_path)).best(key).config_name == "flat_a"
    assert len(PatternTable(str(tmp_path)).all_rows()) == 4 * 8 + 2


def test_compaction_loses_no_row_and_leaves_one_file_per_partition(tmp_path):
    table = _fill(tmp_path)
    before = _snapshot(tmp_path)
    key = TableKey.of(_match("bmm", 64).key, "fp32", "sm80", TC)
    best_before = [r.to_record() for r in table.top_k(key, 10)]
    report = compact(PatternTable(str(tmp_path)))
    assert report.files_in == 4 * 8 + 1 and report.partitions == 4 and report.rows == before[0]
    assert _snapshot(tmp_path) == before
    assert os.listdir(tmp_path / "rows") == []
    for rule in ("linear", "bmm"):
        for policy in ("fp32", "bf16"):
            files = os.listdir(tmp_path / part.partition_dir("sm80", policy, rule))
            assert len(files) == 1 and files[0].startswith("c-")
    assert [r.to_record() for r in PatternTable(str(tmp_path)).top_k(key, 10)] == best_before
    # New commits after a compaction count, and a second compaction merges them with the compacted file.
    PatternTable(str(tmp_path)).commit([_row(_match("bmm", 64), "k_new", 0.1, 9)])
    assert PatternTable(str(tmp_path)).best(key).config_name == "k_new"
    compact(PatternTable(str(tmp_path)))
    assert _snapshot(tmp_path)[0] == before[0] + 1
    assert PatternTable(str(tmp_path)).best(key).config_name == "k_new"
    assert len(os.listdir(tmp_path / part.partition_dir("sm80", "fp32", "bmm"))) == 1


def test_a_merged_file_that_does_not_read_back_whole_is_refused(tmp_path, monkeypatch):
    from fact_ray.errors import TableError
    from fact_ray.pattern_table import compact as cp

    _fill(tmp_path, nights=2)
    before = _snapshot(tmp_path)
    real = cp._encode
    # A writer that drops a row (what a bad disk or a bug in the merge would do): the check must catch it.
    monkeypatch.setattr(cp, "_encode", lambda recs: real(recs[:-1]))
    with pytest.raises(TableError, match="does not read back"):
        compact(PatternTable(str(tmp_path)))
    assert _snapshot(tmp_path) == before


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from fact_ray.pattern_table import PatternTable
    from fact_ray.pattern_table.compact import compact
    root, at, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = []
    def step(name, rel):
        if name == at:
            seen.append(rel)
            if len(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
    compact(PatternTable(root), on_step=step)
    sys.exit(3)  # the kill point was never reached: the test must say so
""")


@pytest.mark.parametrize("at,nth", [("written", 2), ("generation", 1), ("deleted", 1), ("deleted", 20)])
def test_a_compaction_killed_at_any_step_loses_and_doubles_nothing(tmp_path, at, nth):
    _fill(tmp_path)
    before = _snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path), at, str(nth)], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr  # killed where asked, not finished
    assert _snapshot(tmp_path) == before
    # The next compaction finishes the job (or redoes it), and still nothing is lost.
    compact(PatternTable(str(tmp_path)))
    assert _snapshot(tmp_path) == before
    files = [f for _, _, fs in os.walk(tmp_path / "parts") for f in fs]
    assert len(files) <= 4 + 4  # one per partition, plus at most the orphans of the killed run (too young to sweep)


def test_partition_lookup_pushes_the_key_filter_down(tmp_path):
    table = PatternTable(str(tmp_path))
    rows = [_row(_match("linear", m), "k", 1.0, 0) for m in range(1, 200)]
    for i in range(0, len(rows), 50):  # four commits, then one compacted file holding all the keys
        table.commit(rows[i:i + 50])
    compact(PatternTable(str(tmp_path)))
    fresh = PatternTable(str(tmp_path))
    key = TableKey.of(_match("linear", 7).key, "fp32", "sm80", TC)
    assert [r.match_key for r in fresh.history(key)] == [key.match_key]
    # Only the asked key's rows were parsed; the file was never read whole.
    assert not fresh._files and [k for _, k in fresh._key_cache] == [key]
    (c_file,) = os.listdir(tmp_path / part.partition_dir("sm80", "fp32", "linear"))
    assert pq.ParquetFile(tmp_path / part.partition_dir("sm80", "fp32", "linear") / c_file).metadata.num_rows == 199


# ------------------------------------------------------------------------------------------------ current truth


def test_a_kernels_latest_row_speaks_for_it_and_invalidated_kernels_never_serve(tmp_path):
    m = _match("linear", 64)
    key = TableKey.of(m.key, "fp32", "sm80", TC)
    table = PatternTable(str(tmp_path))
    table.commit([_row(m, "k_inc", 1.0, 0)])
    table.commit([_row(m, "k_other", 1.2, 0)])
    assert table.best(key).config_name == "k_inc"
    # Night 1: the incumbent re-measured slower, so it is demoted; k_other (re-measured, 1.1) wins.
    table.commit([_row(m, "k_inc", 1.5, 1, status=DEMOTED), _row(m, "k_other", 1.1, 1)])
    assert PatternTable(str(tmp_path)).best(key).config_name == "k_other"
    # Night 2: k_other turns wrong: invalidated. Even its older ok rows never serve again.
    table.commit([_row(m, "k_other", 1.1, 2, status=INVALIDATED), _row(m, "torch", 2.0, 2)])
    fresh = PatternTable(str(tmp_path))
    assert fresh.best(key).config_name == "torch"
    table.commit([_row(m, "k_other", 0.9, 3)])  # a later "ok" cannot bring it back
    assert PatternTable(str(tmp_path)).best(key).config_name == "torch"
    assert [r.config_name for r in fresh.history(key)].count("k_other") == 4  # history stays queryable
