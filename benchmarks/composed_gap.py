"""Why a composed module with no kernel replaced is slower than eager (issue 18): the runnable graph compose
builds (capture -> torch.export -> our rewrites), with nothing replaced, against the module it came from, on the
same GPU and inputs. Per model: GPU time (CUDA events, latency and back-to-back), host time per call (a loop of
unsynchronised calls: what Python and the dispatcher cost), CUDA kernels launched per call and the aten ops
that differ (torch.profiler), and, under torch.compile, the number of graphs and breaks (torch._dynamo.explain).
The same for one composition with the table's winners when --with-table is given.

    python benchmarks/composed_gap.py --policy bf16 --out /tmp/gap.json [benchmarks/models/llama_block.py ...]
    FR_BATCH=1 FR_SEQ=8 FR_EMBD=64 FR_HEADS=4 FR_FFN=128 FR_LAYERS=2 python benchmarks/composed_gap.py --cpu
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ("benchmarks/models/llama_block.py", "benchmarks/models/gpt2_medium_block.py",
           "benchmarks/models/hf_llama.py")


def host_ms(fn, n: int = 50) -> float:
    """Host time per call: n calls without a sync between them (the GPU queue absorbs them unless it is full)."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def profile_ops(fn) -> tuple[int, collections.Counter, collections.Counter]:
    """CUDA kernels per call, and the aten ops and kernel names of one call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ops, kernels = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:70]] += 1
        elif e.name.startswith("aten::") and e.cpu_parent is None or (
                e.name.startswith("aten::") and e.cpu_parent is not None
                and not e.cpu_parent.name.startswith("aten::")):
            ops[e.name] += 1  # top-level aten ops only (not what they call inside)
    return sum(kernels.values()), ops, kernels


def graphs_of(module, inputs) -> dict:
    import torch

    torch._dynamo.reset()
    ex = torch._dynamo.explain(module)(*inputs)
    return {"graphs": ex.graph_count, "breaks": ex.graph_break_count,
            "reasons": [str(r.reason)[:200] for r in ex.break_reasons][:5]}


def one(ref: str, policy: str, reps: int) -> dict:
    import torch

    from fact_ray.capture import capture, load_model, under_policy
    from fact_ray.compose import compose, runnable_module
    from fact_ray.discover import discover
    from fact_ray.realize.bench import time_serving
    from fact_ray.toolchain import detect
    from fact_ray.types import Precision

    pol = Precision(policy)
    loaded = under_policy(load_model(ref), pol)
    captured = capture(loaded)
    matches = discover(captured.graph, detect(nvcc=None).arch, pol)
    composed = compose(captured, matches, {}, pol).to("cuda")
    overloads = runnable_module(captured).to("cuda")  # as export wrote it: aten overloads (before fastcall.py)
    module = loaded.module.to("cuda").eval()
    inputs = [x.to("cuda") if isinstance(x, torch.Tensor) else x for x in loaded.inputs]
    out: dict = {"model": Path(ref).stem, "policy": policy, "matches": len(matches),
                 "input_shapes": [list(x.shape) for x in inputs if isinstance(x, torch.Tensor)]}
    with torch.no_grad():
        fns = {"eager": lambda: module(*inputs), "composed0": lambda: composed(*inputs),
               "composed0_overloads": lambda: overloads(*inputs)}
        for n, f in list(fns.items()):  # a variant that fails is said and left out, the others still measured
            try:
                f()
            except Exception as e:
                out[n] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                if n == "eager":
                    return out
                del fns[n]
        lat, thr = time_serving(fns, rounds=reps, calls=20, warmup=10)
        for n in fns:
            out[n] = {"latency_ms": lat[n].median_ms, "b2b_ms": thr[n].median_ms, "host_ms": host_ms(fns[n])}
            k, ops, kernels = profile_ops(fns[n])
            out[n].update(kernels_per_call=k, ops=dict(ops), kernel_names=dict(kernels))
        if "composed0" not in fns:
            return out
        e_ops, c_ops = collections.Counter(out["eager"]["ops"]), collections.Counter(out["composed0"]["ops"])
        out["ops_only_eager"] = dict(e_ops - c_ops)
        out["ops_only_composed"] = dict(c_ops - e_ops)
        e_k, c_k = collections.Counter(out["eager"]["kernel_names"]), collections.Counter(out["composed0"]["kernel_names"])
        out["kernels_only_eager"] = dict(e_k - c_k)
        out["kernels_only_composed"] = dict(c_k - e_k)
        for n, m in (("eager", module), ("composed0", composed)):
            try:
                out[n]["dynamo"] = graphs_of(m, inputs)
            except Exception as e:  # a diagnosis: say what failed and go on
                out[n]["dynamo"] = {"error": str(e).splitlines()[0][:200]}
        # the same two under torch.compile (default mode), timed together
        torch._dynamo.reset()
        ce, cc = torch.compile(module), torch.compile(composed)
        cf = {"compile_eager": lambda: ce(*inputs), "compile_composed0": lambda: cc(*inputs)}
        for f in cf.values():
            f()
        lat, thr = time_serving(cf, rounds=reps, calls=20, warmup=10)
        for n in cf:
            out[n] = {"latency_ms": lat[n].median_ms, "b2b_ms": thr[n].median_ms, "host_ms": host_ms(cf[n])}
            out[n]["kernels_per_call"] = profile_ops(cf[n])[0]
    return out


def host_only(ref: str, rounds: int = 7, n: int = 30) -> dict:
    """--cpu: host time per call only (tiny tensors on the CPU, best of `rounds`): eager, the composed graph as
    export wrote it (aten overloads) and as compose now builds it (eager's Python bindings, fact_ray/fastcall.py)."""
    import torch

    from fact_ray.capture import capture, load_model
    from fact_ray.compose import compose, runnable_module
    from fact_ray.types import Precision

    torch.set_num_threads(1)  # host cost per op, not OpenMP's wake-ups on a shared machine
    loaded = load_model(ref)
    captured = capture(loaded)
    overloads = runnable_module(captured)
    bindings = compose(captured, [], {}, Precision.FP32)
    module, inputs = loaded.module.eval(), loaded.inputs
    fns = {"eager": lambda: module(*inputs), "composed0_overloads": lambda: overloads(*inputs),
           "composed0_bindings": lambda: bindings(*inputs)}
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for k, f in fns.items():  # alternated, so drift touches all alike
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t0) * 1e3 / n)
    calls = sum(1 for nd in bindings.graph.nodes if nd.op == "call_function")
    return {"model": Path(ref).stem, "device": "cpu", "graph_calls": calls,
            **{k: round(v, 4) for k, v in best.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=list(DEFAULT))
    ap.add_argument("--policy", default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu", action="store_true", help="host time only, on the CPU (tiny sizes: set FR_* first)")
    args = ap.parse_args()
    if args.cpu:
        rows = [host_only(ref) for ref in args.models]
        for r in rows:
            print(json.dumps(r))
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
        return 0
    results = []
    for ref in args.models:
        try:
            r = one(ref, args.policy, args.reps)
        except Exception as e:
            r = {"model": Path(ref).stem, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("eager", "composed0", "composed0_overloads")})[:3000])
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"{'model':22} {'variant':18} {'lat ms':>8} {'b2b ms':>8} {'host ms':>8} {'kernels':>8}")
    for r in results:
        for n in ("eager", "composed0", "composed0_overloads", "compile_eager", "compile_composed0"):
            v = r.get(n)
            if v and "error" in v:
                print(f"{r['model']:22} {n:18} failed: {v['error'][:80]}")
            elif v:
                print(f"{r['model']:22} {n:18} {v['latency_ms']:8.4f} {v['b2b_ms']:8.4f} {v['host_ms']:8.4f} "
                      f"{v['kernels_per_call']:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
