"""Search spaces: enumeration through cutlass_library, pruning, policies, split-K, ordering; problem_from_match."""

from __future__ import annotations

import dataclasses

import pytest

from fact_ray.errors import CannotImplement
from fact_ray.realize.problem import problem_from_match
from fact_ray.search_spaces import catalog, rank, rules, space
from fact_ray.types import Arch, GemmProblem, Match, Precision

DTYPE = {Precision.FP32: "float32", Precision.TF32: "float32", Precision.BF16: "bfloat16",
         Precision.FP16: "float16"}
EPILOGUES = [("none", "none"), ("bias", "none"), ("bias_act", "gelu"), ("bias_act", "gelu_tanh"),
             ("bias_residual", "none"), ("act", "relu"), ("residual", "none")]
FUSED = ("bias", "bias_act", "bias_residual", "act")  # need a 3.x fusion operation, i.e. a TMA epilogue


def problem(policy: Precision, **kw) -> GemmProblem:
    base = dict(M=2048, N=1024, K=768, dtype=DTYPE[policy])
    return GemmProblem(**(base | kw))


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("policy", list(Precision))
@pytest.mark.parametrize("epilogue,activation", EPILOGUES)
def test_every_arch_policy_epilogue_has_configs(arch, policy, epilogue, activation):
    p = problem(policy, epilogue=epilogue, activation=activation)
    configs = space(p, arch, policy)
    assert configs, (arch, policy, epilogue)
    names = [c.name for c in configs]
    assert len(names) == len(set(names)), "config names must be unique"
    for c in configs:
        assert (c.epilogue, c.activation, c.layout_a, c.layout_b) == (epilogue, activation, "row", "col")
        assert c.arch is arch and c.precision is policy
        if c.template == "sm90_gemm":
            assert arch is Arch.SM90
            if epilogue in FUSED:  # fusion only through TMA epilogues; a residual alone is C with beta = 1
                assert c.epilogue_schedule in ("TmaWarpSpecialized", "TmaWarpSpecializedCooperative"), c.name
            assert c.epilogue_schedule != "EpilogueTransposed"
    if arch is Arch.SM90 and policy is not Precision.FP32:
        assert configs[0].template == "sm90_gemm", "WGMMA kernels should lead on Hopper"


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("epilogue,activation", EPILOGUES)
def test_fp32_policy_never_uses_1xtf32(arch, epilogue, activation):
    configs = space(problem(Precision.FP32, epilogue=epilogue, activation=activation), arch, Precision.FP32)
    kinds = {(c.template, c.opclass, c.math_op) for c in configs}
    allowed = {("sm80_gemm", "tensorop", "multiply_add_fast_f32"), ("sm80_gemm", "simt", "multiply_add")}
    if arch is Arch.SM90:  # 3xTF32 over K-concatenated TF32 splits (search_spaces/tf32x3.py, tests/test_tf32x3.py)
        allowed.add(("sm90_tf32x3", "tensorop", "multiply_add_fast_f32"))
    assert kinds <= allowed
    assert ("sm80_gemm", "tensorop", "multiply_add_fast_f32") in kinds
    assert ("sm80_gemm", "simt", "multiply_add") in kinds
    assert all(c.element == "float" for c in configs)


def test_tf32_policy_uses_tf32_tensor_ops():
    sm90 = space(problem(Precision.TF32), Arch.SM90, Precision.TF32)
    assert any(c.template == "sm90_gemm" for c in sm90)
    sm80 = space(problem(Precision.TF32), Arch.SM80, Precision.TF32)
    assert {(c.opclass, c.math_op) for c in sm80} == {("tensorop", "multiply_add")}


