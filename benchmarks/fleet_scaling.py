"""How a fleet's night scales with GPUs, and what a night with nothing changed costs.

    .venv/bin/python benchmarks/fleet_scaling.py                          # benchmarks/fleets/scaling.toml, 1 vs all
    .venv/bin/python benchmarks/fleet_scaling.py --fleet my.toml --gpus 1,2,4 --out /tmp/scaling.json
    bash benchmarks/gpu_session.sh fleet:1+4:3000                           # on a 4-GPU host, logs under $OUT

Each measurement is one `fact-ray retune --fleet` night in a fresh subprocess whose CUDA_VISIBLE_DEVICES shows it
the first k GPUs (so its local Ray has k trial workers), with its own empty pattern table and MLflow store (a
cold night: every pattern tuned from nothing, same budget) and one build cache shared by all measurements, filled
first by an untimed warm-up night: compiles are CPU work that does not scale with GPUs, so the timed nights compare
trials. Then, on the all-GPU night's table, a second night with nothing changed (incumbents re-measured, no new
candidates unless one regressed) is timed against that cold night, and the winners it changed are counted
(the target: <= 25 % of the cold night's time, no winner changed).

Writes one JSON document (date, commit, host, GPUs, fleet, per night: GPUs, seconds, patterns, winners changed,
regressions, exit code) to --out (default
benchmarks/results/<date>-fleet-scaling-<host>.json) and prints a summary. Needs GPUs; without one it says so.
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

ROOT = Path(__file__).resolve().parents[1]
FACT_RAY = str(Path(sys.executable).parent / "fact-ray")


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return len(out.stdout.split("\n")) - 1 if out.returncode == 0 else 0


def night(fleet: str, gpus: int, work: Path, cache: Path, tag: str, table: Path | None = None) -> dict:
    """One timed `fact-ray retune --fleet` in a subprocess that sees `gpus` GPUs. A night already timed in this work
    folder (a call cut off by a time limit, run again with the same --keep) is read back, not run again."""
    done = work / f"result-{tag}.json"
    if done.is_file():
        return json.loads(done.read_text())
    if table is None:  # a cold night: nothing left from an earlier, cut-off attempt
        table = work / f"table-{tag}"
        for stale in (table, work / f"home-{tag}"):
            shutil.rmtree(stale, ignore_errors=True)
        (work / f"mlflow-{tag}.db").unlink(missing_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus)),
           "FACT_RAY_HOME": str(work / f"home-{tag}"), "FACT_RAY_TABLE_URI": str(table),
           "FACT_RAY_TRACKING_URI": f"sqlite:///{work / f'mlflow-{tag}.db'}", "FACT_RAY_CACHE_DIR": str(cache),
           "COLUMNS": "200"}
    out = work / f"night-{tag}"
    t0 = time.monotonic()
    r = subprocess.run([FACT_RAY, "retune", "--fleet", fleet, "--out", str(out)], env=env, capture_output=True,
                       text=True)
    seconds = time.monotonic() - t0
    doc = json.loads((out / "night.json").read_text()) if (out / "night.json").is_file() else {}
    verdicts = [v for m in doc.get("models", []) for v in m["patterns"]]
    result = {"tag": tag, "gpus": gpus, "seconds": round(seconds, 2), "night_seconds": doc.get("seconds"),
            "exit_code": r.returncode, "patterns": len(verdicts), "changed": sum(v["changed"] for v in verdicts),
            "regressed": sum(v["regressed"] for v in verdicts), "failed": [m["failed"] for m in doc.get("models", [])
                                                                          if m["failed"]],
            "stderr_tail": r.stderr[-1500:] if r.returncode not in (0, 1) else ""}
    done.write_text(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleet", default=str(ROOT / "benchmarks" / "fleets" / "scaling.toml"))
    ap.add_argument("--gpus", default="", help="Comma list of GPU counts (default: 1 and all).")
    ap.add_argument("--out", default="")
    ap.add_argument("--keep", default="", help="Keep the work folder here (tables, stores, reports).")
    a = ap.parse_args()
    total = gpu_count()
    if total == 0:
        sys.exit("fleet_scaling: no GPU here (nvidia-smi lists none); run it on a GPU host")
    counts = sorted({int(x) for x in a.gpus.split(",")} if a.gpus else {1, total})
    work = Path(a.keep or tempfile.mkdtemp(prefix="fleet-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "build-cache"
    runs = []
    warm = night(a.fleet, total, work, cache, "warm-up")  # fills the build cache; not compared
    for k in counts:
        runs.append(night(a.fleet, k, work, cache, f"cold-{k}gpu"))
    cold_all = next(r for r in runs if r["gpus"] == max(counts))
    quiet = night(a.fleet, max(counts), work, cache, "nothing-changed", table=work / f"table-cold-{max(counts)}gpu")
    one = next((r for r in runs if r["gpus"] == 1), None)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gpu_names = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
    doc = {"benchmark": "fleet_scaling", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_commit": commit, "host": socket.gethostname(), "gpus": gpu_names, "fleet": a.fleet,
           "warm_up": warm, "cold_nights": runs, "nothing_changed_night": quiet,
           "speedup_all_vs_1": round(one["seconds"] / cold_all["seconds"], 3) if one and cold_all["seconds"] else None,
           "nothing_changed_fraction": round(quiet["seconds"] / cold_all["seconds"], 3) if cold_all["seconds"] else None,
           "targets": {"speedup_4_gpus": ">= 3", "nothing_changed_fraction": "<= 0.25", "nothing_changed_changed": 0}}
    out = Path(a.out or ROOT / "benchmarks" / "results" /
               f"{datetime.now(timezone.utc):%Y-%m-%d}-fleet-scaling-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("speedup_all_vs_1", "nothing_changed_fraction")}, indent=2))
    print(f"written to {out}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
