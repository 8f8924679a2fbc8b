"""The sm90 tf32x3 family (3xTF32 over K-concatenated splits, promoted accumulation): configs, emission, a real
sm_90a compile of one fused config with its C ABI checked on the host, and on a GPU verification against float64.

The nvcc test compiles one translation unit (one bias + tanh-GELU instance, ~35-75 s on 2 cores).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
from collections import Counter

import pytest

from fact_ray.realize import build as B
from fact_ray.realize.emit import COMPILE_FIELDS, MAX_PER_TU, emit, symbol
from fact_ray.realize.kernel import FrGemmArgs
from fact_ray.search_spaces import space
from fact_ray.search_spaces import tf32x3 as T
from fact_ray.types import Arch, GemmProblem, Precision


SQUARE = GemmProblem(M=4096, N=4096, K=4096)
QKV = GemmProblem(M=65536, N=2304, K=768)
PROJ = GemmProblem(M=65536, N=768, K=3072)
BMM = GemmProblem(M=512, N=2048, K=1024, L=128, layout_b="row")
LARGE_K = GemmProblem(M=256, N=256, K=524288)
MLP_GELU = GemmProblem(M=2048, N=3072, K=768, epilogue="bias_act", activation="gelu_tanh")

# Round 1 on an H200, end to end with the split pass, best tf32x3 config: speedup over cuBLAS fp32.
MEASURED = {"square": (SQUARE, 2.28), "qkv": (QKV, 2.27), "proj": (PROJ, 2.08), "bmm": (BMM, 1.40),
            "largeK": (LARGE_K, 0.48)}


# ------------------------------------------------------------------------------------------------ configs


def test_schedule_names_round_trip_and_reject_others():
    for group in (1, 2, 4, 8, 16):
        for stagger in (False, True):
            assert T.promotion(T.schedule_name(group, stagger)) == (group, stagger)
    assert T.schedule_name(4, True) == "TF32x3PromotedG4Stagger"
    for bad in ("", "TmaWarpSpecializedCooperative", "TF32x3PromotedG0", "TF32x3PromotedG4stagger",
                "TF32x3PromotedG-1"):
        with pytest.raises(ValueError):
            T.promotion(bad)
    with pytest.raises(ValueError):
        T.schedule_name(0, False)


def test_order_follows_round_one_on_problems_with_many_tiles():
    for p in (SQUARE, QKV, PROJ, BMM, MLP_GELU):
        cfgs = T.tf32x3_configs(p, Arch.SM90)
        head = [(c.tile, c.cluster, T.promotion(c.kernel_schedule), c.tile_scheduler) for c in cfgs[:4]]
        assert head == [((128, 128, 32), (2, 1, 1), (4, True), "persistent"),
                        ((128, 192, 32), (1, 1, 1), (4, True), "persistent"),
                        ((128, 128, 32), (1, 1, 1), (2, False), "persistent"),
                        ((128, 128, 32), (1, 1, 1), (4, True), "stream_k")], p
        assert len(cfgs) == len(T.VARIANTS) and all(c.split_k == 1 for c in cfgs)
        names = [c.name for c in cfgs]
        assert len(set(names)) == len(names)
        for c in cfgs:
            assert c.template == "sm90_tf32x3" and c.arch is Arch.SM90 and c.precision is Precision.FP32
            assert c.element == "float" and c.math_op == "multiply_add_fast_f32"
            assert c.epilogue_schedule == "TmaWarpSpecializedCooperative"
            assert (c.layout_a, c.layout_b, c.epilogue, c.activation) == \
                   (p.layout_a, p.layout_b, p.epilogue, p.activation)
            assert c.tile[0] == 128, "cooperative kernels only (ping-pong ran 1.0-1.5x in round 1)"
            assert c.tile[1] <= 192, "128x256 spilled in round 1"
    assert T.tf32x3_configs(SQUARE, Arch.SM90, 2) == T.tf32x3_configs(SQUARE, Arch.SM90)[:2]
    assert T.tf32x3_configs(SQUARE, Arch.SM90, 0) == []


def test_few_output_tiles_put_stream_k_and_its_splits_first():
    cfgs = T.tf32x3_configs(LARGE_K, Arch.SM90)
    assert cfgs[0].tile_scheduler == "stream_k" and cfgs[0].split_k == 1
    splits = [c for c in cfgs if c.split_k > 1]
    assert splits and cfgs[1:1 + len(splits)] == splits, "the K splits follow the stream-K config"
    assert all(c.tile_scheduler == "stream_k" for c in splits)
    assert {c.split_k for c in splits} <= {16, 32, 64}
    # A K split is a run-time argument: one compiled instance for the base and every split.
    assert {symbol(c) for c in cfgs[:1 + len(splits)]} == {symbol(cfgs[0])}
    # Batches count as tiles: the same 256x256 output 128 times over fills the GPU without stream-K first.
    assert T.tf32x3_configs(dataclasses.replace(LARGE_K, K=1024, L=128), Arch.SM90)[0].tile_scheduler == "persistent"


def test_tiles_that_waste_the_output_go_last():
    narrow = GemmProblem(M=8192, N=128, K=1024)  # a 128x192 tile is a third padding
    cfgs = T.tf32x3_configs(narrow, Arch.SM90)
    wide = [i for i, c in enumerate(cfgs) if c.tile[1] == 192]
    assert wide and min(wide) > max(i for i, c in enumerate(cfgs) if c.tile[1] == 128)
    assert T.tile_fit(narrow, (128, 192, 32), (1, 1, 1)) == pytest.approx(2 / 3)
    assert T.tile_fit(GemmProblem(M=384, N=256, K=64), (128, 128, 32), (2, 1, 1)) == pytest.approx(3 / 4)


def test_only_sm90_float32_with_aligned_rows():
    assert T.tf32x3_configs(SQUARE, Arch.SM80) == []
    assert T.tf32x3_configs(dataclasses.replace(SQUARE, dtype="bfloat16"), Arch.SM90) == []
    assert T.tf32x3_configs(dataclasses.replace(SQUARE, N=4094), Arch.SM90) == [], "D rows must be 16-byte aligned"
    odd_k = T.tf32x3_configs(dataclasses.replace(SQUARE, K=4099), Arch.SM90)
    assert odd_k, "any K: the split zero-pads each part to a multiple of 4"
    assert T.padded_k(dataclasses.replace(SQUARE, K=4099)) == 4100 and T.padded_k(SQUARE) == 4096
    for layouts in (("col", "col"), ("row", "row"), ("col", "row")):
        p = dataclasses.replace(SQUARE, layout_a=layouts[0], layout_b=layouts[1])
        assert T.tf32x3_configs(p, Arch.SM90), "the split transposes either operand"
    with pytest.raises(ValueError):
        T.tf32x3_configs(SQUARE, Arch.SM90, -1)


def test_model_tracks_round_one_and_decides_who_leads():
    for name, (p, measured) in MEASURED.items():
        predicted = T.predicted_speedup(p)
        assert 0.6 * measured <= predicted <= 1.3 * measured, (name, predicted, measured)
    assert [T.leads(p, Arch.SM90) for p, _ in MEASURED.values()] == [True, True, True, True, False]
    assert not T.leads(GemmProblem(M=64, N=64, K=64), Arch.SM90), "three launches for a tiny GEMM"
    assert not T.leads(SQUARE, Arch.SM80)


# ------------------------------------------------------------------------------------------------ space


def _warp_tile(c):
    return (c.tile[0] // c.warps[0], c.tile[1] // c.warps[1])


def test_space_puts_tf32x3_first_on_hopper_fp32_only():
    for p in (SQUARE, QKV, MLP_GELU, BMM):
        cfgs = space(p, Arch.SM90, Precision.FP32)
        n = len(T.tf32x3_configs(p, Arch.SM90))
        assert [c.template for c in cfgs[:n]] == ["sm90_tf32x3"] * n
        assert all(c.template != "sm90_tf32x3" for c in cfgs[n:])
        rest = [c for c in cfgs[n:] if c.math_op == "multiply_add_fast_f32"]
        assert rest, "the 2.x 3xTF32 kernels follow"
        assert all(_warp_tile(c) != (64, 64) for c in rest), "64x64 3xTF32 warp tiles spill on sm_90a"
        assert space(p, Arch.SM90, Precision.FP32, 4) == cfgs[:4]
    # Where the split pass costs more than it saves, the 2.x kernels (with their K splits) lead.
    large_k = space(LARGE_K, Arch.SM90, Precision.FP32)
    assert large_k[0].template == "sm80_gemm" and any(c.template == "sm90_tf32x3" for c in large_k)
    for arch, policy in ((Arch.SM80, Precision.FP32), (Arch.SM90, Precision.TF32)):
        p = dataclasses.replace(SQUARE, dtype="float32")
        assert all(c.template != "sm90_tf32x3" for c in space(p, arch, policy)), (arch, policy)


# ------------------------------------------------------------------------------------------------ emit


def test_emit_embeds_the_mainloop_and_groups_by_fusion_and_scheduler():
    cfgs = T.tf32x3_configs(SQUARE, Arch.SM90) + T.tf32x3_configs(MLP_GELU, Arch.SM90)
    sources = emit(cfgs, Arch.SM90)
    assert sorted(c.name for s in sources for c in s.configs) == sorted(c.name for c in cfgs)
    # The cap must bite here (a family larger than it), and each family splits into as few TUs as the cap allows:
    # otherwise the per-TU bound below would hold for any emitter.
    cap = MAX_PER_TU["sm90_tf32x3"]
    family = Counter((c.epilogue, c.activation, c.tile_scheduler) for c in cfgs)
    assert max(family.values()) > cap
    tus = Counter((s.configs[0].epilogue, s.configs[0].activation, s.configs[0].tile_scheduler) for s in sources)
    assert tus == {f: math.ceil(n / cap) for f, n in family.items()}
    for s in sources:
        fam = {(c.epilogue, c.activation, c.tile_scheduler) for c in s.configs}
        assert len(fam) == 1
        # one exported symbol per configuration, and no TU above the per-template cap
        assert len(set(s.symbols)) == len(s.symbols) == len(s.configs)
        assert 1 <= len(s.configs) <= MAX_PER_TU["sm90_tf32x3"]
        assert s.name.startswith("sm90_tf32x3_")
        assert "struct PromotedMma" in s.code and '#include "fr_tf32x3' not in s.code, "self-contained"
        assert "{{" not in s.code
        assert B.arch_targets(s) == "sm_90a"
    gelu = next(s for s in sources if s.configs[0].activation == "gelu_tanh")
    assert "LinCombPerColBiasEltAct" in gelu.code and "cutlass::epilogue::thread::GELU_taylor" in gelu.code


def test_symbol_changes_with_every_compile_field_only():
    cfg = T.tf32x3_configs(MLP_GELU, Arch.SM90)[0]
    alternatives = {"element": "tfloat32_t", "opclass": "simt", "math_op": "multiply_add",
                    "tile": (128, 192, 32), "stages": 4, "alignment": (4, 4, 4), "layout_a": "col",
                    "layout_b": "row", "epilogue": "bias", "activation": "gelu", "cluster": (1, 1, 1),
                    "kernel_schedule": "TF32x3PromotedG2", "epilogue_schedule": "TmaWarpSpecialized",
                    "tile_scheduler": "stream_k"}
    assert set(alternatives) == set(COMPILE_FIELDS["sm90_tf32x3"]) - {"template"}
    for field, value in alternatives.items():
        assert symbol(dataclasses.replace(cfg, **{field: value})) != symbol(cfg), field
    for field, value in (("name", "renamed"), ("split_k", 8)):
        assert symbol(dataclasses.replace(cfg, **{field: value})) == symbol(cfg), field


def test_emit_refuses_a_malformed_promotion():
    cfg = T.tf32x3_configs(SQUARE, Arch.SM90)[0]
    with pytest.raises(ValueError, match="tf32x3"):
        emit([dataclasses.replace(cfg, kernel_schedule="TmaWarpSpecializedCooperative")], Arch.SM90)


# ------------------------------------------------------------------------------------------------ nvcc


@pytest.fixture(scope="module")
def gelu_library(tmp_path_factory):
    cfg = T.tf32x3_configs(MLP_GELU, Arch.SM90)[0]
    (source,) = emit([cfg], Arch.SM90)
    cache = os.environ.get("FACT_RAY_TEST_CACHE") or str(tmp_path_factory.mktemp("tf32x3-cache"))
    return cfg, B.build(source, cache)


def _abi(lib, sym):
    dll = ctypes.CDLL(lib.path)
    fns = {}
    for suffix, restype in (("_workspace", ctypes.c_size_t), ("_can_implement", ctypes.c_int),
                            ("_run", ctypes.c_int)):
        fn = getattr(dll, sym + suffix)
        fn.argtypes, fn.restype = [ctypes.POINTER(FrGemmArgs)], restype
        fns[suffix[1:]] = lambda args, fn=fn: fn(ctypes.byref(args))
    return dll, fns


def _args(M, N, K, L=1, **kw):
    # Non-null fake pointers: nothing here launches (no workspace, or a refused problem).
    fields = dict(A=256, B=256, D=256, bias=256, M=M, N=N, K=K, L=L, lda=K, ldb=K, ldc=N, ldd=N,
                  batch_stride_a=M * K, batch_stride_b=N * K, batch_stride_d=M * N, alpha=1.0, beta=0.0,
                  split_k=1, sm_count=132)
    return FrGemmArgs(**(fields | kw))


@pytest.mark.nvcc
@pytest.mark.slow
def test_fused_config_compiles_and_exports_the_abi(gelu_library):
    cfg, lib = gelu_library
    assert lib.ok, lib.log[-4000:]
    sym = symbol(cfg)
    exported = B.exported_symbols(lib.path)
    assert {"fr_abi_version", f"{sym}_workspace", f"{sym}_can_implement", f"{sym}_run"} <= exported
    assert not any("cutlass" in s or "cute" in s for s in exported), "CUTLASS internals stay hidden"
    dll, f = _abi(lib, sym)
    assert dll.fr_abi_version() == 1
    # Bad arguments come back as a cutlass::Status without a GPU: kErrorInvalidProblem (4).
    for bad in (_args(0, 8, 8), _args(128, 128, 64, lda=60), _args(128, 128, 64, bias=None),
                _args(128, 128, 64, ldd=64)):
        assert f["can_implement"](bad) == 4 and f["run"](bad) == 4 and f["workspace"](bad) == 0
    assert f["can_implement"](_args(128, 130, 64)) != 0, "D rows of 130 floats are not 16-byte aligned for TMA"
    # The workspace holds the K-concatenated splits: A3 [L, M, 3Kp] and B3 [N, 3Kp] (once: B broadcast), each
    # starting 256-byte aligned, then the persistent GEMM's own (empty) workspace.
    def split_bytes(M, N, Kp, La, Lb):
        a3 = -(-La * M * 3 * Kp * 4 // 256) * 256
        return a3 + -(-Lb * N * 3 * Kp * 4 // 256) * 256

    for args, want in ((_args(4096, 3072, 768), split_bytes(4096, 3072, 768, 1, 1)),
                       (_args(100, 256, 1001), split_bytes(100, 256, 1004, 1, 1)),
                       (_args(256, 512, 768, L=4, batch_stride_b=0), split_bytes(256, 512, 768, 4, 1)),
                       (_args(256, 512, 768, L=4), split_bytes(256, 512, 768, 4, 4))):
        assert f["can_implement"](args) == 0
        assert f["workspace"](args) == want
    # Without the workspace it asked for, _run refuses (kErrorWorkspaceNull) before launching anything.
    assert f["run"](_args(4096, 3072, 768)) == 6
    short = _args(4096, 3072, 768, workspace=256, workspace_size=split_bytes(4096, 3072, 768, 1, 1) - 1)
    assert f["run"](short) == 6


# ------------------------------------------------------------------------------------------------ GPU


# name: (problem, how to pick the config, extra shapes (M, N, K[, L]))
GPU_CASES = {
    "bias_gelu_tanh_odd_k": (GemmProblem(M=512, N=384, K=1001, epilogue="bias_act", activation="gelu_tanh"), 0,
                             [(1000, 256, 4096)]),
    "bias_residual_stream_k": (GemmProblem(M=256, N=256, K=8192, epilogue="bias_residual"), "split", []),
    "bias_residual_stream_k_heuristic": (GemmProblem(M=256, N=256, K=8192, epilogue="bias_residual"), 0,
                                         [(2048, 512, 768)]),
    "bmm_b_row": (GemmProblem(M=256, N=384, K=512, L=4, layout_b="row"), 0, [(128, 256, 301, 3)]),
    "batched_broadcast_b": (GemmProblem(M=256, N=384, K=512, L=4, broadcast_b=True), 1, []),
    "a_col_relu": (GemmProblem(M=384, N=256, K=512, layout_a="col", epilogue="act", activation="relu"), 2, []),
}


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.sm90
def test_tf32x3_kernels_match_float64(tmp_path_factory):
    import torch

    from fact_ray.realize.kernel import GemmKernel
    from fact_ray.realize.verify import verify

    picked = {}
    for case, (problem, how, _) in GPU_CASES.items():
        cfgs = T.tf32x3_configs(problem, Arch.SM90)
        picked[case] = next(c for c in cfgs if c.split_k > 1) if how == "split" else cfgs[how]
    cache = os.environ.get("FACT_RAY_TEST_CACHE") or str(tmp_path_factory.mktemp("tf32x3-gpu-cache"))
    libraries = B.build_many(emit(list(picked.values()), Arch.SM90), cache, min(8, os.cpu_count() or 1))
    lib_of = {c.name: lib for lib in libraries for c in lib.source.configs}
    device = torch.device("cuda", 0)
    for case, (problem, _, shapes) in GPU_CASES.items():
        cfg = picked[case]
        lib = lib_of[cfg.name]
        assert lib.ok, f"{cfg.name} failed to build:\n{lib.log[-3000:]}"
        for shape in [(problem.M, problem.N, problem.K, problem.L)] + shapes:
            m, n, k, *rest = shape
            p = dataclasses.replace(problem, M=m, N=n, K=k, L=rest[0] if rest else problem.L)
            kernel = GemmKernel(lib, cfg, p)
            res = verify(lambda a, b, bias, r, out: kernel(a, b, bias, r, out=out), p, Precision.FP32, device)
            assert res.ok, f"{case} {cfg.name} at {shape}: {res.reason}"
            assert res.rel_err <= 5e-6, f"{case}: rel err {res.rel_err:.1e}; round 1 measured ~6e-7"
