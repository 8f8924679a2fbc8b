"""How compile throughput scales with Ray workers: the same distinct translation units, built from a fresh cache
with 1 worker and then with N (default: every CPU), through the farm's own fan-out (fact_ray.actors.compile).

    .venv/bin/python benchmarks/compile_scaling.py                       # 32 sm80 TUs, 1 vs all CPUs
    .venv/bin/python benchmarks/compile_scaling.py --units 8 --workers 4 --arch sm90 --out /tmp/scaling.json

Writes one JSON document (date, git commit, host, CPUs, nvcc/CUTLASS versions, per run: workers, seconds,
TUs/minute, failures) to --out (default benchmarks/results/<date>-compile-scaling-<host>.json) and prints a table.
Each run starts its own local Ray with `num_cpus` = its worker count, so "1 worker" means one compile at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

from fact_ray.actors.compile import compile_all
from fact_ray.toolchain import detect
from fact_ray.realize.emit import emit
from fact_ray.search_spaces import space
from fact_ray.types import Arch, GemmProblem, Precision, Source

ROOT = Path(__file__).resolve().parents[1]

# Problems whose spaces differ (policy, epilogue, layout), so that the units are distinct kernels, not copies.
_PROBLEMS = [
    (GemmProblem(M=4096, N=4096, K=4096), Precision.FP32),
    (GemmProblem(M=4096, N=4096, K=4096, dtype="bfloat16"), Precision.BF16),
    (GemmProblem(M=65536, N=3072, K=768, dtype="bfloat16", epilogue="bias_act", activation="gelu_tanh"),
     Precision.BF16),
    (GemmProblem(M=65536, N=768, K=3072, dtype="bfloat16", epilogue="bias_residual"), Precision.BF16),
    (GemmProblem(M=4096, N=4096, K=4096, epilogue="bias"), Precision.TF32),
    (GemmProblem(M=4096, N=4096, K=4096, layout_b="row"), Precision.FP32),
]


def distinct_units(n: int, arch: Arch, per_unit: int) -> list[Source]:
    """`n` translation units of `per_unit` configs each, all with different code."""
    units: dict[str, Source] = {}
    for problem, policy in _PROBLEMS:
        try:
            configs = space(problem, arch, policy, None)
        except Exception:  # noqa: BLE001 - a policy this arch's space does not cover: use the others
            continue
        for i in range(0, len(configs), per_unit):
            for src in emit(configs[i:i + per_unit], arch):
                units.setdefault(src.name, src)
                if len(units) == n:
                    return list(units.values())
    raise SystemExit(f"only {len(units)} distinct {arch.value} units could be made; ask for fewer (--units)")


def timed_run(sources: list[Source], workers: int, nvcc: str) -> dict:
    cache = tempfile.mkdtemp(prefix=f"fact-ray-scaling-{workers}-")  # fresh: every unit really compiles
    ray.init(include_dashboard=False, num_cpus=workers, logging_level="ERROR")
    try:
        t0 = time.monotonic()
        outcomes = compile_all(sources, cache, nvcc)
        seconds = time.monotonic() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
    ok = sum(o.ok for o in outcomes)
    return {"workers": workers, "units": len(sources), "seconds": round(seconds, 2), "tus_per_min": round(len(sources) / seconds * 60, 2),
            "ok": ok, "failed": sum(not o.ok and not o.lost for o in outcomes),
            "lost": sum(o.lost for o in outcomes),
            "compile_seconds_sum": round(sum(o.library.seconds for o in outcomes), 1),
            "errors": [o.library.log.strip().splitlines()[-1][:300] for o in outcomes if not o.ok and o.library.log]}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=32, help="distinct translation units (default 32)")
    ap.add_argument("--per-unit", type=int, default=1, help="configs per unit (default 1)")
    ap.add_argument("--arch", default="sm80", choices=[a.value for a in Arch])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N of the second run (default all CPUs)")
    ap.add_argument("--base-units", type=int, default=0,
                    help="units the 1-worker run compiles: the first K of the same list (default: all). A serial "
                         "run's rate does not depend on how many units it compiles, and a parallel run needs at "
                         "least two units per worker to keep every worker busy; this keeps the serial run short")
    ap.add_argument("--nvcc", default="nvcc")
    ap.add_argument("--out", default="", help="JSON output path")
    args = ap.parse_args(argv)

    host = detect(args.nvcc)  # NotAvailable (one line) without nvcc
    arch = Arch(args.arch)
    sources = distinct_units(args.units, arch, args.per_unit)
    base = sources[: args.base_units] if 0 < args.base_units < len(sources) else sources
    runs = [timed_run(base if w == 1 else sources, w, args.nvcc) for w in dict.fromkeys([1, args.workers])]
    ratio = runs[-1]["tus_per_min"] / runs[0]["tus_per_min"] if runs[0]["tus_per_min"] else float("nan")
    now = datetime.now(timezone.utc)
    doc = {
        "benchmark": "compile_scaling", "date": now.isoformat(timespec="seconds"), "git_commit": git_commit(),
        "host": socket.gethostname(), "cpus": os.cpu_count(), "nvcc": host.nvcc,
        "cutlass": host.cutlass, "ray": ray.__version__, "arch": arch.value, "units": len(sources),
        "configs_per_unit": args.per_unit, "runs": runs, "ratio": round(ratio, 3),
        "efficiency": round(ratio / runs[-1]["workers"], 3), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"{now:%Y-%m-%d}-compile-scaling-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")

    table = Table(title=f"compile scaling: {len(sources)} {arch.value} TUs, {doc['cpus']} CPUs")
    for col in ("workers", "seconds", "TUs/min", "ok", "failed", "lost"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(f'{r["workers"]} ({r["units"]} TUs)', f"{r['seconds']:.1f}", f"{r['tus_per_min']:.1f}", str(r["ok"]),
                      str(r["failed"]), str(r["lost"]))
    con = Console()
    con.print(table)
    con.print(f"ratio {ratio:.2f}x with {runs[-1]['workers']} workers (efficiency {doc['efficiency']:.0%}); "
              f"written to {out}")
    return 0 if all(r["ok"] == r["units"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
