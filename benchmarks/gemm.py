"""GEMM benchmark: fact-ray's CUTLASS configs against the PyTorch op, verified and timed side by side.

Problems: the three Level-1 examples (fp32 inputs) and the four Linear layers of the MiniGPT block (M = 65536),
each under the fp32, tf32 and bf16 policies. For every (problem, policy) the search space is built (--budget
configs), all translation units are compiled in parallel (--jobs), and every config is verified against float64
and timed interleaved with the torch op on this machine's GPU.

    python benchmarks/gemm.py                          # everything, small budget
    python benchmarks/gemm.py --only square,mlp_fc --policy bf16 --budget 8

Writes one JSON line per row to benchmarks/results/<date>-gemm-<gpu>.jsonl (appended; or --out): a "meta"
row (date, git commit, GPU, driver, torch / CUDA / CUTLASS / nvcc versions, arguments), then a "trial" row per
config and per torch op, a "winner" row per problem and policy, and an "error" row for anything that failed
outside a trial. A failure costs its row, never the run. A short table is printed last.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fact_ray import config as settings_mod
from fact_ray.errors import first_line
from fact_ray.realize.bench import BENCH_METHOD_VERSION
from fact_ray.realize.tune import TuneProgress, local_arch, tune_problem
from fact_ray.toolchain import detect
from fact_ray.types import GemmProblem, Precision, to_jsonable

ROOT = Path(__file__).resolve().parent.parent

PROBLEMS: dict[str, GemmProblem] = {
    # KernelBench Level 1 (examples/): torch.matmul / torch.bmm with B stored [K, N]
    "square": GemmProblem(M=4096, N=4096, K=4096, layout_b="row"),
    "bmm": GemmProblem(M=512, N=2048, K=1024, L=128, layout_b="row"),
    "large_k": GemmProblem(M=256, N=256, K=524288, layout_b="row"),
    # MiniGPT block (examples/minigpt.py), batch 128 x seq 512 tokens, nn.Linear weights [N, K]
    "qkv": GemmProblem(M=65536, N=2304, K=768, epilogue="bias"),
    "attn_proj": GemmProblem(M=65536, N=768, K=768, epilogue="bias_residual"),
    "mlp_fc": GemmProblem(M=65536, N=3072, K=768, epilogue="bias_act", activation="gelu_tanh"),
    "mlp_proj": GemmProblem(M=65536, N=768, K=3072, epilogue="bias_residual"),
}
POLICIES = (Precision.FP32, Precision.TF32, Precision.BF16)
DTYPE = {Precision.FP32: "float32", Precision.TF32: "float32", Precision.BF16: "bfloat16",
         Precision.FP16: "float16"}


def _cmd(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except Exception as e:  # noqa: BLE001 - a missing tool is reported, not fatal
        return f"unknown ({type(e).__name__})"
    return done.stdout.strip() if done.returncode == 0 else f"unknown (exit {done.returncode})"


def environment(argv: list[str], settings) -> dict[str, Any]:
    host = detect(settings.nvcc)  # the benchmark compiles: nvcc is needed anyway
    gpu = host.gpu_name
    # A copy of the tree without its .git (a CI artifact, a device machine) may name its commit in the env.
    commit = os.environ.get("FACT_RAY_GIT_COMMIT") or _cmd(["git", "rev-parse", "HEAD"])
    dirty = "" if commit.startswith("unknown") else _cmd(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "kind": "meta",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit + ("+dirty" if dirty and not dirty.startswith("unknown") else ""),
        "gpu": gpu,
        "capability": ".".join(map(str, host.capability)) if host.capability else "",
        "driver": host.driver,
        "cublas": host.cublas,
        "cudnn": host.cudnn,
        "torch": host.torch,
        "cuda": host.torch_cuda,
        "cutlass": host.cutlass,
        "nvcc": host.nvcc,
        "python": sys.version.split()[0],
        "bench_method_version": BENCH_METHOD_VERSION,
        "argv": argv,
        "budget": settings.budget,
    }


class Writer:
    """JSON lines, flushed row by row: a run that dies half-way still leaves every row it reached."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._f = path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._f.write(json.dumps(to_jsonable(row), default=str) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _error_row(stage: str, name: str, policy: str, e: BaseException) -> dict[str, Any]:
    lines = str(e).strip().splitlines()
    return {"kind": "error", "stage": stage, "problem": name, "policy": policy, "error_type": type(e).__name__,
            "error": lines[0] if lines else type(e).__name__, "traceback": traceback.format_exc()}


