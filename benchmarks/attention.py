"""Causal attention alone, our kernels against every PyTorch SDPA backend, interleaved in one process.

    python benchmarks/attention.py --dtype bfloat16 --out attention.json [--prebuilt DIR] [--shape B,H,S,D[,H_kv]]...

Shapes default to the MiniGPT block's (B 128, H 8, S 512, D 96) and Llama-3-8B's grouped-query attention (B 8,
32 query heads over 8 key/value heads, S 2048, D 128); `--shape` (repeatable) replaces them. Candidates: the Hopper
FMHA (CUTLASS example 88, bf16/fp16 on sm90) in every tile of search_spaces/attention.py for the head dim, reading
grouped K and V un-repeated, and, where K and V have every head, example 41 (32x128 block). Baselines: the model's
explicit softmax attention and `scaled_dot_product_attention(is_causal=True)` with each backend forced in turn
(flash, memory-efficient, cuDNN) and with PyTorch's own choice; for grouped heads each of those with
`enable_gqa=True` and, as a model without it would run, after `repeat_interleave` of K and V. Every variant is
checked against float64 first (a variant over the policy's tolerance is reported, not timed; a backend that
refuses the shape is a row with its reason); times are CUDA events around each call with L2 flushed, rounds
interleaved (fact_ray.realize.bench.time_interleaved), medians with p10-p90.

`--prebuilt DIR` takes `<source name>.so` files built elsewhere (the same template text; the name carries its
hash), so a GPU session need not compile; without one, or for a library missing there, it builds into `--cache`
(all missing libraries at once, in parallel). `--build-only` builds into DIR/`<source name>.so` and exits (no GPU
needed).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from fact_ray.errors import first_line
from fact_ray.realize import attention as A
from fact_ray.realize import fmha as F
from fact_ray.types import Arch, Library, Precision, Source

POLICY = {"bfloat16": Precision.BF16, "float16": Precision.FP16, "float32": Precision.FP32}


DEFAULT_SHAPES = ("128,8,512,96", "8,32,2048,128,8")  # MiniGPT's block; Llama-3-8B's grouped-query attention


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """"B,H,S,D" or "B,H,S,D,H_kv" -> (B, H, S, D, H_kv)."""
    parts = [int(x) for x in text.split(",")]
    if len(parts) not in (4, 5) or min(parts) < 1 or (len(parts) == 5 and parts[1] % parts[4]):
        raise SystemExit(f"--shape {text!r}: want B,H,S,D or B,H,S,D,H_kv with H_kv dividing H")
    return (*parts, parts[1])[:5]


def sources(dtype: str, head_dim: int, grouped: bool) -> dict[str, Source]:
    """The candidates for one shape: example 41 (not for grouped K/V) and the FMHA in each tile for the head dim."""
    from fact_ray.search_spaces.attention import fmha_tiles

    out = {} if grouped else {"example41-32x128": A.emit_attention([dtype])}
    if dtype != "float32":
        for t in fmha_tiles(head_dim):
            out[f"fmha-{t.q}x{t.k}x{t.head_dim}"] = F.emit_fmha(dtype, block=t.block)
    return out


def build_all(srcs: dict[str, Source], prebuilt: Path | None, cache: str) -> dict[str, Library]:
    """Every library, the missing ones built in parallel (nvcc processes; memory, not threads, is the limit)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {name: pool.submit(library, name, src, prebuilt, cache) for name, src in srcs.items()}
        return {name: f.result() for name, f in futures.items()}


def library(name: str, source: Source, prebuilt: Path | None, cache: str) -> Library:
    if prebuilt is not None and (prebuilt / f"{source.name}.so").is_file():
        return Library(source=source, key=f"prebuilt:{source.name}", ok=True, path=str(prebuilt / f"{source.name}.so"))
    from fact_ray.realize import build as B

    lib = B.build(source, cache)  # build adds example 41's (and cuRAND's) or example 88's include folders
    if not lib.ok:
        raise SystemExit(f"{name}: build failed: {lib.log[-2000:]}")
    return lib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(POLICY))
    ap.add_argument("--shape", action="append", default=None, help="B,H,S,D[,H_kv] (repeatable)")
    ap.add_argument("--prebuilt", default=None)
    ap.add_argument("--cache", default=".fact-ray/cache")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    shapes = [parse_shape(x) for x in (a.shape or DEFAULT_SHAPES)]
    per_shape = [sources(a.dtype, D, Hkv != H) for _, H, _, D, Hkv in shapes]
    srcs = {src.name: (name, src) for d in per_shape for name, src in d.items()}  # one library per distinct TU
    prebuilt = Path(a.prebuilt) if a.prebuilt else None
    if a.build_only:
        if prebuilt is None:
            ap.error("--build-only needs --prebuilt DIR to write the libraries to")
        prebuilt.mkdir(parents=True, exist_ok=True)
        libs = build_all({n: src for n, src in srcs.values()}, None, a.cache)
        for name, lib in libs.items():
            shutil.copyfile(lib.path, prebuilt / f"{lib.source.name}.so")
            print(f"{name}: {prebuilt / f'{lib.source.name}.so'} ({lib.seconds:.0f} s{', cached' if lib.cached else ''})")
        return 0
    libs = {lib.source.name: lib for lib in build_all(dict(srcs.values()), prebuilt, a.cache).values()}
    results = [bench_shape(a, shape, {name: libs[src.name] for name, src in d.items()})
               for shape, d in zip(shapes, per_shape)]
    if a.out:
        Path(a.out).write_text(json.dumps(results if len(results) > 1 else results[0], indent=1, sort_keys=True))
    return 0


