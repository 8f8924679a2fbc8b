"""SwiGLU's first half alone: our one-GEMM kernels against two cuBLAS GEMMs + SiLU * up in eager, interleaved in one
process (issue 16's target: >= 1.1x at 8 x 2048 x 4096 -> 2 x 14336, the 2 x ffn intermediate never written).

    python benchmarks/swiglu.py --dtype bfloat16 --out swiglu.json [--shape M,F,K] [--budget 4] [--prebuilt DIR]

Variants: `eager` (F.silu(F.linear(x, Wg)) * F.linear(x, Wu), the model's op: two GEMMs, a SiLU and a product,
with the [M, F] gate and up projections written and read back), `eager-concat` (one cuBLAS GEMM over the stacked
[Wg; Wu], then silu(gate) * up: the best eager can do with one GEMM), and each swiglu config of the search space
(the first `--budget`), called through the native dispatcher's `fact_ray_native.swiglu` as a composed module calls
it (interleaved weights cached after the first call). Every variant is checked against float64 first (one over the
policy's tolerance is reported, not timed); times are CUDA events around each call with L2 flushed, rounds
interleaved (fact_ray.realize.bench.time_interleaved), medians with p10-p90. `peak_extra_mib` is the memory a call
allocates beyond its output (torch's peak over the call): what the eager variants spend on the intermediate.

`--prebuilt DIR` takes `<source name>.so` files built elsewhere (same template text: the name carries its hash);
`--build-only` builds into DIR and exits (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from fact_ray.errors import first_line
from fact_ray.realize.swiglu import emit_swiglu
from fact_ray.search_spaces import swiglu as space
from fact_ray.types import Arch, Library, Precision, Source

POLICY = {"bfloat16": Precision.BF16, "float16": Precision.FP16}


def library(source: Source, prebuilt: Path | None, cache: str) -> Library:
    if prebuilt is not None and (prebuilt / f"{source.name}.so").is_file():
        return Library(source=source, key=f"prebuilt:{source.name}", ok=True, path=str(prebuilt / f"{source.name}.so"))
    from fact_ray.realize import build as B

    return B.build(source, cache)


def build_all(sources: list[Source], prebuilt: Path | None, cache: str) -> list[Library]:
    with ThreadPoolExecutor(max_workers=max(1, len(sources))) as pool:
        return list(pool.map(lambda s: library(s, prebuilt, cache), sources))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(POLICY))
    ap.add_argument("--shape", default="16384,14336,4096", help="M,F,K (M = batch x tokens)")
    ap.add_argument("--budget", type=int, default=4, help="how many configs of the search space, best first")
    ap.add_argument("--prebuilt", default=None)
    ap.add_argument("--cache", default=".fact-ray/build-cache")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    M, F, K = (int(x) for x in a.shape.split(","))
    policy = POLICY[a.dtype]
    configs = space.space(M, F, K, policy, Arch.SM90, a.budget)
    sources = emit_swiglu(configs, Arch.SM90)
    prebuilt = Path(a.prebuilt) if a.prebuilt else None
    if a.build_only:
        if prebuilt is None:
            ap.error("--build-only needs --prebuilt DIR to write the libraries to")
        prebuilt.mkdir(parents=True, exist_ok=True)
        for src, lib in zip(sources, build_all(sources, None, a.cache)):
            if not lib.ok:
                raise SystemExit(f"{src.name}: build failed: {lib.log[-2000:]}")
            shutil.copyfile(lib.path, prebuilt / f"{src.name}.so")
            print(f"{src.name}: {len(src.configs)} configs, {lib.seconds:.0f} s{', cached' if lib.cached else ''}")
        return 0

    import torch
    import torch.nn.functional as Fn

    from fact_ray.realize import dispatch
    from fact_ray.realize.bench import time_interleaved
    from fact_ray.realize.swiglu import reference
    from fact_ray.realize.swiglu_family import SwiGluProblem

    dt = getattr(torch, a.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(dt)
    wg = (torch.randn(F, K, device="cuda", generator=g) * K ** -0.5).to(dt)
    wu = (torch.randn(F, K, device="cuda", generator=g) * K ** -0.5).to(dt)
    w_cat = torch.cat((wg, wu))

    def eager():
        return Fn.silu(Fn.linear(x, wg)) * Fn.linear(x, wu)

    def eager_concat():
        gate, up = Fn.linear(x, w_cat).chunk(2, dim=-1)
        return Fn.silu(gate) * up

    fns = {"eager": eager, "eager-concat": eager_concat}
    rows: dict[str, dict] = {}
    problem = SwiGluProblem(M=M, F=F, K=K, dtype=a.dtype)
    for src, lib in zip(sources, build_all(sources, prebuilt, a.cache)):
        for cfg, sym in zip(src.configs, src.symbols):
            if not lib.ok:
                rows[cfg.name] = {"status": "compile error", "reason": first_line(lib.log, 200)}
                continue
            call = dispatch.caller(dispatch.bind_swiglu(lib, problem, sym))
            fns[cfg.name] = (lambda call=call: call(x, wg, wu, None, None))

    ref = reference(x.double(), wg.double(), wu.double())
    ref_norm = torch.linalg.vector_norm(ref)
    out_bytes = M * F * x.element_size()
    runnable = {}
    for name, fn in fns.items():
        try:
            fn()  # the first call packs the interleaved weights (kept, like a composed module's)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            y = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base - out_bytes
        except Exception as e:  # a config that refuses this shape is a row with its reason, not a crash
            rows[name] = {"status": "unavailable", "reason": first_line(e, 200)}
            continue
        rel = float(torch.linalg.vector_norm(y.double() - ref) / ref_norm)
        ok = math.isfinite(rel) and rel <= policy.tolerance
        rows[name] = {"status": "ok" if ok else "wrong", "rel_err": rel, "peak_extra_mib": peak / 2**20}
        if ok:
            runnable[name] = fn
        del y
    del ref
    torch.cuda.empty_cache()
    times = time_interleaved(runnable, reps=a.reps)
    flops = 2 * M * (2 * F) * K
    eager_ms = times["eager"].median_ms if "eager" in times else math.nan
    for name, t in times.items():
        rows[name].update(median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, tflops=flops / t.median_ms / 1e9,
                          vs_eager=eager_ms / t.median_ms)
    ours = {n: t.median_ms for n, t in times.items() if n.startswith("swiglu_")}
    best = min(ours, key=ours.get) if ours else None
    result = {"kind": "fact-ray-swiglu-bench", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": a.dtype, "shape": {"M": M, "F": F, "K": K}, "reps": a.reps, "tolerance": policy.tolerance,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows,
              "best": best, "best_vs_eager": (eager_ms / ours[best]) if best else None}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"swiglu first half {a.dtype} M{M} F{F} K{K} on {result['gpu']} (median of {a.reps}, interleaved)")
    print(f"{'variant':<44} {'status':<8} {'median ms':>10} {'p10-p90':>17} {'TFLOP/s':>8} {'vs eager':>9} "
          f"{'rel err':>9} {'extra MiB':>9}")
    for name, r in rows.items():
        if "median_ms" in r:
            print(f"{name:<44} {r['status']:<8} {r['median_ms']:>10.4f} {r['p10_ms']:>8.4f}-{r['p90_ms']:<8.4f} "
                  f"{r['tflops']:>8.0f} {r['vs_eager']:>8.2f}x {r['rel_err']:>9.2e} {r['peak_extra_mib']:>9.0f}")
        else:
            print(f"{name:<44} {r['status']:<8} {r.get('reason', '') or format(r.get('rel_err', math.nan), '.2e')}")
    if best:
        print(f"best: {best}, {result['best_vs_eager']:.2f}x eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
