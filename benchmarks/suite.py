"""The model suite of issue 15: `fact-ray run` then `fact-ray bench` on every model of benchmarks/models/, then one
table (model, policy, tokens, eager, torch.compile default and max-autotune, the composed variants, error) as JSON
and Markdown, with the geomean of the best composed variant over the best torch.compile mode.

    python benchmarks/suite.py --policy bf16 --budget 8 --out benchmarks/results/<date>-suite   # on a GPU host
    python benchmarks/suite.py --summarize benchmarks/results/<date>-suite                      # the table again

Each model runs at its file's default sizes (inference sizes: batch 1-8 x 512-2048 tokens) unless FR_* variables
say otherwise; a model whose run or bench fails is a row with its error, and the others go on. Speedups are the
bench's own (one synchronised call, eager's latency over the variant's, same process and inputs).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
COMPILED = ("compile-default", "compile-max-autotune")


def tokens_of(ref: str) -> int:
    """Tokens per call: batch x sequence for token models, batch x patches (+ class token) for images."""
    from fact_ray.capture import load_model

    x = load_model(ref).inputs[0]
    if x.dim() == 4:  # images [B, 3, H, W], patches of 16
        return int(x.shape[0]) * ((int(x.shape[2]) // 16) * (int(x.shape[3]) // 16) + 1)
    return int(x.shape[0]) * int(x.shape[1])


def row_of(result: Any, tokens: int | None) -> dict[str, Any]:
    """One table row from a BenchResult: median ms of eager, each variant's speedup over eager, the best composed
    variant over the best compile mode, the composed module's relative error."""
    by = {r.name: r for r in result.rows}
    ok = {n: r for n, r in by.items() if r.status == "ok" and r.speedup}
    composed = {n: r.speedup for n, r in ok.items() if n.startswith("composed")}
    compiled = {n: r.speedup for n, r in ok.items() if n in COMPILED}
    best_c = max(composed.items(), key=lambda kv: kv[1], default=(None, None))
    best_t = max(compiled.items(), key=lambda kv: kv[1], default=(None, None))
    eager = by.get("eager")
    return {
        "model": result.model, "policy": result.policy.value, "tokens": tokens,
        "eager_ms": eager.time.median_ms if eager is not None and eager.time else None,
        "speedups": {n: r.speedup for n, r in by.items() if r.speedup is not None},
        "status": {n: r.status for n, r in by.items()},
        "best_composed": best_c[0], "best_composed_speedup": best_c[1],
        "best_compile": best_t[0], "best_compile_speedup": best_t[1],
        "composed_over_best_compile": (best_c[1] / best_t[1]) if best_c[1] and best_t[1] else None,
        "composed_rel_err": by["composed"].rel_err if "composed" in by else None,
        "kernels": by["composed"].kernels if "composed" in by else None,
        "error": "",
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["composed_over_best_compile"] for r in rows if r.get("composed_over_best_compile")]
    over_eager = [r["best_composed_speedup"] for r in rows if r.get("best_composed_speedup")]
    geo = (lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None)
    return {"rows": list(rows), "geomean_composed_over_best_compile": geo(ratios),
            "geomean_composed_over_eager": geo(over_eager),
            "models_below_eager": [r["model"] for r in rows if (r.get("best_composed_speedup") or 0) < 1.0]}


def markdown(summary: dict[str, Any]) -> str:
    def x(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines = ["| model | policy | tokens | eager ms | compile default | max-autotune | composed | composed+compile | "
             "composed+max-autotune | best composed / best compile | rel. error | kernels | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        s = r.get("speedups", {})
        lines.append(" | ".join([
            f"| {r['model']}", r.get("policy", "-"), str(r.get("tokens") or "-"),
            "-" if r.get("eager_ms") is None else f"{r['eager_ms']:.4g}",
            x(s.get("compile-default")), x(s.get("compile-max-autotune")), x(s.get("composed")),
            x(s.get("composed+compile")), x(s.get("composed+max-autotune")), x(r.get("composed_over_best_compile")),
            "-" if r.get("composed_rel_err") is None else f"{r['composed_rel_err']:.1e}",
            str(r.get("kernels") if r.get("kernels") is not None else "-"), (r.get("error") or "")[:80]]) + " |")
    g = summary.get("geomean_composed_over_best_compile")
    lines.append(f"\ngeomean of the best composed variant over the best torch.compile mode: {x(g)}; "
                 f"below eager: {', '.join(summary['models_below_eager']) or 'none'}")
    return "\n".join(lines)


def collect(out: Path, tokens: dict[str, int] | None = None, errors: dict[str, str] | None = None) -> dict[str, Any]:
    """Read every bench JSON under out/bench into one summary (rows for failed models from `errors`)."""
    from fact_ray.bench import from_json

    rows = []
    for f in sorted((out / "bench").glob("bench-*.json")):
        result = from_json(json.loads(f.read_text()))
        rows.append(row_of(result, (tokens or {}).get(result.model)))
    seen = {r["model"] for r in rows}
    rows += [{"model": m, "error": e} for m, e in sorted((errors or {}).items()) if m not in seen]
    return summarize(rows)


def write(out: Path, summary: dict[str, Any], policy: str) -> None:
    (out / f"suite-{policy}.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    (out / f"suite-{policy}.md").write_text(markdown(summary) + "\n")
    print(markdown(summary))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="bf16")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--out", default="suite-out")
    ap.add_argument("--models", default="", help="comma list of file stems in benchmarks/models (default: all)")
    ap.add_argument("--variants", default="eager,compile-default,compile-max-autotune,composed,composed+compile,"
                    "composed+max-autotune")
    ap.add_argument("--summarize", default="", help="only read the bench JSONs under this folder again")
    args = ap.parse_args(argv)
    if args.summarize:
        write(Path(args.summarize), collect(Path(args.summarize)), args.policy)
        return 0
    out = Path(args.out)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    # A stem names a file of benchmarks/models/; a path (examples/minigpt.py) names any KernelBench-format file.
    refs = [s for s in args.models.split(",") if s] or sorted(p.stem for p in MODELS.glob("*.py"))
    # Resumable: a GPU call is cut at 10 minutes, so each finished model is recorded in done.json and the summary
    # rewritten after it; the same command on the same machine goes on with the models not done yet.
    ledger = out / "done.json"
    done_before = json.loads(ledger.read_text()) if ledger.exists() else {}
    tokens, errors = dict(done_before.get("tokens", {})), dict(done_before.get("errors", {}))
    for item in refs:
        ref = item if "/" in item else str(MODELS / f"{item}.py")
        stem = Path(ref).stem
        if stem in tokens:
            print(f"# {stem}: done in an earlier call", flush=True)
            continue
        for cmd in (["fact-ray", "run", ref, "--policy", args.policy, "--budget", str(args.budget)],
                    ["fact-ray", "bench", ref, "--policy", args.policy, "--out", str(out / "bench"),
                     "--variants", args.variants]):
            print("$", " ".join(cmd), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            (out / f"{stem}-{cmd[1]}.log").write_text(done.stdout + done.stderr)
            if done.returncode:
                tail = (done.stdout + done.stderr).strip().splitlines()
                errors[stem] = f"{cmd[1]}: {tail[-1] if tail else f'exit {done.returncode}'}"
                break
        tokens[stem] = tokens_of(ref)
        ledger.write_text(json.dumps({"tokens": tokens, "errors": errors}, indent=1))
        write(out, collect(out, tokens, errors), args.policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
