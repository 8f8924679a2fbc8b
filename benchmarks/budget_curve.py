"""Budget curves (issue 17): per GEMM problem, the best verified speedup over the PyTorch op found within the
first 4, 16, 64 and 256 candidates of the ranked space, and what each budget costs in wall time.

One sweep per (problem, policy): the space ordered by --ranker, the first --max-budget configs kept (--sweep head),
or half of them from the head and half drawn from the rest (--sweep mixed, the default: so that the ranking
ablation can judge other orders on the same measurements), all translation units compiled in parallel into the
build cache (--jobs; a second call reuses every unit built before), then every config verified against float64
and timed interleaved with the PyTorch op on this machine's GPU (benchmarks/gemm.py's harness).

For each budget b: best speedup among the ranker's first b swept configs, and the wall time a run would spend:
compile (the units those configs need, the measured per-unit seconds spread over --jobs compilers) plus trials
(the measured per-candidate trial time times b). A run with --search halving screens all b candidates and times a
quarter in full; its column uses the sweep's measurements with screening noise added (--screen-noise).

    python benchmarks/budget_curve.py --policy bf16 --only square,qkv --max-budget 64 --out results/budget
    python benchmarks/budget_curve.py --policy bf16 --max-budget 256 --out results/budget   # several calls

Writes <out>/budget_curve.json (every sweep: configs in rank order with their trials, and the curves) and
<out>/budget_curve.png (matplotlib required). The sweeps are what benchmarks/rank_ablation.py reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

BUDGETS = (4, 16, 64, 256)
ETA = 4


def problems() -> dict[str, Any]:
    """benchmarks/gemm.py's seven problems and four more GEMM shapes (at least 8 for the ranking target)."""
    from fact_ray.types import GemmProblem

    from gemm import PROBLEMS  # noqa: E402 - benchmarks/ is on sys.path

    return {**PROBLEMS,
            "square_tn": GemmProblem(M=4096, N=4096, K=4096),
            "wide": GemmProblem(M=8192, N=8192, K=1024),
            "decode": GemmProblem(M=128, N=4096, K=4096),
            "tall_skinny": GemmProblem(M=32768, N=256, K=4096)}


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated problems (default: all)")
    ap.add_argument("--policy", default="bf16", help="comma-separated policies (default bf16)")
    ap.add_argument("--max-budget", type=int, default=256, help="configs swept per problem (default 256)")
    ap.add_argument("--sweep", choices=("mixed", "head"), default="mixed")
    ap.add_argument("--ranker", default="heuristic", help="heuristic | nvmmh (learned needs history: the ablation)")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: all CPUs)")
    ap.add_argument("--cache-dir", default="", help="build cache (default: the fact-ray settings')")
    ap.add_argument("--screen-noise", type=float, default=0.08, help="relative noise of a screening trial")
    ap.add_argument("--out", required=True, help="folder for budget_curve.json and .png")
    return ap.parse_args(argv)


