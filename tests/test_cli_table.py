"""`fact-ray table list|show|export` over a real Parquet table written through the store."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from fact_ray.pattern_table import PatternTable, RowContext, Toolchain, row_from_trial
from fact_ray.types import Arch, KernelConfig, Match, Precision, TimeStats, Trial

FACT_RAY = str(Path(sys.executable).parent / "fact-ray")
TC = Toolchain(cuda="13.0", cutlass="4.2.0.0", torch="2.13.0", bench_method="1")


def _match(m: int) -> Match:
    return Match(rule="linear_bias", family="gemm_bias", nodes=("linear",), anchor="linear",
                 params=(("M", m), ("N", 128), ("K", 256)), dtype="float32", shapes=((m, 256), (128, 256), (128,)))


def _row(match: Match, name: str, median: float):
    cfg = KernelConfig(template="sm80_gemm", name=name, arch=Arch.SM80, precision=Precision.FP32, element="float",
                       opclass="simt", math_op="multiply_add", instruction=(1, 1, 1), tile=(128, 128, 8),
                       warps=(4, 2, 1), stages=3, alignment=(1, 1, 1))
    trial = Trial(candidate_name=name, status="ok", rel_err=1e-7, max_abs_err=1e-6,
                  time=TimeStats(median, median * 0.9, median * 1.1, 50), baseline=TimeStats(2.0, 1.9, 2.1, 50))
    return row_from_trial(trial, match, RowContext(TC, "run-1", "NVIDIA H200", "node-1"), policy=Precision.FP32,
                          arch=Arch.SM80, config=cfg)


def sh(*args):
    # wide enough that rich does not fold the config names this test looks for
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run([FACT_RAY, *args], capture_output=True, text=True, timeout=120, env=env)


def test_list_show_export(tmp_path):
    uri = str(tmp_path / "table")
    t = PatternTable(uri)
    t.commit([_row(_match(64), "fast_one", 1.0), _row(_match(64), "slow_one", 1.5)])
    t.commit([_row(_match(32), "other", 0.5)])

    r = sh("table", "list", "--table", uri)
    assert r.returncode == 0, r.stderr
    assert "2 keys" in r.stdout and "fast_one" in r.stdout and "slow_one" not in r.stdout

    r = sh("table", "show", "M=64", "--table", uri)
    assert r.returncode == 0, r.stderr
    assert "fast_one" in r.stdout and "slow_one" in r.stdout and "other" not in r.stdout

    out = tmp_path / "rows.parquet"
    r = sh("table", "export", str(out), "--table", uri)
    assert r.returncode == 0 and "exported 3 rows" in r.stdout
    assert pq.read_table(out).num_rows == 3
    out = tmp_path / "rows.jsonl"
    assert sh("table", "export", str(out), "--format", "jsonl", "--table", uri).returncode == 0
    assert len([json.loads(x) for x in out.read_text().splitlines()]) == 3


def test_show_unknown_key_is_one_line(tmp_path):
    r = sh("table", "show", "nothing-like-this", "--table", str(tmp_path / "empty"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: no key in") and len(r.stderr.strip().splitlines()) == 1


def test_compact_keeps_every_row_and_the_winners(tmp_path):
    uri = str(tmp_path / "table")
    t = PatternTable(uri)
    for i, name in enumerate(("a", "b", "c")):
        t.commit([_row(_match(64), name, 1.0 + i)])
    r = sh("table", "compact", "--table", uri)
    assert r.returncode == 0, r.stderr
    assert "3 files into 1 (3 rows, 1 partitions)" in r.stdout
    fresh = PatternTable(uri)
    assert sorted(x.config_name for x in fresh.all_rows()) == ["a", "b", "c"]
    assert "1 keys" in sh("table", "list", "--table", uri).stdout
