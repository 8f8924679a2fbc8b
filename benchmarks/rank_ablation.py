"""Ranking ablation (issue 17): which ranker puts a sweep's best into its first 16 candidates.

Reads the sweeps of benchmarks/budget_curve.py (every swept config of each problem verified and timed on the GPU),
re-orders each sweep's configs with every ranker, exactly as the search would (search_spaces.rank.order with the
ranker's scores and the same diversity decays), and scores the first --top of each order: the best speedup among
them over the sweep's best. A ranker "recalls" a problem when that ratio is at least --target (0.97: the issue's
"top 16 reach >= 97% of the best of a 256-candidate sweep").

Rankers: heuristic (the analytic prior), learned (a cost model trained on the OTHER problems' sweeps only:
leave-one-problem-out, so it never sees the problem it ranks), nvmmh (NVIDIA's matmul heuristics, where
installed), random (the mean over --shuffles random orders). Runs on a CPU: the GPU work is in the sweeps.

    python benchmarks/rank_ablation.py --sweeps results/budget/budget_curve.json --out results/budget

Writes <out>/rank_ablation.json and <out>/rank_ablation.png (matplotlib required), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Optional


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweeps", required=True, help="budget_curve.json from benchmarks/budget_curve.py")
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--target", type=float, default=0.97)
    ap.add_argument("--shuffles", type=int, default=100)
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def _load(sweeps: dict[str, Any]):
    """Per sweep: (problem, arch, policy, configs, speedups by name) of the configs that verified and were timed."""
    from fact_ray.types import Arch, GemmProblem, Precision, config_from_dict

    out = {}
    for key, sw in sweeps.items():
        problem = GemmProblem(**sw["problem"])
        rows = [r for r in sw["configs"] if r["speedup"] and r["status"] in ("ok", "slower")]
        if len(rows) < 2:
            continue
        configs = [config_from_dict(r["config"]) for r in rows]
        out[key] = (problem, Arch(sw["arch"]), Precision(sw["policy"]), configs,
                    {r["name"]: r["speedup"] for r in rows}, {r["name"]: r["median_ms"] for r in rows})
    return out


def _recall(order: list, speedups: dict[str, float], top: int) -> float:
    best = max(speedups.values())
    return max(speedups[c.name] for c in order[:top]) / best


def ablation(sweeps: dict[str, Any], top: int = 16, target: float = 0.97, shuffles: int = 100,
             seed: int = 0) -> dict[str, Any]:
    """{ranker: {problem: ratio of the top-`top` best to the sweep's best}, plus recall counts}."""
    from fact_ray.search_spaces import learned, nvmmh, rank

    data = _load(sweeps)
    rankers: dict[str, Callable[[str], Optional[list]]] = {}

    def heuristic(key: str) -> Optional[list]:
        problem, arch, _, configs, _, _ = data[key]
        return rank.order(configs, problem, arch)

    def learned_loo(key: str) -> Optional[list]:
        problem, arch, policy, configs, _, _ = data[key]
        samples = [learned.Sample(group=k, problem=p, config=c, time_ms=ms[c.name])
                   for k, (p, a, pol, cs, _, ms) in data.items() if k != key and pol is policy and a is arch
                   for c in cs if ms.get(c.name)]
        model = learned.fit(samples, arch)
        return None if model is None else rank.order(configs, problem, arch, model.scores(problem, configs, arch))

    def nvidia(key: str) -> Optional[list]:
        problem, arch, policy, configs, _, _ = data[key]
        scores = nvmmh.NvMatmulHeuristicsRanker(policy).scores(problem, configs, arch)
        return None if scores is None else rank.order(configs, problem, arch, scores)

    rankers = {"heuristic": heuristic, "learned": learned_loo, "nvmmh": nvidia}
    result: dict[str, Any] = {"top": top, "target": target, "problems": sorted(data), "rankers": {}}
    for name, fn in rankers.items():
        ratios = {}
        for key in data:
            order = fn(key)
            if order is not None:
                ratios[key] = _recall(order, data[key][4], top)
        result["rankers"][name] = {"ratio": ratios, "recalled": sum(r >= target for r in ratios.values()),
                                   "ranked": len(ratios)}
    rng = random.Random(seed)
    ratios = {}
    for key, (_, _, _, configs, speedups, _) in data.items():
        ratios[key] = sum(_recall(rng.sample(configs, len(configs)), speedups, top) for _ in range(shuffles)) / shuffles
    result["rankers"]["random"] = {"ratio": ratios, "recalled": sum(r >= target for r in ratios.values()),
                                   "ranked": len(ratios)}
    if not nvmmh.available().ok:
        result["nvmmh_unavailable"] = nvmmh.available().why
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from fact_ray.bench import require_plotting

    require_plotting()  # one line, before any sweep: the PNG is part of the result
    src = Path(args.sweeps)
    if not src.is_file():
        print(f"no sweeps at {src}: run benchmarks/budget_curve.py first", file=sys.stderr)
        return 2
    result = ablation(json.loads(src.read_text())["sweeps"], args.top, args.target, args.shuffles)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_ablation.json").write_text(json.dumps(result, indent=1))
    print(f"{'ranker':<10} recalled (top {args.top} >= {args.target:.0%} of the sweep's best)   mean ratio")
    for name, r in result["rankers"].items():
        mean = sum(r["ratio"].values()) / max(len(r["ratio"]), 1)
        print(f"{name:<10} {r['recalled']:>3} / {r['ranked']:<3}{'':<40}{mean:.3f}")
    if "nvmmh_unavailable" in result:
        print(f"nvmmh: {result['nvmmh_unavailable']}")
    plot(result, out / "rank_ablation.png")
    print(f"wrote {out / 'rank_ablation.json'}")
    return 0


def plot(result: dict[str, Any], png: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage
    problems = result["problems"]
    names = list(result["rankers"])
    fig = Figure(figsize=(max(8, len(problems) * 0.9), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ratios = result["rankers"][name]["ratio"]
        ax.bar([j + i * width for j in range(len(problems))], [ratios.get(p, 0.0) for p in problems], width,
               label=f"{name} ({result['rankers'][name]['recalled']}/{result['rankers'][name]['ranked']})")
    ax.axhline(result["target"], color="grey", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(problems))], problems, rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylabel(f"best of top {result['top']} / sweep's best")
    ax.set_ylim(0.5, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
