"""How the pattern table answers a winner lookup as nights accumulate: 100 nights x 50 patterns, one commit per
pattern per night (the winner and two failed candidates, as the farm commits them), then `compact`.

    .venv/bin/python benchmarks/table_scale.py                       # 100 nights x 50 patterns in a temp folder
    .venv/bin/python benchmarks/table_scale.py --nights 10 --table s3://bucket/bench-table --out /tmp/t.json

A storage and CPU number, not a GPU one: it runs anywhere. Each lookup is a cold one: a fresh `PatternTable` (as a
new `fact-ray run` process has), `best(key)` of a random key, timed with `time.perf_counter`; the median and p90
of --lookups such lookups are reported before and after compaction. Writes one JSON document (date, commit, host,
sizes, timings) to --out (default benchmarks/results/<date>-table-scale-<host>.json) and prints it.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fact_ray.pattern_table import PatternTable, RowContext, TableKey, Toolchain, row_from_trial
from fact_ray.pattern_table.compact import compact
from fact_ray.types import Arch, KernelConfig, Match, Precision, TimeStats, Trial

ROOT = Path(__file__).resolve().parents[1]
TC = Toolchain(cuda="13.0.88", cutlass="4.2.0.0", torch="2.13.0", bench_method="1")
RULES = ("linear", "linear_bias", "linear_bias_act", "linear_bias_residual", "bmm")


def _match(i: int) -> Match:
    rule = RULES[i % len(RULES)]
    m = 64 * (1 + i // len(RULES))
    return Match(rule=rule, family="gemm", nodes=(rule,), anchor=rule, params=(("M", m), ("N", 768), ("K", 768)),
                 dtype="float32", shapes=((m, 768), (768, 768)))


def _config(name: str) -> KernelConfig:
    return KernelConfig(template="sm90_gemm", name=name, arch=Arch.SM90, precision=Precision.FP32, element="float",
                        opclass="tensorop", math_op="multiply_add", instruction=(64, 128, 8), tile=(128, 128, 32),
                        warps=(4, 1, 1), stages=4, alignment=(4, 4, 4))


def _night_rows(match: Match, night: int, rng: random.Random) -> list:
    when = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(days=night)
    ctx = RowContext(TC, f"night-{night}", "NVIDIA H200", "node-1")
    rows = []
    for j, status in enumerate(("ok", "wrong", "compile_error")):
        ms = rng.uniform(0.5, 1.5)
        t = Trial(candidate_name=f"k{night % 7}_{j}", status=status, rel_err=1e-7, max_abs_err=1e-6,
                  time=TimeStats(ms, ms * 0.95, ms * 1.05, 100) if status != "compile_error" else None,
                  baseline=TimeStats(2.0, 1.9, 2.1, 100))
        rows.append(row_from_trial(t, match, ctx, policy=Precision.FP32, arch=Arch.SM90,
                                   config=_config(t.candidate_name), created_at=when + timedelta(seconds=j)))
    return rows


def _lookups(uri: str, keys: list[TableKey], n: int, rng: random.Random) -> dict:
    times = []
    for _ in range(n):
        key = rng.choice(keys)
        t0 = time.perf_counter()
        best = PatternTable(uri).best(key)
        times.append((time.perf_counter() - t0) * 1000)
        assert best is not None and best.match_key == key.match_key
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "min_ms": times[0], "lookups": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nights", type=int, default=100)
    ap.add_argument("--patterns", type=int, default=50)
    ap.add_argument("--lookups", type=int, default=30)
    ap.add_argument("--table", default="", help="Table URI (default: a fresh temporary folder).")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rng = random.Random(13)
    with tempfile.TemporaryDirectory(prefix="table-scale-") as tmp:
        uri = a.table or str(Path(tmp) / "table")
        matches = [_match(i) for i in range(a.patterns)]
        keys = [TableKey.of(m.key, Precision.FP32, Arch.SM90, TC) for m in matches]
        t0 = time.perf_counter()
        table = PatternTable(uri)
        for night in range(a.nights):
            for m in matches:
                table.commit(_night_rows(m, night, rng))
        build_s = time.perf_counter() - t0
        before = _lookups(uri, keys, max(3, a.lookups // 10), rng)  # slow: a few are enough
        t0 = time.perf_counter()
        report = compact(PatternTable(uri))
        compact_s = time.perf_counter() - t0
        after = _lookups(uri, keys, a.lookups, rng)
        rows = len(PatternTable(uri).all_rows())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {"benchmark": "table_scale", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_commit": commit, "host": socket.gethostname(), "storage": "local disk" if not a.table else a.table,
           "nights": a.nights, "patterns": a.patterns, "rows": rows, "commit_files": a.nights * a.patterns,
           "build_s": round(build_s, 2), "compact_s": round(compact_s, 2),
           "compaction": {"files_in": report.files_in, "files_out": report.files_out, "rows": report.rows,
                          "partitions": report.partitions},
           "lookup_before_compaction": before, "lookup_after_compaction": after,
           "target_ms": 100.0, "meets_target": after["median_ms"] < 100.0}
    out = Path(a.out or ROOT / "benchmarks" / "results" /
               f"{datetime.now(timezone.utc):%Y-%m-%d}-table-scale-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
