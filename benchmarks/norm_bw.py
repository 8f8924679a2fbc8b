"""Norm and RoPE kernels alone: achieved bandwidth against a torch copy of the same bytes, eager and torch.compile.

    python benchmarks/norm_bw.py --dtype bfloat16 --out norm_bw.json [--budget 6] [--reps 50] [--no-compile]

Norm shapes (`--shapes`, rows x ... x hidden): Llama-3-8B's 8 x 2048 x 4096 and MiniGPT's 65536 x 768 by default,
RMSNorm (eager: HF's LlamaRMSNorm, float32 upcast inside) and LayerNorm (F.layer_norm), each with its weight (and
bias). Every launch shape the norm family would try (`--budget` of them, realize/norm.py) is built, checked against
float64 and timed, through the call a composed module makes (the native dispatcher where it builds, else the
kernel's ctypes call); then the fused residual add + norm (`h = x + r; y = norm(h)`, both written) in the fastest
launch shape against eager's add then norm. RoPE (`--rope`, B,H,S,D of q then k, Llama-3-8B's 32 and 8 heads of 128
over 8 x 2048 tokens by default): [B, H, S, D] views of the [B, S, H * D] projections, [S, D] cos/sin tables,
rotate_half form; each launch shape on q alone, and q and k in one launch against eager's two.

Bandwidth is bytes a variant must move (x read and y written; the residual's r read and h written; the tables and
weights once) over its median time (CUDA events around each call, L2 flushed, rounds interleaved:
fact_ray.realize.bench.time_interleaved). "of copy" divides by the bandwidth of `y.copy_(x)` over the same bytes,
timed in the same rounds: issue 16 asks >= 80%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from fact_ray.errors import first_line
from fact_ray.types import Arch, Library, Precision, Source

POLICY = {"bfloat16": Precision.BF16, "float16": Precision.FP16, "float32": Precision.FP32}
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def build_all(sources: list[Source], cache: str) -> list[Library]:
    """Each source built (nvcc through the cache), several at once: nvcc runs in its own process."""
    from fact_ray.realize import build as B

    with ThreadPoolExecutor(max_workers=8) as pool:
        libs = list(pool.map(lambda s: B.build(s, cache), sources))
    for lib in libs:
        if not lib.ok:
            raise SystemExit(f"{lib.source.name}: build failed: {first_line(lib.log)}")
    return libs


def checked(fn, ref, policy: Precision) -> tuple[bool, float]:
    import torch

    out = fn()
    torch.cuda.synchronize()
    out = out[-1] if isinstance(out, tuple) else out
    rel = float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))
    return math.isfinite(rel) and rel <= policy.tolerance, rel


def measure(fns: dict, refs: dict, nbytes: dict, policy: Precision, reps: int) -> dict[str, dict]:
    """Check every variant against its float64 reference (a wrong one is reported, not timed), time the rest."""
    from fact_ray.realize.bench import time_interleaved

    rows, runnable = {}, {}
    for name, fn in fns.items():
        try:
            ok, rel = checked(fn, refs[name], policy) if name in refs else (True, math.nan)
        except Exception as e:  # a variant that cannot run this shape is a row with its reason
            rows[name] = {"status": "unavailable", "reason": first_line(e)}
            continue
        rows[name] = {"status": "ok" if ok else "wrong", "rel_err": rel, "bytes": nbytes[name]}
        if ok:
            runnable[name] = fn
    times = time_interleaved(runnable, reps=reps)
    copy_bw = {}
    for name, t in times.items():
        bw = nbytes[name] / (t.median_ms * 1e-3) / 1e9
        rows[name].update(median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, gb_s=bw)
        if name.startswith("copy"):
            copy_bw[name] = bw
    best_copy = max(copy_bw.values(), default=math.nan)
    for name, r in rows.items():
        if "gb_s" in r:
            r["of_copy"] = r["gb_s"] / best_copy
    return rows


def print_rows(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'variant':<34} {'status':<8} {'median ms':>10} {'p10-p90':>17} {'GB/s':>7} {'of copy':>8} {'rel err':>9}")
    for name, r in rows.items():
        if "median_ms" in r:
            print(f"{name:<34} {r['status']:<8} {r['median_ms']:>10.4f} {r['p10_ms']:>8.4f}-{r['p90_ms']:<8.4f} "
                  f"{r['gb_s']:>7.0f} {r['of_copy']:>7.0%} {r['rel_err']:>9.2e}")
        else:
            print(f"{name:<34} {r['status']:<8} {r.get('reason', '') or format(r.get('rel_err', math.nan), '.2e')}")


def norm_bench(shape: tuple[int, ...], kind: str, dtype: str, arch: Arch, a) -> dict:
    import torch
    import torch.nn.functional as F

    from fact_ray.realize import norm as N
    from fact_ray.realize.dispatch import composed_fused
    from fact_ray.realize.norm_family import NormFamily, NormProblem

    policy, e = POLICY[dtype], _BYTES[dtype]
    cols, rows = shape[-1], math.prod(shape[:-1])
    eps = 1e-6 if kind == "rmsnorm" else 1e-5
    problem = NormProblem(rows=rows, cols=cols, kind=kind, dtype=dtype, eps=eps, has_weight=True,
                          has_bias=kind == "layernorm")
    fam = NormFamily()
    configs = fam.candidates(problem, policy, arch, a.budget)
    libs = build_all(fam.sources(configs, arch), a.cache)
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 0.5).to(dt)
    r = torch.randn(shape, device="cuda", generator=g).to(dt)
    w = (1 + 0.1 * torch.randn(cols, device="cuda", generator=g)).to(dt)
    b = (0.1 * torch.randn(cols, device="cuda", generator=g)).to(dt) if problem.has_bias else None
    y = torch.empty_like(x)

    def eager(x):
        if kind == "layernorm":
            return F.layer_norm(x, (cols,), w, b, eps)
        h = x.float()  # HF's LlamaRMSNorm
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def eager_add(x, r):
        h = x + r
        return h, eager(h)

    io = (2 * rows * cols + cols * (2 if b is not None else 1)) * e
    fns, nbytes, refs = {"copy": lambda: y.copy_(x)}, {"copy": 2 * rows * cols * e}, {}
    ref = N.reference(x, w, b, eps, kind)
    fns["eager"], nbytes["eager"], refs["eager"] = (lambda: eager(x)), io, ref
    if kind == "rmsnorm" and hasattr(F, "rms_norm"):
        fns["aten rms_norm"] = lambda: F.rms_norm(x, (cols,), w, eps)
        nbytes["aten rms_norm"], refs["aten rms_norm"] = io, ref
    if a.compile:
        compiled = torch.compile(eager)
        fns["compile"], nbytes["compile"], refs["compile"] = (lambda: compiled(x)), io, ref
    for cfg, lib in zip(configs, libs):
        call = composed_fused(fam, problem, cfg, lib)
        fns[cfg.name] = lambda call=call: call(x, w, b)  # the op's operands: x, weight, bias (None for RMSNorm)
        nbytes[cfg.name], refs[cfg.name] = io, ref
    result = {"shape": list(shape), "kind": kind, "norm": measure(fns, refs, nbytes, POLICY[dtype], a.reps)}
    print_rows(f"{kind} {dtype} {'x'.join(map(str, shape))}", result["norm"])

    # residual add + norm, fused, in the fastest launch shape
    ours = {n: rr for n, rr in result["norm"].items() if n.startswith("norm_") and "median_ms" in rr}
    if ours:
        best = min(ours, key=lambda n: ours[n]["median_ms"])
        kernel = N.NormKernel(libs[[c.name for c in configs].index(best)])
        h_out, y_out = torch.empty_like(x), torch.empty_like(x)
        io_add = (4 * rows * cols + cols * (2 if b is not None else 1)) * e
        h_ref = (x + r)
        add_ref = N.reference(h_ref, w, b, eps, kind)
        fns = {"copy x2": lambda: (y.copy_(x), h_out.copy_(r)),
               "eager add + norm": lambda: eager_add(x, r),
               f"fused add + {best}": lambda: kernel.add_norm(x, r, kind, w, b, eps, out=y_out, h_out=h_out)}
        nbytes = {n: io_add for n in fns}
        nbytes["copy x2"] = 4 * rows * cols * e
        refs = {n: add_ref for n in fns if n != "copy x2"}
        if a.compile:
            compiled_add = torch.compile(eager_add)
            fns["compile add + norm"], nbytes["compile add + norm"] = (lambda: compiled_add(x, r)), io_add
            refs["compile add + norm"] = add_ref
        result["add_norm"] = measure(fns, refs, nbytes, POLICY[dtype], a.reps)
        kernel.add_norm(x, r, kind, w, b, eps, out=y_out, h_out=h_out)
        result["add_norm_h_exact"] = bool(torch.equal(h_out, h_ref))  # h rounded as PyTorch's add rounds it
        print_rows(f"residual add + {kind} {dtype} {'x'.join(map(str, shape))} (h exact: "
                   f"{result['add_norm_h_exact']})", result["add_norm"])
    return result


def rope_bench(q_shape: tuple[int, int, int, int], kv_heads: int, dtype: str, arch: Arch, a) -> dict:
    import torch

    from fact_ray.realize import rope as R
    from fact_ray.realize.dispatch import composed_fused
    from fact_ray.realize.rope_family import RopeFamily, RopeProblem

    B, H, S, D = q_shape
    policy, e, dt = POLICY[dtype], _BYTES[dtype], getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, S, H * D, device="cuda", generator=g).to(dt).view(B, S, H, D).transpose(1, 2)
    k = torch.randn(B, S, kv_heads * D, device="cuda", generator=g).to(dt).view(B, S, kv_heads, D).transpose(1, 2)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D)  # Llama-3's theta
    freqs = torch.outer(torch.arange(S, device="cuda").float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    problem = RopeProblem(x_shape=tuple(q.shape), x_stride=tuple(q.stride()), cos_shape=tuple(cos.shape),
                          sin_shape=tuple(sin.shape), form="half", dtype=dtype)
    fam = RopeFamily()
    configs = fam.candidates(problem, policy, arch, a.budget)
    libs = build_all(fam.sources(configs, arch), a.cache)
    eager = fam.torch_fn(problem)
    n_q, n_k, tables = q.numel(), k.numel(), 2 * cos.numel()
    q_ref, k_ref = R.reference(q, cos, sin, "half"), R.reference(k, cos, sin, "half")
    dst = torch.empty_like(q)
    fns = {"copy": lambda: dst.copy_(q), "eager": lambda: eager(q, cos, sin)}
    nbytes = {"copy": 2 * n_q * e, "eager": (2 * n_q + tables) * e}
    refs = {"eager": q_ref}
    if a.compile:
        compiled = torch.compile(eager)
        fns["compile"], nbytes["compile"], refs["compile"] = (lambda: compiled(q, cos, sin)), nbytes["eager"], q_ref
    for cfg, lib in zip(configs, libs):
        call = composed_fused(fam, problem, cfg, lib)
        fns[cfg.name] = lambda call=call: call(q, cos, sin)
        nbytes[cfg.name], refs[cfg.name] = nbytes["eager"], q_ref
    result = {"q_shape": list(q_shape), "kv_heads": kv_heads, "rope_q": measure(fns, refs, nbytes, policy, a.reps)}
    print_rows(f"rope {dtype} q [{B}, {H}, {S}, {D}] (a view of [B, S, H * D]), [S, D] tables", result["rope_q"])

    ours = {n: rr for n, rr in result["rope_q"].items() if n.startswith("rope_") and "median_ms" in rr}
    if ours:
        best = min(ours, key=lambda n: ours[n]["median_ms"])
        kernel = R.RopeKernel(libs[[c.name for c in configs].index(best)])
        kdst = torch.empty_like(k)
        io = (2 * (n_q + n_k) + tables) * e
        fns = {"copy q, k": lambda: (dst.copy_(q), kdst.copy_(k)),
               "eager q, k": lambda: (eager(q, cos, sin), eager(k, cos, sin)),
               f"one launch {best}": lambda: kernel.apply_qk(q, k, cos, sin, "half")}
        nbytes = {n: io for n in fns}
        nbytes["copy q, k"] = 2 * (n_q + n_k) * e
        refs = {n: k_ref for n in fns if not n.startswith("copy")}  # the tuple's last: k
        if a.compile:
            compiled_qk = torch.compile(lambda q, k, c, s: (eager(q, c, s), eager(k, c, s)))
            fns["compile q, k"], nbytes["compile q, k"], refs["compile q, k"] = \
                (lambda: compiled_qk(q, k, cos, sin)), io, k_ref
        result["rope_qk"] = measure(fns, refs, nbytes, policy, a.reps)
        qo, ko = kernel.apply_qk(q, k, cos, sin, "half")
        result["rope_qk_q_rel_err"] = float(torch.linalg.vector_norm(qo.double() - q_ref) /
                                            torch.linalg.vector_norm(q_ref))
        print_rows(f"rope {dtype} q and k ({kv_heads} heads) in one launch", result["rope_qk"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(POLICY))
    ap.add_argument("--shapes", default="8x2048x4096,65536x768", help="norm inputs, comma list of AxBx...xHIDDEN")
    ap.add_argument("--kinds", default="rmsnorm,layernorm")
    ap.add_argument("--rope", default="8,32,2048,128,8", help="B,H,S,D,KV_HEADS of q and k ('' for none)")
    ap.add_argument("--budget", type=int, default=6, help="launch shapes of each kernel to try")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--cache", default=".fact-ray/build-cache")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("norm_bw.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    from fact_ray.toolchain import detect

    arch = detect(nvcc=None).arch
    result = {"kind": "fact-ray-norm-bw", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": a.dtype, "arch": str(getattr(arch, "value", arch)), "reps": a.reps, "budget": a.budget,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "norms": [], "rope": []}
    with torch.no_grad():
        for spec in filter(None, a.shapes.split(",")):
            shape = tuple(int(v) for v in spec.split("x"))
            for kind in filter(None, a.kinds.split(",")):
                result["norms"].append(norm_bench(shape, kind, a.dtype, arch, a))
                torch.cuda.empty_cache()
        if a.rope:
            B, H, S, D, KV = (int(v) for v in a.rope.split(","))
            result["rope"].append(rope_bench((B, H, S, D), KV, a.dtype, arch, a))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