@pytest.mark.parametrize("arch", list(Arch))
def test_alignment_pruning_drops_wide_vectors(arch):
    aligned = space(problem(Precision.BF16, K=768), arch, Precision.BF16)
    assert any(c.alignment[0] == 8 for c in aligned)
    odd = space(problem(Precision.BF16, K=766), arch, Precision.BF16)  # 766 = 2 * 383
    assert odd, "2-element vectors still fit"
    for c in odd:
        assert 766 % c.alignment[0] == 0 and 766 % c.alignment[1] == 0, c.name
        assert c.alignment[0] < 8 and c.alignment[1] < 8
        if c.template == "sm90_gemm":  # TMA needs 16-byte strides: only cp.async kernels remain
            assert c.kernel_schedule.startswith("CpAsync"), c.name
            # ... and not under stream-K, which miscomputes a K residue with cp.async (766 % 64 != 0)
            assert c.tile_scheduler != "stream_k", c.name
    # N is D's (and C's) contiguous extent.
    assert all(1000 % c.alignment[2] == 0 for c in space(problem(Precision.BF16, N=1000), arch, Precision.BF16))
    # An odd K in bf16 leaves nothing: the PyTorch op stays.
    assert space(problem(Precision.BF16, K=767), arch, Precision.BF16) == []


def test_cp_async_stream_k_only_without_k_residue():
    def cp_async_stream_k(k):  # A stored [K, M] with M % 8 != 0: TMA cannot load it, cp.async can
        configs = space(problem(Precision.BF16, layout_a="col", M=1002, K=k), Arch.SM90, Precision.BF16)
        assert any(c.kernel_schedule.startswith("CpAsync") for c in configs)
        return [c for c in configs if c.kernel_schedule.startswith("CpAsync") and c.tile_scheduler == "stream_k"]

    assert cp_async_stream_k(1280), "whole K tiles: stream-K stays"
    assert cp_async_stream_k(1282) == [], "a K residue under cp.async stream-K computes wrong results"


def test_layouts_follow_the_problem():
    p = problem(Precision.BF16, layout_a="col", layout_b="row", M=1000, N=1024, K=770)
    configs = space(p, Arch.SM90, Precision.BF16)
    assert configs
    for c in configs:
        assert (c.layout_a, c.layout_b) == ("col", "row")
        assert 1000 % c.alignment[0] == 0 and 1024 % c.alignment[1] == 0  # A stored [K,M], B stored [K,N]


@pytest.mark.parametrize("arch", list(Arch))
def test_split_k_for_few_tiles_and_long_k(arch):
    p = GemmProblem(M=256, N=256, K=524288, dtype="float32")
    configs = space(p, arch, Precision.FP32)
    tile128 = {c.split_k for c in configs if c.tile[:2] == (128, 128) and c.swizzle == "Identity8"}
    assert {16, 32, 64} <= tile128
    assert any(c.swizzle == "StreamK" for c in configs)
    top = space(p, arch, Precision.FP32, budget=16)
    assert sum(c.split_k > 1 for c in top) >= 4, "a K split should rank high when 4 tiles meet 100+ SMs"
    # Configs that differ only by split_k keep distinct names (distinct trials).
    assert len({c.name for c in configs}) == len(configs)


def test_split_k_only_where_it_helps():
    big = space(GemmProblem(M=8192, N=8192, K=8192, dtype="bfloat16"), Arch.SM90, Precision.BF16)
    assert all(c.split_k == 1 for c in big)
    batched = space(GemmProblem(M=256, N=256, K=65536, L=4, dtype="bfloat16"), Arch.SM90, Precision.BF16)
    assert all(c.split_k == 1 for c in batched)
    sm90 = space(GemmProblem(M=256, N=256, K=65536, dtype="bfloat16"), Arch.SM90, Precision.BF16)
    split90 = [c for c in sm90 if c.template == "sm90_gemm" and c.split_k > 1]
    assert split90 and all(c.tile_scheduler == "stream_k" for c in split90)