def _trial_row(name: str, policy: str, problem: GemmProblem, t, chosen: str) -> dict[str, Any]:
    row = {"kind": "trial", "problem": name, "policy": policy, "shape": to_jsonable(problem),
           "config": t.candidate_name, "status": t.status, "error": t.error, "rel_err": t.rel_err,
           "max_abs_err": t.max_abs_err, "time": to_jsonable(t.time), "baseline": to_jsonable(t.baseline),
           "tflops": t.tflops, "speedup": t.speedup, "chosen": t.candidate_name == chosen}
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN -> null


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated problems: {', '.join(PROBLEMS)}")
    ap.add_argument("--policy", default="", help="comma-separated policies: fp32, tf32, bf16")
    ap.add_argument("--budget", type=int, default=4, help="configs per problem and policy (default 4)")
    ap.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: all CPUs)")
    ap.add_argument("--cache-dir", default="", help="build cache (default: the fact-ray settings')")
    ap.add_argument("--out", default="", help="JSON-lines file (default benchmarks/results/<date>-gemm-<gpu>.jsonl)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(PROBLEMS)
    unknown = [n for n in names if n not in PROBLEMS]
    if unknown:
        print(f"unknown problem(s) {', '.join(unknown)}: choose from {', '.join(PROBLEMS)}", file=sys.stderr)
        return 2
    try:
        policies = [Precision(p.strip()) for p in args.policy.split(",") if p.strip()] or list(POLICIES)
    except ValueError as e:
        print(f"bad --policy: {e}", file=sys.stderr)
        return 2
    settings = settings_mod.load({"budget": args.budget, "jobs": args.jobs or None,
                                  "cache_dir": args.cache_dir or None})
    jobs = settings.jobs or os.cpu_count() or 1

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nogpu"
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower().removeprefix("nvidia ")).strip("-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"{_dt.date.today().isoformat()}-gemm-{slug}.jsonl"
    writer = Writer(out)
    console = Console(stderr=True)
    writer.write(environment(argv, settings))
    if not torch.cuda.is_available():
        writer.write({"kind": "error", "stage": "setup", "problem": "", "policy": "",
                      "error": "no CUDA GPU: this benchmark verifies and times kernels on a local GPU"})
        console.print("[red]no CUDA GPU: nothing to benchmark[/] (row written to " + str(out) + ")")
        writer.close()
        return 1

    # Imported after the GPU check so that a machine without the codegen stack still gets its error row.
    try:
        from fact_ray.realize.build import build_many
        from fact_ray.realize.emit import emit
        from fact_ray.search_spaces import space
    except Exception as e:  # noqa: BLE001
        writer.write(_error_row("import", "", "", e))
        console.print(f"[red]cannot import the codegen stack: {e}[/]")
        writer.close()
        return 1

    device = torch.device("cuda", 0)
    summary: list[dict[str, Any]] = []
    try:
        arch = local_arch(device, settings.arch)
    except Exception as e:  # noqa: BLE001
        writer.write(_error_row("arch", "", "", e))
        console.print(f"[red]{e}[/]")
        writer.close()
        return 1

    # 1. spaces and sources for every (problem, policy), 2. one parallel build of all of them.
    groups: list[dict[str, Any]] = []
    for name in names:
        for policy in policies:
            problem = replace(PROBLEMS[name], dtype=DTYPE[policy])
            g = {"name": name, "policy": policy, "problem": problem, "configs": [], "sources": []}
            try:
                g["configs"] = list(space(problem, arch, policy, settings.budget))
                g["sources"] = list(emit(g["configs"], arch)) if g["configs"] else []
            except Exception as e:  # noqa: BLE001
                writer.write(_error_row("space/emit", name, policy.value, e))
                g["failed"] = f"space/emit: {e}"
            if not g["configs"] and "failed" not in g:
                g["failed"] = "the search space is empty"
                writer.write({"kind": "error", "stage": "space", "problem": name, "policy": policy.value,
                              "error": g["failed"]})
            groups.append(g)
    all_sources = [s for g in groups for s in g["sources"]]  # build_many compiles identical code once
    console.print(f"compiling {len(all_sources)} translation units with {jobs} jobs ...")
    t0 = time.perf_counter()
    built: list[Any] = []
    try:
        built = list(build_many(all_sources, settings.resolved_cache_dir, jobs, nvcc=settings.nvcc))
    except Exception as e:  # noqa: BLE001
        writer.write(_error_row("build", "", "", e))
    seen: set[str] = set()
    for lib in built:
        if lib.key in seen:
            continue
        seen.add(lib.key)
        writer.write({"kind": "build", "source": lib.source.name, "key": lib.key, "ok": lib.ok,
                      "cached": lib.cached, "seconds": lib.seconds, "configs": [c.name for c in lib.source.configs],
                      "error": "" if lib.ok else first_line(lib.log)})
    for g in groups:  # results come back in input order, each with its own Source
        g["libraries"], built = built[:len(g["sources"])], built[len(g["sources"]):]
    console.print(f"built in {time.perf_counter() - t0:.0f} s: {len(seen)} distinct libraries")

    # 3. verify and time each group on the GPU
    for g in groups:
        name, policy, problem = g["name"], g["policy"], g["problem"]
        if "failed" in g:
            summary.append({"problem": name, "policy": policy.value, "winner": "-", "note": g["failed"]})
            continue
        libs = g.get("libraries", [])
        console.print(f"[bold]{name}[/] {policy.value}: {len(g['configs'])} configs")

        def progress(ev: TuneProgress) -> None:
            if ev.stage in ("verify", "done"):
                console.print(f"  {ev.stage} {ev.done}/{ev.total} {ev.detail}")

        try:
            choice, trials = tune_problem(problem, g["configs"], libs, policy, device, progress=progress)
        except Exception as e:  # noqa: BLE001
            writer.write(_error_row("tune", name, policy.value, e))
            summary.append({"problem": name, "policy": policy.value, "winner": "-",
                            "note": f"tune failed: {first_line(e)}"})
            torch.cuda.empty_cache()
            continue
        chosen = choice.trial.candidate_name
        for t in trials:
            writer.write(_trial_row(name, policy.value, problem, t, chosen))
        torch_t = trials[0]
        best_kernel = max((t for t in trials[1:] if t.status in ("ok", "slower")),
                          key=lambda t: t.speedup, default=None)
        counts: dict[str, int] = {}
        for t in trials[1:]:
            counts[t.status] = counts.get(t.status, 0) + 1
        row = {"kind": "winner", "problem": name, "policy": policy.value, "winner": chosen,
               "config": to_jsonable(choice.config), "library_key": choice.library_key,
               "time": to_jsonable(choice.trial.time), "torch_time": to_jsonable(torch_t.time),
               "best_kernel": best_kernel.candidate_name if best_kernel else "",
               "best_kernel_speedup": best_kernel.speedup if best_kernel else None, "statuses": counts}
        writer.write(row)
        summary.append({"problem": name, "policy": policy.value, "winner": chosen,
                        "torch_ms": torch_t.time.median_ms if torch_t.time else None,
                        "best_ms": best_kernel.time.median_ms if best_kernel and best_kernel.time else None,
                        "speedup": best_kernel.speedup if best_kernel else None,
                        "tflops": best_kernel.tflops if best_kernel else None,
                        "note": ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))})
        torch.cuda.empty_cache()

    writer.close()
    _print_table(summary, gpu, out)
    return 0


def _print_table(summary: list[dict[str, Any]], gpu: str, out: Path) -> None:
    table = Table(title=f"GEMM on {gpu}: best verified kernel vs the PyTorch op (median ms)")
    for col in ("problem", "policy", "winner", "torch ms", "best kernel ms", "speedup", "TFLOP/s", "trials"):
        table.add_column(col, overflow="fold")

    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for s in summary:
        table.add_row(s["problem"], s["policy"], s["winner"], f(s.get("torch_ms"), ".4g"), f(s.get("best_ms"), ".4g"),
                      f(s.get("speedup"), ".2f"), f(s.get("tflops"), ".1f"), s.get("note", ""))
    console = Console(width=160)
    console.print(table)
    console.print(f"rows written to {out}")


if __name__ == "__main__":
    sys.exit(main())
