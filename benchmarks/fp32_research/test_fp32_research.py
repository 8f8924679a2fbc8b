"""Tests of the fp32 research tooling (not collected by the main suite; run explicitly):

    .venv/bin/pytest benchmarks/fp32_research -q            # CPU parts (~30 s)
    .venv/bin/pytest benchmarks/fp32_research -q -m gpu     # on a GPU host (builds promo_a: ~2 min)
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build as fr_build  # noqa: E402
import run_gpu  # noqa: E402


def _torch_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


gpu = pytest.mark.skipif(not _torch_cuda(), reason="needs a CUDA GPU")


def test_config_ids_are_unique_and_promotion_encodes():
    metas = {name: {"family": "sm90_kcat3", "mainloop": "plain" if name.startswith("plain") else "p1"}
             for name in run_gpu.PLANS}
    metas["s80_x"] = {"family": "sm80_3xtf32"}
    for shape in run_gpu.SHAPES:
        ids = [run_gpu.config_id("lib", shape, n, k) for n, m in metas.items() for k in run_gpu.plan(n, m, shape)]
        assert len(ids) == len(set(ids)), shape
    for knobs in run_gpu.PLANS.values():
        for k in knobs:
            for mmas in (4, 8):
                promo = min(k.get("G", 1), run_gpu.NEVER) * mmas
                assert promo % mmas == 0 and promo < run_gpu.STAGGER  # the stagger bit never collides
                assert (promo | run_gpu.STAGGER) % mmas == 0          # stock can_implement still passes


def test_stamp_follows_sources_and_flags(tmp_path, monkeypatch):
    for name in ("split.cu", "promo_a.cu", "fr_sm90_tf32x3.cuh", "fr_registry.h"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "templates").mkdir()
    mainloop = tmp_path / "templates" / "fr_tf32x3_mainloop.hpp"
    shutil.copy(fr_build.TEMPLATES / mainloop.name, mainloop)  # production's header, which the prototypes include
    monkeypatch.setattr(fr_build, "HERE", tmp_path)
    monkeypatch.setattr(fr_build, "TEMPLATES", tmp_path / "templates")
    before = {n: fr_build.stamp(n, None) for n in ("split", "promo_a")}
    mainloop.write_text(mainloop.read_text() + "\n")
    after = {n: fr_build.stamp(n, None) for n in ("split", "promo_a")}
    assert after["split"] == before["split"]
    assert after["promo_a"] != before["promo_a"]  # a change to the production mainloop rebuilds the prototypes
    monkeypatch.setattr(fr_build, "BASE_FLAGS", [*fr_build.BASE_FLAGS, "-lineinfo"])
    assert fr_build.stamp("split", None) != before["split"]
    # without nvcc only the source half of a stamp can be compared
    src = before["split"].split(" ", 1)[0]
    assert fr_build._same_build(f"{src} release 13.0", f"{src} none", None)
    assert not fr_build._same_build(f"{src} release 13.0", f"{src} release 12.8", "/usr/bin/nvcc")


@pytest.mark.slow
def test_driver_records_crash_hang_and_wrong_answers(tmp_path):
    """The driver's process logic, with fake CUDA: a hang is killed and its variant skipped afterwards, a
    crash costs one configuration, a 0.1%-wrong kernel is reported as not accurate, the rest is measured."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "fake_gpu_child.py"), "--out", str(out), "--no-build", "--reps", "2",
         "--warmup", "1", "--config-timeout", "3", "--shapes", "square4096,bmm", "--libs", "promo_a,promo_b"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    by_id = {r["id"]: r for r in res["records"]}
    assert by_id["promo_b/square4096/p1_pp64x128x32/G=1"]["status"] == "hang"
    assert by_id["promo_b/square4096/p1_pp64x128x32/G=4"]["status"] == "hang"
    assert by_id["promo_b/bmm/p1_pp64x128x32/G=1"]["status"] == "skipped_variant_hung"
    assert by_id["promo_b/bmm/p1_c128x128x32_sk/G=1,splits=-1"]["status"] == "crashed"
    ok = by_id["promo_b/square4096/p1_c128x128x32_sk/G=1,splits=-1"]
    assert ok["status"] == "ok" and ok["accurate"] and ok["rel"] < 1e-6
    wrong = by_id["promo_a/square4096/stock_c128x128x32/G=1"]
    assert wrong["status"] == "ok" and not wrong["accurate"] and wrong["rel"] > 5e-4
    assert by_id["promo_a/bmm/p1_c128x256x32/G=1"]["status"] == "cannot_implement"
    probe = by_id["promo_a/probe/tf32_rounding"]
    assert probe["rel_vs_exact"] < probe["rel_vs_rn_inputs"] < probe["rel_vs_rz_inputs"]
    assert "best accurate configuration per shape" in proc.stdout