def test_split_choices_fill_the_sms_first():
    large_k = GemmProblem(M=256, N=256, K=524288)
    # 4 output tiles of 128x128 on 132 SMs: 32 and 64 splits fill one and two whole waves; 16 leaves half idle.
    assert rank.split_choices(large_k, (128, 128, 16), Arch.SM90) == (32, 64, 16)
    # 16 tiles of 64x64: 8 and 16 splits.
    assert rank.split_choices(large_k, (64, 64, 16), Arch.SM90)[:2] == (8, 16)
    for tile in ((128, 128, 16), (64, 64, 16), (128, 64, 32)):
        fills = [rank.wave_fill(rank.output_tiles(large_k, tile) * s, 132)
                 for s in rank.split_choices(large_k, tile, Arch.SM90)]
        assert fills == sorted(fills, reverse=True), tile


@pytest.mark.parametrize("policy", [Precision.FP32, Precision.TF32, Precision.BF16])
def test_large_k_ranks_well_filled_splits_first(policy):
    p = GemmProblem(M=256, N=256, K=524288, layout_b="row", dtype=DTYPE[policy])
    top = space(p, Arch.SM90, policy, budget=4)
    assert top[0].split_k > 1, top[0].name
    for c in top:
        if c.split_k > 1:  # the measured failure: 8 splits of 4-16 tiles left most of 132 SMs idle
            ctas = rank.output_tiles(p, c.tile) * c.split_k
            assert rank.wave_fill(ctas, 132) >= 0.9 and ctas <= 2 * 132, c.name
    # The ordering is by fill, then by fixup cost, not by fewest splits.
    assert max(c.split_k for c in top if c.split_k > 1) >= 16


def test_accumulator_rule_prunes_spilling_3x_tiles():
    def op(tile, schedule, tma=True):
        return catalog.BaseOp(template="sm90_gemm", name="x", element="bfloat16_t", opclass="tensorop",
                              math_op="multiply_add", instruction=(0, 0, 0), tile=tile, warps=(1, 1, 1),
                              cluster=(1, 1, 1), stages=0, kernel_schedule=schedule, epilogue_schedule="",
                              tile_scheduler="", alignment=(8, 8, 8), layout_a="row", layout_b="col", c_void=False,
                              tma=tma)
    coop, pingpong, ws = "TmaWarpSpecializedCooperative", "TmaWarpSpecializedPingpong", "TmaWarpSpecialized"
    assert rules.accumulators_per_thread(op((256, 256, 64), coop)) == 256  # the 43 TFLOP/s H200 config
    assert rules.accumulators_per_thread(op((128, 256, 64), coop)) == 128
    assert rules.accumulators_per_thread(op((64, 256, 64), pingpong)) == 128
    assert rules.accumulators_per_thread(op((128, 256, 64), pingpong)) == 256
    assert rules.accumulators_per_thread(op((256, 256, 64), ws)) == 512
    assert rules.accumulators_per_thread(op((256, 256, 64), "ScheduleAuto")) == 256  # Auto resolves to coop
    assert rules.accumulators_per_thread(op((64, 256, 64), "ScheduleAuto")) == 128  # ... and to ping-pong
    assert [rules.registers_fit(op(t, coop)) for t in ((256, 256, 64), (256, 128, 64), (128, 256, 64))] == \
        [False, True, True]
    configs = space(GemmProblem(M=8192, N=8192, K=8192, dtype="bfloat16"), Arch.SM90, Precision.BF16)
    sm90 = [c for c in configs if c.template == "sm90_gemm"]
    assert not any(c.tile[:2] == (256, 256) for c in sm90)
    for c in sm90:
        rows = c.tile[0] // 2 if "Cooperative" in rank.kernel_schedule(c) else c.tile[0]
        assert rows * c.tile[1] // 128 <= 128, c.name
    kinds = {(rank.kernel_schedule(c), c.tile[:2]) for c in sm90}
    assert {("TmaWarpSpecializedCooperative", (128, 256)), ("TmaWarpSpecializedPingpong", (64, 256))} <= kinds
    # Auto schedules are folded into their explicit twins: the same kernel is never tried twice.
    assert not any(c.kernel_schedule in ("", "ScheduleAuto") for c in sm90)