def bench_shape(a: argparse.Namespace, shape: tuple[int, int, int, int, int], libs: dict[str, Library]) -> dict:
    """One shape: every variant checked against float64, then timed interleaved; the table printed, a dict back."""
    import torch
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fact_ray.realize.bench import time_interleaved

    B, H, S, D, Hkv = shape
    grouped = Hkv != H
    dt, policy = getattr(torch, a.dtype), POLICY[a.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    # [B, S, H + 2 H_kv, D] as a fused QKV projection lays them out; q, k, v are [B, H(_kv), S, D] views of it, as
    # in the model
    qkv = torch.randn(B, S, H + 2 * Hkv, D, device="cuda", generator=g, dtype=torch.float32).to(dt)
    q, k, v = (qkv[:, :, lo:hi].transpose(1, 2) for lo, hi in ((0, H), (H, H + Hkv), (H + Hkv, H + 2 * Hkv)))
    del qkv  # the views keep it alive
    scale = D ** -0.5
    mask = torch.ones(S, S, dtype=torch.bool, device="cuda").triu(1)
    group = H // Hkv

    def repeated(t):
        return t.repeat_interleave(group, dim=1) if grouped else t

    def explicit():
        s = (q @ repeated(k).transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1) @ repeated(v)

    def sdpa(backend, gqa):
        def run():
            with sdpa_kernel([backend]) if backend is not None else _nothing():
                if gqa:
                    return Fn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                return Fn.scaled_dot_product_attention(q, repeated(k), repeated(v), is_causal=True)
        return run

    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    fns = {"explicit (eager)": explicit}
    for bname, backend in backends.items():
        if grouped:
            fns[f"sdpa {bname} enable_gqa"] = sdpa(backend, True)
            fns[f"sdpa {bname} after repeat"] = sdpa(backend, False)
        else:
            fns[f"sdpa {bname}"] = sdpa(backend, False)
    for name, lib in libs.items():
        kind = F.FmhaKernel if lib.source.configs[0].template == F.TEMPLATE else A.AttentionKernel
        kern = kind(lib)
        out = torch.empty(B, S, H, D, dtype=dt, device="cuda")
        fns[name] = (lambda kern=kern, out=out: kern(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     causal=True, scale=scale, out=out).transpose(1, 2))

    # float64 reference one batch entry at a time (B 8 x 32 heads x 2048^2 scores would not fit at once)
    rows: dict[str, dict] = {}
    runnable = {}
    outs = {}
    for name, fn in fns.items():
        try:
            outs[name] = fn()
            torch.cuda.synchronize()
        except Exception as e:  # a backend that refuses this shape is a row with its reason, not a crash
            rows[name] = {"status": "unavailable", "reason": first_line(e, 160)}
    errs = {name: [0.0, 0.0] for name in outs}  # squared error, squared reference norm
    for b in range(B):
        ref = A.reference(q[b:b + 1].transpose(1, 2), k[b:b + 1].transpose(1, 2), v[b:b + 1].transpose(1, 2),
                          causal=True, scale=scale).transpose(1, 2)
        for name, y in outs.items():
            errs[name][0] += float(torch.linalg.vector_norm(y[b:b + 1].double() - ref)) ** 2
            errs[name][1] += float(torch.linalg.vector_norm(ref)) ** 2
        del ref
    for name, (e2, r2) in errs.items():
        rel = math.sqrt(e2 / r2) if r2 else math.nan
        ok = math.isfinite(rel) and rel <= policy.tolerance
        rows[name] = {"status": "ok" if ok else "wrong", "rel_err": rel}
        if ok:
            runnable[name] = fns[name]
    del outs
    torch.cuda.empty_cache()
    times = time_interleaved(runnable, reps=a.reps)
    sdpa_times = [times[n].median_ms for n in times if n.startswith("sdpa")]
    best_sdpa = min(sdpa_times, default=math.nan)
    best_gqa = min((times[n].median_ms for n in times if n.endswith("enable_gqa")), default=math.nan)
    for name, t in times.items():
        rows[name].update(median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                          vs_best_sdpa=best_sdpa / t.median_ms, vs_best_enable_gqa=best_gqa / t.median_ms)
    flops = 4 * B * H * S * S * D / 2  # two GEMMs, the causal half
    result = {"kind": "fact-ray-attention-bench", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": a.dtype, "shape": {"B": B, "H": H, "S": S, "D": D, "H_kv": Hkv}, "causal": True,
              "reps": a.reps, "tolerance": policy.tolerance,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    print(f"causal attention {a.dtype} B{B} H{H} H_kv{Hkv} S{S} D{D} on {result['gpu']} (median of {a.reps}, "
          f"interleaved)")
    print(f"{'variant':<28} {'status':<12} {'median ms':>10} {'p10-p90':>17} {'TFLOP/s':>8} {'vs best SDPA':>12} "
          f"{'rel err':>9}")
    for name, r in rows.items():
        if "median_ms" in r:
            print(f"{name:<28} {r['status']:<12} {r['median_ms']:>10.4f} {r['p10_ms']:>8.4f}-{r['p90_ms']:<8.4f} "
                  f"{flops / r['median_ms'] / 1e9:>8.0f} {r['vs_best_sdpa']:>11.2f}x {r['rel_err']:>9.2e}")
        else:
            print(f"{name:<28} {r['status']:<12} {r.get('reason', '') or format(r.get('rel_err', math.nan), '.2e')}")
    return result


def _nothing():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    sys.exit(main())
