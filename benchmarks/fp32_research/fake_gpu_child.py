"""A CPU stand-in for run_gpu.py's GPU side, for testing the driver's process logic on a host without a GPU.

    python benchmarks/fp32_research/fake_gpu_child.py --out /tmp/dry.json --no-build --config-timeout 3

It runs run_gpu.main() with tiny shapes, host tensors, timing events on the host clock and fake libraries
that compute the GEMM with torch on the memory behind the pointers they are given. Some fake variants
misbehave on purpose, so that the driver's handling of each case can be checked:
  p1_c128x256x32      returns "cannot implement"
  p1_pp64x128x32      hangs on the square shape (the driver must kill it, then skip the variant)
  p1_c128x128x32_sk   makes the next synchronize raise a CUDA error on the bmm shape (a crash)
  stock_c128x128x32   is 0.1% wrong everywhere (must be reported as not accurate)
Nothing here measures anything; it is a test double, used by test_fp32_research.py.
"""
import ctypes
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import run_gpu as R  # noqa: E402


TINY = {"square4096": (1, 64, 64, 32), "bmm": (3, 32, 48, 16), "largeK": (1, 16, 16, 1024),
        "qkv": (1, 128, 40, 16), "proj": (1, 128, 16, 48)}


class _Event:
    def __init__(self, **_):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3 + 1e-3


class _Stream:
    cuda_stream = 0


_poisoned = {"flag": False}  # set by a "crashing" launch; the next synchronize raises, as CUDA would


def _synchronize(*_):
    if _poisoned["flag"]:
        _poisoned["flag"] = False
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _host(ptr: int, n: int) -> torch.Tensor:
    return torch.frombuffer((ctypes.c_float * n).from_address(ptr), dtype=torch.float32)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


class _Fn:
    """A callable with the restype/argtypes attributes the driver sets on ctypes functions."""

    def __init__(self, f):
        self.f, self.restype, self.argtypes = f, None, None

    def __call__(self, *a):
        return self.f(*a)


def _split(X, Y, L, R_, K, sb, sr, sk, nparts, mask, stream):
    x = torch.as_strided(_host(X, (L - 1) * sb + (R_ - 1) * sr + (K - 1) * sk + 1), (L, R_, K), (sb, sr, sk))
    y = _host(Y, L * R_ * nparts * K).view(L, R_, nparts, K)
    hi = _tf32(x.clone())
    lo = _tf32(x - hi)
    for p in range(nparts):
        y[:, :, p, :] = lo if (mask >> p) & 1 else hi
    return 0


_SM90 = {"family": "sm90_kcat3", "operands": "kcat3", "tile": [128, 128, 32]}
_VARIANTS = {
    "promo_a": [("stock_c128x128x32", {**_SM90, "mainloop": "stock_fp8"}, 4),
                ("p1_c128x128x32", {**_SM90, "mainloop": "p1"}, 4),
                ("plain_c128x128x32", {**_SM90, "mainloop": "plain"}, 4),
                ("p1_c128x256x32", {**_SM90, "mainloop": "p1"}, 4)],
    "promo_b": [("p1_c128x128x32_sk", {**_SM90, "mainloop": "p1"}, 4),
                ("p1_pp64x128x32", {**_SM90, "mainloop": "p1"}, 4)],
    "sm80_3xtf32": [("s80_a", {"family": "sm80_3xtf32", "operands": "raw_rowmajor", "tile": [64, 64, 16]}, 0)],
}


def _library(path):
    name = os.path.basename(str(path))[:-3]
    lib = type("FakeLib", (), {})()
    if name == "split":
        lib.fr_split = _Fn(_split)
        return lib
    vs = _VARIANTS[name]

    def run(i, A, B, D, M, N, K, L, promo, splits, ws, wsn, stream):
        vname = vs[i][0]
        if vname == "p1_c128x256x32":
            return 1
        if vname == "p1_pp64x128x32" and M == TINY["square4096"][1]:
            time.sleep(3600)
        if vname == "p1_c128x128x32_sk" and L == TINY["bmm"][0]:
            _poisoned["flag"] = True
        a = _host(A, L * M * K).view(L, M, K).double()
        d = _host(D, L * M * N).view(L, M, N)
        if vs[i][1]["family"] == "sm80_3xtf32":
            d.copy_(torch.bmm(a, _host(B, L * K * N).view(L, K, N).double()).float())
        else:
            d.copy_(torch.bmm(a, _host(B, L * N * K).view(L, N, K).double().transpose(1, 2)).float())
        if vname == "stock_c128x128x32":
            d.mul_(1.001)
        return 0

    lib.fr_num_variants = lambda: len(vs)
    lib.fr_variant_name = _Fn(lambda i: vs[i][0].encode())
    lib.fr_variant_meta = _Fn(lambda i: json.dumps(vs[i][1]).encode())
    lib.fr_variant_mmas_per_ktile = lambda i: vs[i][2]
    lib.fr_workspace = _Fn(lambda *a: 16)
    lib.fr_run = _Fn(run)
    return lib


def main() -> int:
    R.DEVICE = "cpu"
    R.SHAPES.update(TINY)
    R.__file__ = __file__  # the driver starts its children with this file, so they get these fakes too
    torch.cuda.Event = _Event
    torch.cuda.synchronize = _synchronize
    torch.cuda.current_stream = lambda: _Stream()
    torch.cuda.empty_cache = lambda: None
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_name = lambda *a: "fake"
    ctypes.CDLL = _library
    return R.main()


if __name__ == "__main__":
    sys.exit(main())