@pytest.mark.parametrize("layout_b", ["row", "col"])
def test_big_bf16_gemm_starts_with_cutlass_favourites(layout_b):
    p = GemmProblem(M=4096, N=4096, K=4096, dtype="bfloat16", layout_b=layout_b)
    top = space(p, Arch.SM90, Precision.BF16, budget=6)
    coop = "TmaWarpSpecializedCooperative"
    # 128x256x64 cooperative with a 2-CTA cluster both ways among the first three (the H200 ran 256x256 first:
    # 0.06x of cuBLAS); the 4-CTA clusters (unmeasured) follow them, and a small budget spans tile shapes first.
    assert (top[0].tile, rank.kernel_schedule(top[0]), top[0].cluster[0] * top[0].cluster[1]) == \
        ((128, 256, 64), coop, 2)
    assert {c.cluster for c in top[:3] if (c.tile, rank.kernel_schedule(c)) == ((128, 256, 64), coop)} == \
        {(1, 2, 1), (2, 1, 1)}
    assert any(c.tile == (64, 256, 64) and rank.kernel_schedule(c) == "TmaWarpSpecializedPingpong" for c in top)
    assert any(c.tile in ((128, 128, 64), (256, 128, 64)) and rank.kernel_schedule(c) == coop for c in top)
    assert all(c.tile_scheduler != "stream_k" for c in top[:3]), "stream-K variants come later"
    assert len({rank.shape(c) for c in top}) == len(top), "no kernel twice under another epilogue schedule"


