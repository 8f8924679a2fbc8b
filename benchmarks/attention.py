"""Causal attention alone, our kernels against every PyTorch SDPA backend, interleaved in one process.

    python benchmarks/attention.py --dtype bfloat16 --out attention.json [--prebuilt DIR]

Shapes default to the MiniGPT block's (B 128, H 8, S 512, D 96). Candidates: the Hopper FMHA (CUTLASS example 88,
bf16/fp16 on sm90) and example 41 (32x128 block); baselines: the model's explicit softmax attention and
`scaled_dot_product_attention(is_causal=True)` with each backend forced in turn (flash, memory-efficient, cuDNN)
and with PyTorch's own choice. Every variant is checked against float64 first (a variant over the policy's
tolerance is reported, not timed); times are CUDA events around each call with L2 flushed, rounds interleaved
(fact_ray.realize.bench.time_interleaved), medians with p10-p90.

`--prebuilt DIR` takes `<source name>.so` files built elsewhere (the same template text; the name carries its
hash), so a GPU session need not compile; without one, or for a library missing there, it builds into `--cache`.
`--build-only` builds into DIR/`<source name>.so` and exits (no GPU needed).
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


def sources(dtype: str) -> dict[str, Source]:
    out = {"example41-32x128": A.emit_attention([dtype])}
    if dtype != "float32":
        out["fmha-sm90"] = F.emit_fmha(dtype)
    return out


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
    ap.add_argument("--shape", default="128,8,512,96", help="B,H,S,D")
    ap.add_argument("--prebuilt", default=None)
    ap.add_argument("--cache", default=".fact-ray/cache")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    srcs = sources(a.dtype)
    prebuilt = Path(a.prebuilt) if a.prebuilt else None
    if a.build_only:
        if prebuilt is None:
            ap.error("--build-only needs --prebuilt DIR to write the libraries to")
        prebuilt.mkdir(parents=True, exist_ok=True)
        for name, src in srcs.items():
            lib = library(name, src, None, a.cache)
            shutil.copyfile(lib.path, prebuilt / f"{src.name}.so")
            print(f"{name}: {prebuilt / f'{src.name}.so'} ({lib.seconds:.0f} s{', cached' if lib.cached else ''})")
        return 0

    import torch
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fact_ray.realize.bench import time_interleaved

    B, H, S, D = (int(x) for x in a.shape.split(","))
    dt, policy = getattr(torch, a.dtype), POLICY[a.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    # [B, S, 3, H, D] as a fused QKV projection lays them out; q, k, v are [B, H, S, D] views of it, as in the model
    qkv = torch.randn(B, S, 3, H, D, device="cuda", generator=g, dtype=torch.float32).to(dt)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    scale = D ** -0.5
    mask = torch.ones(S, S, dtype=torch.bool, device="cuda").triu(1)

    def explicit():
        s = (q @ k.transpose(-1, -2)) * scale
        return torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1) @ v

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return Fn.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run

    fns = {"explicit (eager)": explicit,
           "sdpa default": lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=True),
           "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
           "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
           "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    for name, src in srcs.items():
        kind = F.FmhaKernel if src.configs[0].template == F.TEMPLATE else A.AttentionKernel
        kern = kind(library(name, src, prebuilt, a.cache))
        out = torch.empty(B, S, H, D, dtype=dt, device="cuda")
        fns[name] = (lambda kern=kern, out=out: kern(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     causal=True, scale=scale, out=out).transpose(1, 2))

    ref = A.reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, scale=scale)
    ref = ref.transpose(1, 2)  # [B, H, S, D]
    rows: dict[str, dict] = {}
    runnable = {}
    for name, fn in fns.items():
        try:
            y = fn()
            torch.cuda.synchronize()
        except Exception as e:  # a backend that refuses this shape is a row with its reason, not a crash
            rows[name] = {"status": "unavailable", "reason": first_line(e, 160)}
            continue
        rel = float(torch.linalg.vector_norm((y.double() - ref)) / torch.linalg.vector_norm(ref))
        ok = math.isfinite(rel) and rel <= policy.tolerance
        rows[name] = {"status": "ok" if ok else "wrong", "rel_err": rel}
        if ok:
            runnable[name] = fn
    del ref
    torch.cuda.empty_cache()
    times = time_interleaved(runnable, reps=a.reps)
    best_sdpa = min((times[n].median_ms for n in times if n.startswith("sdpa")), default=math.nan)
    for name, t in times.items():
        rows[name].update(median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                          vs_best_sdpa=best_sdpa / t.median_ms)
    flops = 4 * B * H * S * S * D / 2  # two GEMMs, the causal half
    result = {"kind": "fact-ray-attention-bench", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": a.dtype, "shape": {"B": B, "H": H, "S": S, "D": D}, "causal": True, "reps": a.reps,
              "tolerance": policy.tolerance, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"causal attention {a.dtype} B{B} H{H} S{S} D{D} on {result['gpu']} (median of {a.reps}, interleaved)")
    print(f"{'variant':<20} {'status':<12} {'median ms':>10} {'p10-p90':>17} {'TFLOP/s':>8} {'vs best SDPA':>12} "
          f"{'rel err':>9}")
    for name, r in rows.items():
        if "median_ms" in r:
            print(f"{name:<20} {r['status']:<12} {r['median_ms']:>10.4f} {r['p10_ms']:>8.4f}-{r['p90_ms']:<8.4f} "
                  f"{flops / r['median_ms'] / 1e9:>8.0f} {r['vs_best_sdpa']:>11.2f}x {r['rel_err']:>9.2e}")
        else:
            print(f"{name:<20} {r['status']:<12} {r.get('reason', '') or format(r.get('rel_err', math.nan), '.2e')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