def swept(configs: list, n: int, how: str, seed: int = 0) -> list:
    """The configs a sweep measures, in the ranker's order."""
    if how == "head" or len(configs) <= n:
        return configs[:n]
    head = configs[: n // 2]
    rest = random.Random(seed).sample(configs[n // 2:], n - len(head))
    order = {c.name: i for i, c in enumerate(configs)}
    return sorted(head + rest, key=lambda c: order[c.name])


def curve(sweep: dict[str, Any], jobs: int, screen_noise: float, seed: int = 0) -> list[dict[str, Any]]:
    """Per budget: best speedup within the first b configs (rank search and halving), and the wall time."""
    rows = sweep["configs"]
    out = []
    rng = random.Random(seed)
    for b in BUDGETS:
        if b > len(rows):
            break
        first = rows[:b]
        good = [r for r in first if r["speedup"] and r["status"] in ("ok", "slower")]
        best = max((r["speedup"] for r in good), default=0.0)
        units = {r["unit"] for r in first}
        unit_s = [sweep["units"][u]["seconds"] for u in units]
        compile_s = max(sum(unit_s) / max(jobs, 1), max(unit_s, default=0.0))
        trial_s = sum(r["trial_s"] for r in first)
        # Halving on the same measurements: screen all b with noise, keep the best quarter, pick by the sweep's
        # own (full) measurement among them.
        noisy = sorted(good, key=lambda r: r["rel_time"] * math.exp(rng.gauss(0.0, screen_noise)))
        kept = noisy[: max(1, math.ceil(len(noisy) / ETA))]
        best_halving = max((r["speedup"] for r in kept), default=0.0)
        out.append({"budget": b, "best_speedup": best, "best_speedup_halving": best_halving,
                    "compile_s": compile_s, "trial_s": trial_s, "wall_s": compile_s + trial_s,
                    "halving_trial_s": trial_s / 5 + trial_s * len(kept) / max(len(first), 1)})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from fact_ray.bench import require_plotting

    require_plotting()  # one line, before any sweep: the PNG is part of the result
    import torch

    from fact_ray import config as settings_mod
    from fact_ray.realize.build import build_many
    from fact_ray.realize.emit import emit
    from fact_ray.realize.tune import local_arch, tune_problem
    from fact_ray.search_spaces import rankers, space
    from fact_ray.types import Precision, to_jsonable

    from gemm import DTYPE, environment  # noqa: E402

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probs = problems()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(probs)
    bad = [n for n in names if n not in probs]
    if bad:
        print(f"unknown problem(s) {', '.join(bad)}: choose from {', '.join(probs)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("no CUDA GPU: the budget curve times kernels on a local GPU", file=sys.stderr)
        return 1
    settings = settings_mod.load({"jobs": args.jobs or None, "cache_dir": args.cache_dir or None})
    jobs = settings.jobs or os.cpu_count() or 1
    device = torch.device("cuda", 0)
    arch = local_arch(device, settings.arch)
    path = out / "budget_curve.json"
    result = json.loads(path.read_text()) if path.is_file() else {"sweeps": {}}
    result["meta"] = environment(sys.argv[1:] if argv is None else argv, settings)
    for policy in [Precision(p.strip()) for p in args.policy.split(",") if p.strip()]:
        ranker, why = rankers.choose(args.ranker, policy, arch)
        print(why, flush=True)
        for name in names:
            problem = replace(probs[name], dtype=DTYPE[policy])
            key = f"{name}/{policy.value}"
            t0 = time.monotonic()
            configs = swept(space(problem, arch, policy, ranker=ranker), args.max_budget, args.sweep)
            sources = emit(configs, arch)
            libs = build_many(sources, settings.resolved_cache_dir, jobs, settings.nvcc)
            t_build = time.monotonic() - t0
            unit_of = {c.name: s.name for s in sources for c in s.configs}
            ok = [c for c in configs if any(lib.ok and lib.source.name == unit_of[c.name] for lib in libs)]
            t1 = time.monotonic()
            _, trials = tune_problem(problem, ok, [lib for lib in libs if lib.ok], policy, device)
            t_trials = time.monotonic() - t1
            by = {t.candidate_name: t for t in trials}
            torch_t = by.get("torch")
            rows = []
            for c in configs:
                t = by.get(c.name)
                sp = t.speedup if t is not None and t.speedup == t.speedup else None
                rel = (t.time.median_ms / t.baseline.median_ms) if t is not None and t.time and t.baseline else None
                rows.append({"name": c.name, "config": to_jsonable(c), "unit": unit_of[c.name],
                             "status": t.status.value if t is not None else "compile_error",
                             "speedup": sp, "rel_time": rel, "rel_err": t.rel_err if t is not None else None,
                             "median_ms": t.time.median_ms if t is not None and t.time else None,
                             "trial_s": t_trials / max(len(ok), 1)})
            sweep = {"problem": to_jsonable(problem), "policy": policy.value, "arch": arch.value,
                     "ranker": why, "sweep": args.sweep, "configs": rows,
                     "torch_ms": torch_t.time.median_ms if torch_t and torch_t.time else None,
                     "units": {lib.source.name: {"ok": lib.ok, "seconds": lib.seconds, "cached": lib.cached}
                               for lib in libs},
                     "build_wall_s": t_build, "trial_wall_s": t_trials}
            sweep["curve"] = curve(sweep, jobs, args.screen_noise)
            result["sweeps"][key] = sweep
            path.write_text(json.dumps(result, indent=1, default=str))  # after every sweep: a cut-off call keeps it
            best = [f"{c['budget']}: {c['best_speedup']:.2f}x" for c in sweep["curve"]]
            print(f"{key}: {len(configs)} swept, {len(ok)} built, build {t_build:.0f} s, trials {t_trials:.0f} s; "
                  f"best by budget {', '.join(best)}", flush=True)
    plot(result, out / "budget_curve.png")
    print(f"wrote {path}")
    return 0


def plot(result: dict[str, Any], png: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage
    fig = Figure(figsize=(13, 5))
    ax, bx = fig.subplots(1, 2)
    for key, sw in sorted(result["sweeps"].items()):
        xs = [c["budget"] for c in sw["curve"]]
        ax.plot(xs, [c["best_speedup"] for c in sw["curve"]], marker="o", label=key)
        bx.plot(xs, [c["wall_s"] for c in sw["curve"]], marker="o", label=key)
    for a, label in ((ax, "best verified speedup over the PyTorch op"), (bx, "wall time, s (compile + trials)")):
        a.set_xscale("log", base=2)
        a.set_xticks(list(BUDGETS), [str(b) for b in BUDGETS])
        a.set_xlabel("budget (candidates)")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