def test_fp32_space_opens_with_varied_3xtf32():
    p = GemmProblem(M=4096, N=4096, K=4096, dtype="float32")
    # The 2.x part, after the tf32x3 family that leads on Hopper (tests/test_tf32x3.py).
    top = [c for c in space(p, Arch.SM90, Precision.FP32) if c.template == "sm80_gemm"][:16]
    first = top[0]
    # The config that ran 1.34-1.42x of cuBLAS fp32 on the H200 leads.
    assert (first.math_op, first.tile, first.warps, first.stages) == \
        ("multiply_add_fast_f32", (128, 128, 16), (4, 2, 1), 3)
    assert all(c.math_op == "multiply_add_fast_f32" for c in top[:8])
    assert len({c.tile for c in top}) >= 6
    assert {c.warps for c in top if c.tile[:2] == (128, 128)} >= {(4, 2, 1), (2, 4, 1)}
    assert any(c.swizzle == "StreamK" for c in top[:8])
    # No 3xTF32 warp tile of 64x64 (spills) anywhere in the space; the added tile descriptions are in it.
    full = space(p, Arch.SM90, Precision.FP32)
    for c in full:
        if c.template == "sm80_gemm" and c.math_op == "multiply_add_fast_f32":
            assert (c.tile[0] // c.warps[0]) * (c.tile[1] // c.warps[1]) <= 64 * 32, c.name
    assert {c.stages for c in full if c.tile == (128, 128, 16)} == {3, 4, 5}
    assert any(c.swizzle == "Identity4" for c in full)


@pytest.mark.parametrize("arch", list(Arch))
def test_budget_order_is_deterministic_and_diverse(arch):
    p = problem(Precision.BF16, M=4096, N=3072, K=1024, epilogue="bias_act", activation="gelu")
    full = space(p, arch, Precision.BF16)
    again = space(p, arch, Precision.BF16)
    assert full == again
    top = space(p, arch, Precision.BF16, budget=16)
    assert top == full[:16] and len(top) == 16
    assert len({rank.tile_key(c) for c in top}) >= 6, "varied output tiles, not one tile's variants"
    if arch is Arch.SM90:
        assert len({rank.family(c) for c in top}) >= 2, "more than one kernel schedule"
    assert space(p, arch, Precision.BF16, budget=0) == []
    assert rank.score(full[0], p, arch) == max(rank.score(c, p, arch) for c in full)
    for fam in {rank.family(c) for c in full}:  # each family opens with its best config
        members = [c for c in full if rank.family(c) == fam]
        assert rank.score(members[0], p, arch) == max(rank.score(c, p, arch) for c in members)


def test_tile_fit_ranks_small_tiles_first_for_skinny_problems():
    decode = space(problem(Precision.BF16, M=16, N=4096, K=4096), Arch.SM90, Precision.BF16, budget=4)
    assert all(c.tile[0] <= 128 for c in decode)


def test_bad_problems_are_cannot_implement():
    with pytest.raises(CannotImplement):
        space(problem(Precision.BF16, dtype="float32"), Arch.SM90, Precision.BF16)
    with pytest.raises(CannotImplement):
        space(problem(Precision.FP32, epilogue="softmax"), Arch.SM90, Precision.FP32)
    with pytest.raises(CannotImplement):
        space(problem(Precision.FP32, epilogue="bias", activation="relu"), Arch.SM90, Precision.FP32)


def match(family: str, **params) -> Match:
    base = dict(M=512, N=768, K=256)
    return Match(rule="r", family=family, nodes=("n",), anchor="n", params=tuple(sorted((base | params).items())),
                 dtype="float32", shapes=((512, 256), (768, 256)))


def test_problem_from_match_maps_families():
    p = problem_from_match(match("gemm_bias_act", activation="gelu", has_bias=True), Precision.BF16)
    assert (p.M, p.N, p.K, p.L, p.dtype, p.epilogue, p.activation, p.layout_b) == \
        (512, 768, 256, 1, "bfloat16", "bias_act", "gelu", "col")
    assert problem_from_match(match("gemm"), Precision.FP32).epilogue == "none"
    assert problem_from_match(match("gemm_bias", has_bias=True), Precision.TF32).dtype == "float32"
    r = problem_from_match(match("gemm_bias_residual", has_bias=True, residual="add_1"), Precision.FP16)
    assert (r.epilogue, r.dtype) == ("bias_residual", "float16")
    b = problem_from_match(match("bmm", L=8, broadcast_b=True), Precision.FP32)
    assert (b.L, b.layout_b, b.broadcast_b) == (8, "row", True)
    t = problem_from_match(match("gemm_bias_act", activation="tanh_gelu", has_bias=True), Precision.FP32)
    assert t.activation == "gelu_tanh"
    # Parts of a rule that are absent leave the rest: no bias gives act / residual, no activation gives bias.
    a = problem_from_match(match("gemm_bias_act", activation="relu", has_bias=False), Precision.BF16)
    assert (a.epilogue, a.activation) == ("act", "relu")
    r = problem_from_match(match("gemm_bias_residual", has_bias=False, residual="add_1"), Precision.FP32)
    assert (r.epilogue, r.activation) == ("residual", "none")
    assert problem_from_match(match("gemm_bias_act", activation="identity", has_bias=True),
                              Precision.FP32).epilogue == "bias"
    assert problem_from_match(match("gemm_bias_residual", has_bias=True, residual=False),
                              Precision.FP32).epilogue == "bias"


@pytest.mark.parametrize("family,params", [
    ("attention", {}),
    ("layernorm", {}),
    ("gemm_bias_act", {"activation": "mish", "has_bias": True}),
    ("gemm", {"activation": "relu"}),
    ("gemm", {"has_bias": True}),
    ("gemm_bias", {"residual": "add_1"}),
    ("gemm_bias_act", {"activation": "relu", "has_bias": True, "residual": "add_1"}),
    ("gemm", {"M": 0}),
    ("gemm", {"K": None}),
])
def test_problem_from_match_refuses_what_it_cannot_build(family, params):
    with pytest.raises(CannotImplement):
        problem_from_match(match(family, **params), Precision.FP32)


def test_problem_from_match_refuses_integer_gemms():
    m = dataclasses.replace(match("gemm"), dtype="int8")
    with pytest.raises(CannotImplement):
        problem_from_match(m, Precision.FP32)
