"""Probe: the GPU environment, PyTorch baselines for the GEMM shapes, and ways to get fp32-class accuracy
from tensor cores, measured with torch ops only (no CUTLASS). Informs the fp32 search space.

  python benchmarks/probe_fp32.py --out $OUT/probe.json
"""
import argparse
import json
import platform
import subprocess
import time

import torch


def rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def bench(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def tf32_split(x):
    # hi = x rounded to tf32 (10 explicit mantissa bits): zero the low 13 bits with round-to-nearest
    xi = x.view(torch.int32)
    hi = ((xi + 0x1000) & ~0x1FFF).view(torch.float32)
    lo = x - hi
    lo = ((lo.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    return hi, lo


def bf16_split3(x):
    hi = x.bfloat16()
    r = x - hi.float()
    mid = r.bfloat16()
    lo = (r - mid.float()).bfloat16()
    return hi, mid, lo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = "cuda"
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "rows": []}
    try:
        res["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except Exception as e:
        res["driver"] = str(e)
    shapes = [("square4096", 1, 4096, 4096, 4096), ("bmm", 128, 512, 2048, 1024),
              ("largeK", 1, 256, 256, 524288), ("qkv", 1, 65536, 2304, 768), ("fc", 1, 65536, 3072, 768),
              ("proj", 1, 65536, 768, 3072), ("attnproj", 1, 65536, 768, 768)]
    for name, L, M, N, K in shapes:
        torch.manual_seed(0)
        A = torch.rand(L, M, K, device=dev)
        B = torch.rand(L, K, N, device=dev)
        ref = torch.bmm(A.double(), B.double())
        flops = 2 * L * M * N * K
        row = {"shape": name, "L": L, "M": M, "N": N, "K": K}

        def rec(key, fn):
            torch.backends.cuda.matmul.allow_tf32 = key.startswith("tf32") or key.startswith("x3tf32") or key.startswith("kcat") or key.startswith("chunk")
            out = fn()
            ms = bench(fn)
            row[key] = {"ms": ms, "tflops": flops / ms / 1e9, "rel": rel(out, ref)}
            torch.backends.cuda.matmul.allow_tf32 = False

        rec("fp32", lambda: torch.bmm(A, B))
        rec("tf32", lambda: torch.bmm(A, B))
        Ab, Bb = A.bfloat16(), B.bfloat16()
        rec("bf16", lambda: torch.bmm(Ab, Bb))
        Ah, Al = tf32_split(A)
        Bh, Bl = tf32_split(B)
        rec("x3tf32_sep", lambda: torch.bmm(Ah, Bh) + (torch.bmm(Ah, Bl) + torch.bmm(Al, Bh)))
        Acat = torch.cat([Ah, Ah, Al], dim=2)
        Bcat = torch.cat([Bh, Bl, Bh], dim=1)
        rec("kcat_tf32", lambda: torch.bmm(Acat, Bcat))
        # K split into chunks with fp32 sums of the partials: is the error the accumulator's chain length?
        for ck in (256, 1024):
            if K % ck == 0 and K // ck > 1 and L * M * N * (K // ck) * 4 < 24e9:
                c = K // ck
                A4 = Acat.view(L, M, 3, c, ck).permute(0, 3, 1, 2, 4).reshape(L * c, M, 3 * ck)
                B4 = Bcat.view(L, 3, c, ck, N).permute(0, 2, 1, 3, 4).reshape(L * c, 3 * ck, N)
                rec(f"chunk{ck}_kcat_tf32", lambda: torch.bmm(A4, B4).view(L, c, M, N).sum(1))
        A1, A2, A3 = bf16_split3(A)
        B1, B2, B3 = bf16_split3(B)
        rec("bf16x6_sep", lambda: ((torch.bmm(A1, B1).float() + (torch.bmm(A1, B2).float() + torch.bmm(A2, B1).float()))
                                   + (torch.bmm(A1, B3).float() + torch.bmm(A3, B1).float() + torch.bmm(A2, B2).float())))
        Ak = torch.cat([A1, A1, A2, A1, A3, A2], dim=2)
        Bk = torch.cat([B1, B2, B1, B3, B1, B2], dim=1)
        rec("bf16x6_kcat", lambda: torch.bmm(Ak, Bk))
        res["rows"].append(row)
        print(name, {k: (round(v["tflops"], 1), f"{v['rel']:.1e}") for k, v in row.items() if isinstance(v, dict)},
              flush=True)
        del A, B, ref, Acat, Bcat, Ak, Bk
        torch.cuda.empty_cache()
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
