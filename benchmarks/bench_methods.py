"""Why `fact-ray bench`'s interleaved table and `triton.testing.do_bench` disagree at small sizes (issue 18).

One Llama-style block in bf16 (RMSNorm, bias-free projections, RoPE, SDPA, SwiGLU; d 1024, 16 heads of 64,
4 x 512 tokens), as eager, torch.compile default and max-autotune, timed five ways on the same inputs:

  interleaved   the bench's method until issue 18 (realize/bench.time_interleaved: 10 warm-up rounds, then 50
                rounds A B C, one event pair per call, L2 flushed before each call, no host sync in the loop)
  interleaved-warm  the same after each variant ran 200 calls in its own loop (isolates the warm-up)
  own-loop      the same event pairs and flushes, each variant in its own loop after 200 warm-up calls
  do_bench      triton.testing.do_bench per variant after 200 warm-up calls (its own warm-up, L2 flush, loop)
  serving       realize/bench.time_serving: latency of one synchronised call, per call of 20 back-to-back calls

  python3 benchmarks/bench_methods.py --out bench-methods.json
"""

import argparse
import json
import math
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fact_ray.realize.bench import l2_flusher, summarize, time_interleaved, time_serving


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class LlamaBlock(nn.Module):
    def __init__(self, d: int = 1024, heads: int = 16, hidden: int = 2816, seq: int = 512) -> None:
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        ang = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def rope(self, x):
        x1, x2 = x[..., ::2], x[..., 1::2]
        c, s = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, C))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def own_loop_events(fn, reps: int) -> list[float]:
    flush = l2_flusher()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in pairs:
        flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]


def warm(fn, n: int = 200) -> None:
    for _ in range(n):
        fn()
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="eager,default,max-autotune")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LlamaBlock().cuda().to(torch.bfloat16).eval()
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16)
    fns, compile_s = {}, {}
    with torch.no_grad():
        for mode in args.modes.split(","):
            m = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
            t0 = time.perf_counter()
            m(x)
            torch.cuda.synchronize()
            compile_s[mode] = time.perf_counter() - t0
            fns[mode] = (lambda m=m: m(x))
            print(f"{mode}: first call {compile_s[mode]:.1f} s", flush=True)
        res: dict = {}
        res["interleaved"] = {n: t.median_ms for n, t in time_interleaved(fns, warmup=10, reps=50).items()}
        for fn in fns.values():
            warm(fn)
        res["interleaved-warm"] = {n: t.median_ms for n, t in time_interleaved(fns, warmup=10, reps=50).items()}
        res["own-loop"] = {}
        for n, fn in fns.items():
            warm(fn)
            res["own-loop"][n] = summarize(own_loop_events(fn, 100)).median_ms
        try:
            from triton.testing import do_bench

            res["do_bench"] = {}
            for n, fn in fns.items():
                warm(fn)
                res["do_bench"][n] = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError as e:
            res["do_bench"] = {"error": str(e)}
        lat, thr = time_serving(fns, rounds=20, calls=20, warmup=10)
        res["serving-latency"] = {n: t.median_ms for n, t in lat.items()}
        res["serving-b2b"] = {n: t.median_ms for n, t in thr.items()}
        # Host time to issue one call (no sync): where it exceeds the GPU time, events time the launch loop.
        res["host-issue"] = {}
        for n, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            res["host-issue"][n] = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
    for method, row in res.items():
        print(f"{method:18s} " + "  ".join(f"{n} {v:.4g}" if isinstance(v, float) else f"{n} {v}"
                                           for n, v in row.items()), flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "model": "LlamaBlock bf16 d1024 h16 hidden2816 B4 T512", "compile_s": compile_s, "ms": res,
           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, allow_nan=False, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)


if __name__ == "__main__":
    main()
