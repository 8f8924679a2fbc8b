"""Per-call cost of calling one of our kernels: aten against the native dispatcher against the Python custom op.

    python benchmarks/dispatch.py --out dispatch.json [--size 64] [--dtype bfloat16] [--calls 2000] [--rounds 15]

A tiny GEMM (default bf16 64x64x64, an nn.Linear without bias: B is the [N, K] weight), so the launch, not the
math, is what a call costs. The kernel is built by the project's own emit/build (sm90a on Hopper, sm80 on Ampere;
the first configuration of the search space that runs without split-K). Variants, each called through its
OpOverload as a composed module's graph calls it:

  aten.mm            torch.ops.aten.mm.default(a, w.t())            the baseline (cuBLAS)
  aten.linear        torch.ops.aten.linear.default(a, w)            what the model's graph held
  native             torch.ops.fact_ray_native.gemm.default(a, w, None, None, kernel)  (realize/dispatch.py)
  python custom op   torch.ops.fact_ray.<name>.default(a, w)        torch.library.custom_op -> Python -> ctypes
  ctypes             GemmKernel(a, w): the Python wrapper alone, no custom op

Two ways to count a call, in interleaved rounds (every variant once per round, the median over rounds reported):
  loop  time `--calls` back-to-back calls, then synchronise: the CPU-side cost per call, what a serving loop sees
        (a launch-bound GPU hides behind it only when the GPU is slower than the host);
  sync  each call followed by a synchronisation, timed alone: the latency of one call.
Overheads are over aten.mm; the target (issue 18) is native <= 3 us over aten in the loop. Needs a CUDA GPU: without
one it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

TARGET_US = 3.0
BASELINE = "aten.mm"


def _kernel(size: int, dtype: str, cache: str):
    """(config, library, symbol, problem) of one tiny GEMM, built here."""
    import torch

    from fact_ray.config import arch_for
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.search_spaces import space
    from fact_ray.types import GemmProblem, Precision

    policy = {"bfloat16": Precision.BF16, "float16": Precision.FP16, "float32": Precision.FP32}[dtype]
    arch = arch_for(torch.cuda.get_device_capability(), torch.cuda.get_device_name(), None)
    problem = GemmProblem(M=size, N=size, K=size, dtype=dtype, epilogue="none")
    for cfg in space(problem, arch, policy, 16):
        if cfg.split_k != 1:
            continue
        (source,) = emit([cfg], arch)
        lib = build(source, cache)
        if lib.ok:
            return cfg, lib, source.symbols[0], problem
        print(f"{cfg.name}: did not build ({lib.log.strip().splitlines()[-1][:200]}); trying the next", file=sys.stderr)
    raise SystemExit("no configuration of the tiny GEMM built")


def _loop_us(fn, calls: int) -> float:
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def _sync_us(fn, calls: int) -> float:
    import torch

    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="M = N = K")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--calls", type=int, default=2000, help="calls per variant per round (loop); a tenth for sync")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cache", default=".fact-ray/build-cache")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("benchmarks/dispatch.py needs a CUDA GPU: none is visible here", file=sys.stderr)
        return 2

    from fact_ray.realize import dispatch
    from fact_ray.realize.kernel import GemmKernel, op_name, register_op

    cfg, lib, symbol, problem = _kernel(args.size, args.dtype, args.cache)
    dispatch.load(args.cache)  # FACT_RAY_DISPATCH does not apply: this compares both paths
    if not dispatch.has_cuda():
        raise SystemExit("the native dispatcher was built without its CUDA impls (a CPU build of torch?)")
    kid = dispatch.register_gemm(lib.path, symbol, problem, cfg.split_k)
    kernel = GemmKernel(lib, cfg, problem)
    register_op(kernel, problem)
    py_op = getattr(torch.ops.fact_ray, op_name(cfg, problem, lib.key)).default

    dt = getattr(torch, args.dtype)
    n = args.size
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=dt, generator=g)
    w = torch.randn(n, n, device="cuda", dtype=dt, generator=g)
    wt = w.t()
    mm, linear, gemm = torch.ops.aten.mm.default, torch.ops.aten.linear.default, torch.ops.fact_ray_native.gemm.default
    variants = {
        "aten.mm": lambda: mm(a, wt),
        "aten.linear": lambda: linear(a, w),
        "native": lambda: gemm(a, w, None, None, kid),
        "python custom op": lambda: py_op(a, w),
        "ctypes": lambda: kernel(a, w),
    }
    with torch.inference_mode():
        ref = variants["aten.linear"]().float()
        for name, fn in variants.items():  # each is the same GEMM, checked before it is timed
            err = (fn().float() - ref).abs().max().item()
            if not err <= 0.05 * ref.abs().max().item():
                raise SystemExit(f"{name}: differs from aten.linear by {err:.3g}")
        for fn in variants.values():  # warm-up: caches, the allocator, the CPU's branch predictors
            _loop_us(fn, 500)
        loop = {k: [] for k in variants}
        sync = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                loop[name].append(_loop_us(fn, args.calls))
            for name, fn in variants.items():
                sync[name].append(_sync_us(fn, max(1, args.calls // 10)))

    med = {k: statistics.median(v) for k, v in loop.items()}
    med_sync = {k: statistics.median(v) for k, v in sync.items()}
    rows = [{"variant": k, "loop_us": med[k], "loop_over_aten_us": med[k] - med[BASELINE],
             "loop_p10_us": _q(loop[k], 0.1), "loop_p90_us": _q(loop[k], 0.9),
             "sync_us": med_sync[k], "sync_over_aten_us": med_sync[k] - med_sync[BASELINE]} for k in variants]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype} {n}x{n}x{n} GEMM, kernel "
          f"{cfg.name}; median of {args.rounds} rounds (loop: {args.calls} back-to-back calls, then sync; sync: "
          f"{max(1, args.calls // 10)} synchronised calls)")
    print(f"{'variant':<18} {'loop us/call':>12} {'over aten.mm':>12} {'sync us/call':>12} {'over aten.mm':>12}")
    for r in rows:
        print(f"{r['variant']:<18} {r['loop_us']:>12.2f} {r['loop_over_aten_us']:>+12.2f} {r['sync_us']:>12.2f} "
              f"{r['sync_over_aten_us']:>+12.2f}")
    native_over = med["native"] - med[BASELINE]
    verdict = "meets" if native_over <= TARGET_US else "misses"
    print(f"native dispatch: {native_over:+.2f} us per call over aten.mm in the loop: {verdict} the <= {TARGET_US:g} "
          f"us target; the Python custom op costs {med['python custom op'] - med['native']:+.2f} us more than native")
    if args.out:
        out = {"what": "per-call dispatch cost, benchmarks/dispatch.py", "target_us_over_aten": TARGET_US,
               "meets_target": native_over <= TARGET_US, "native_over_aten_us": native_over,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "python": platform.python_version(), "dtype": args.dtype, "size": n, "kernel": cfg.name,
               "kernel_id": kid, "calls": args.calls, "rounds": args.rounds, "rows": rows,
               "samples": {"loop_us": loop, "sync_us": sync},
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def _q(xs: list[float], q: float) -> float:
    from fact_ray.realize.bench import quantile

    return quantile(sorted(xs), q)


if __name__ == "__main__":
    sys.exit(main())