@pytest.mark.nvcc
@pytest.mark.skipif(fr_build.nvcc_path() is None, reason="needs nvcc")
def test_split_library_builds_and_exports(tmp_path, monkeypatch):
    monkeypatch.setattr(fr_build, "BUILD", tmp_path)
    first = fr_build.build_one("split")
    assert first.status == "built", first.message
    assert fr_build.build_one("split").status == "cached"
    lib = ctypes.CDLL(str(tmp_path / "split.so"))
    assert hasattr(lib, "fr_split")
    assert (tmp_path / "split.log").read_text().count("spill") >= 1  # ptxas -v output kept


@gpu
@pytest.mark.gpu
@pytest.mark.nvcc
def test_split_pass_is_tf32_exact():
    import torch

    assert fr_build.build_one("split").status != "failed"
    lib = ctypes.CDLL(str(fr_build.so_path("split")))
    torch.manual_seed(3)
    L, K, N = 2, 96, 64
    B = torch.randn(L, K, N, device="cuda")
    Y = torch.empty(L, N, 3 * K, device="cuda")
    rc = lib.fr_split(ctypes.c_void_p(B.data_ptr()), ctypes.c_void_p(Y.data_ptr()), L, N, K,
                      ctypes.c_longlong(K * N), ctypes.c_longlong(1), ctypes.c_longlong(N), 3, 0b010,
                      ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    torch.cuda.synchronize()
    assert rc == 0
    hi, lo, hi2 = Y.view(L, N, 3, K).unbind(2)
    assert torch.equal(hi, hi2)
    for part in (hi, lo):
        assert int((part.contiguous().view(torch.int32) & 0x1FFF).abs().sum()) == 0  # TF32-exact
    x = B.transpose(1, 2).double()
    err = ((hi.double() + lo.double()) - x).abs() / x.abs().clamp_min(1e-30)
    assert err.max().item() < 2.0 ** -20


@gpu
@pytest.mark.gpu
@pytest.mark.nvcc
def test_promoted_kernel_beats_plain_accuracy():
    """3xTF32 with promotion every k-tile meets the fp32 tolerance where the unpromoted control does not."""
    import torch

    for name in ("split", "promo_a"):
        assert fr_build.build_one(name).status != "failed"
    split = ctypes.CDLL(str(fr_build.so_path("split")))
    lib = ctypes.CDLL(str(fr_build.so_path("promo_a")))
    lib.fr_variant_name.restype = ctypes.c_char_p
    names = {lib.fr_variant_name(i).decode(): i for i in range(lib.fr_num_variants())}
    torch.manual_seed(0)
    L, M, N, K = 1, 256, 256, 16384
    A, B = torch.rand(L, M, K, device="cuda"), torch.rand(L, K, N, device="cuda")
    ref = torch.bmm(A.double(), B.double())
    A3, B3 = torch.empty(L, M, 3 * K, device="cuda"), torch.empty(L, N, 3 * K, device="cuda")
    s = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    ll = ctypes.c_longlong
    assert split.fr_split(ctypes.c_void_p(A.data_ptr()), ctypes.c_void_p(A3.data_ptr()), L, M, K, ll(M * K),
                          ll(K), ll(1), 3, 0b100, s) == 0
    assert split.fr_split(ctypes.c_void_p(B.data_ptr()), ctypes.c_void_p(B3.data_ptr()), L, N, K, ll(K * N),
                          ll(1), ll(N), 3, 0b010, s) == 0
    rels = {}
    for name in ("p1_c128x128x32", "plain_c128x128x32"):
        D = torch.full((L, M, N), float("nan"), device="cuda")
        ws = torch.empty(1 << 20, device="cuda", dtype=torch.uint8)
        rc = lib.fr_run(names[name], ctypes.c_void_p(A3.data_ptr()), ctypes.c_void_p(B3.data_ptr()),
                        ctypes.c_void_p(D.data_ptr()), M, N, 3 * K, L, ctypes.c_uint32(4), 1,
                        ctypes.c_void_p(ws.data_ptr()), ctypes.c_size_t(ws.numel()), s)
        torch.cuda.synchronize()
        assert rc == 0, name
        assert not torch.isnan(D).any()
        rels[name] = ((D.double() - ref).norm() / ref.norm()).item()
    assert rels["p1_c128x128x32"] < 1e-5, rels
    assert rels["plain_c128x128x32"] > rels["p1_c128x128x32"], rels
