"""Rebuild a `fact-ray bench` result from the table it printed, when its JSON and PNG did not come back.

The device returns a limited number of files per call; in one session the JSON and PNG of three benches were
left behind while their printed tables (captured in `bench-*.log`) came back. This reads such a log and writes
the JSON, PNG and text table with `fact_ray.bench`, every number as printed (4 significant digits for times,
3 for errors), with a note saying so. Nothing is measured here and nothing is added.

    python benchmarks/replot_bench_log.py benchmarks/results/.../bench-matmul_square-fp32.log --out DIR
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from fact_ray import bench
from fact_ray.types import Precision, TimeStats

_TITLE = re.compile(r"^\s*(\S+)\s+(fp32|tf32|bf16|fp16)\s+(.+?)\s+\(median of (\d+) interleaved rounds")


def _num(cell: str) -> float | None:
    cell = cell.strip().rstrip("x")
    return None if cell in ("", "-") else float(cell)


def parse(text: str, model_ref: str) -> bench.BenchResult:
    title = next((m for m in map(_TITLE.match, text.splitlines()) if m), None)
    if title is None:
        raise SystemExit("no bench table title in the log")
    model, policy, gpu, reps = title.group(1), Precision(title.group(2)), title.group(3), int(title.group(4))
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) != 11 or cells[0] not in bench.VARIANTS:
            continue
        name, status, median, spread, speedup, rel, mx, close, compile_s, kernels, reason = cells
        p10, p90 = (float(v) for v in spread.split("-")) if spread != "-" else (None, None)
        time = TimeStats(float(median), p10, p90, reps) if median != "-" else None
        rows.append(bench.VariantRow(
            name=name, status=status, reason=reason, time=time, speedup=_num(speedup), rel_err=_num(rel),
            max_abs_err=_num(mx), allclose=None if close == "-" else close == "yes", compile_s=_num(compile_s),
            kernels=None if kernels == "-" else int(kernels)))
    if not rows:
        raise SystemExit("no variant rows in the log")
    return bench.BenchResult(
        model=model, model_ref=model_ref, policy=policy, gpu=gpu, versions=(), artifact="", reps=reps,
        warmup=10, tolerance=policy.tolerance, allclose_tol=policy.allclose_tol, created_at="", rows=tuple(rows),
        notes=("re-parsed from the table `fact-ray bench` printed (its JSON and PNG were not returned by the "
               "device): numbers as printed, versions and timestamps not recorded",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-ref", default="")
    a = ap.parse_args()
    result = parse(Path(a.log).read_text(), a.model_ref)
    outputs = bench.write_outputs(result, a.out)
    print(f"{outputs.json}\n{outputs.png}\n{outputs.text}")


if __name__ == "__main__":
    main()
