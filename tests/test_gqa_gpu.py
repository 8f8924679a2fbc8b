"""Grouped-query and multi-query attention on an H200 (issue 16): the Hopper FMHA reading K and V un-repeated,
against float64 at several shapes (a sequence off the tile multiple, batch 1, head dims 64/96/128 each in its own
head-dim tile, query heads per key/value head 1, 4, 8 and multi-query, causal and not, tiles other than the
leading one), through the native dispatcher as a trial runs it, and the composed suite model
benchmarks/models/kb_gqa_baddbmm.py matching eager.

    python3 -m pytest -m gpu tests/test_gqa_gpu.py

The libraries are built in parallel into the session build cache (tests/test_fmha.py's `fmha_libraries`).
"""

from __future__ import annotations

import pytest
import torch

from fact_ray.fastcall import aten_name
from fact_ray.realize import attention as A
from fact_ray.realize import fmha as F
from fact_ray.search_spaces.attention import fmha_tiles
from fact_ray.types import Precision
from test_fmha import fmha_libraries, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.nvcc, pytest.mark.sm90]

POLICY = {"bfloat16": Precision.BF16, "float16": Precision.FP16}
# Beyond each head dim's leading tile: a key tile narrower than the query tile, and three consumer warp groups.
EXTRA_TILES = ((128, 64, 96), (192, 64, 64))


@pytest.fixture(scope="module")
def libs(session_build_cache):
    wanted = [(d, fmha_tiles(hd)[0].block) for d in ("bfloat16", "float16") for hd in (64, 96, 128)]
    wanted += [("bfloat16", t) for t in EXTRA_TILES]
    built = fmha_libraries(session_build_cache, wanted)
    for key, lib in built.items():
        assert lib.ok, (key, lib.log[-3000:])
    return built


def _lib(libs, dtype, head_dim, block=None):
    return libs[(dtype, block or fmha_tiles(head_dim)[0].block)]


def _qkv(B, S, H, Hkv, D, dtype, seed):
    """[B, S, H, D] q and [B, S, H_kv, D] k, v: slices of one fused projection, as a model's QKV GEMM lays them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.randn(B, S, H + 2 * Hkv, D, device="cuda", generator=g).to(getattr(torch, dtype))
    return t[:, :, :H], t[:, :, H:H + Hkv], t[:, :, H + Hkv:]


def _check(kernel, q, k, v, causal, dtype, scale=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")  # what is not written stays NaN
    kernel(q, k, v, causal=causal, scale=scale, out=out)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "the kernel left output elements unwritten"
    err = rel_err(out, A.reference(q, k, v, causal=causal, scale=scale))
    assert err < POLICY[dtype].tolerance, err


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("kv_heads", [16, 4, 2, 1])  # 16 query heads: 1, 4, 8 per key/value head; 1 is MQA
@pytest.mark.parametrize("B, S", [(1, 200), (2, 128)])  # 200: off the 128-query/key tile multiple
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_fmha_matches_float64(libs, head_dim, kv_heads, B, S, causal):
    kernel = F.FmhaKernel(_lib(libs, "bfloat16", head_dim))
    for seed in (0, 1):
        _check(kernel, *_qkv(B, S, 16, kv_heads, head_dim, "bfloat16", seed), causal, "bfloat16")


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_grouped_query_fmha_in_fp16(libs, head_dim):
    kernel = F.FmhaKernel(_lib(libs, "float16", head_dim))
    _check(kernel, *_qkv(2, 264, 32, 8, head_dim, "float16", 0), True, "float16", scale=0.1)


@pytest.mark.parametrize("block", EXTRA_TILES)
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_other_tiles_of_the_space_match_float64(libs, block, kv_heads):
    kernel = F.FmhaKernel(_lib(libs, "bfloat16", 0, block))
    for head_dim in {block[2], block[2] - 32} - {0}:  # the tile's own width, and a narrower head padded in it
        _check(kernel, *_qkv(1, 328, 8, kv_heads, head_dim, "bfloat16", 3), True, "bfloat16")


def test_a_head_dim_past_the_tile_is_refused_not_run(libs):
    from fact_ray.errors import CannotImplement

    kernel = F.FmhaKernel(_lib(libs, "bfloat16", 96))
    with pytest.raises(CannotImplement):
        kernel(*_qkv(1, 128, 8, 2, 128, "bfloat16", 0))
    with pytest.raises(CannotImplement):  # 3 key/value heads do not divide 8 query heads
        q, _, _ = _qkv(1, 128, 8, 2, 96, "bfloat16", 0)
        _, k, v = _qkv(1, 128, 6, 3, 96, "bfloat16", 0)
        kernel(q, k, v)


@pytest.mark.parametrize("spelling", ["sdpa_gqa", "sdpa", "explicit"])
def test_the_family_trial_runs_gqa_through_the_native_dispatcher(libs, spelling):
    """The trial times the op a composed module calls: fact_ray_native.attention with K and V of 8 heads under 32
    query heads (the dispatcher passes H_kv to the FMHA ABI), verified against the model's own op in float64."""
    from fact_ray.realize import dispatch
    from fact_ray.realize.attention_family import AttentionFamily, AttentionProblem

    problem = AttentionProblem(B=2, H=32, S=512, D=128, dtype="bfloat16", causal=True, scale=128 ** -0.5,
                               spelling=spelling, kv_heads=8)
    lib = _lib(libs, "bfloat16", 128)
    fam = AttentionFamily()
    torch_trial, trial = fam.trial(problem, lib.source.configs[0], lib, Precision.BF16, "cuda", reps=10)
    assert torch_trial.status == "ok"
    assert trial.status in ("ok", "slower") and trial.rel_err < Precision.BF16.tolerance, trial
    if dispatch.available():
        q, k, v = fam.make_inputs(problem, "cuda", 5)
        y = dispatch.composed_fused(fam, problem, lib.source.configs[0], lib)(q, k, v)
        assert tuple(y.shape) == (2, 32, 512, 128)
        assert rel_err(y, fam.torch_fn(problem)(q.double(), k.double(), v.double())) < Precision.BF16.tolerance


@pytest.mark.parametrize("heads, kv_heads", [(16, 4), (8, 1)])  # head dim 64, four per K/V head; 128, multi-query
def test_composed_kb_gqa_baddbmm_matches_eager(libs, monkeypatch, heads, kv_heads):
    from pathlib import Path

    from fact_ray.capture import capture, load_model, under_policy
    from fact_ray.compose import KernelChoice, check, compose
    from fact_ray.discover import discover

    for k, v in dict(FR_BATCH="2", FR_SEQ="256", FR_EMBD="1024", FR_HEADS=str(heads), FR_KV_HEADS=str(kv_heads)).items():
        monkeypatch.setenv(k, v)
    model = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "kb_gqa_baddbmm.py"
    loaded = under_policy(load_model(str(model)), "bf16")
    captured = capture(loaded)
    matches = discover(captured.graph, "sm90", "bf16")
    (attn,) = [m for m in matches if m.family == "attention"]
    assert (attn.param("H"), attn.param("kv_heads")) == (heads, kv_heads)
    lib = _lib(libs, "bfloat16", 1024 // heads)
    module = compose(captured, matches, {attn.key: KernelChoice(lib.source.configs[0], lib.path, "fr_fmha_run", 2.0)},
                     Precision.BF16)
    calls = [aten_name(n) for n in module.graph.nodes if n.op == "call_function"]
    for gone in ("aten.repeat_interleave.self_int", "aten.baddbmm.default", "aten.softmax.int"):
        assert gone not in calls, f"{gone} should be replaced"
    report = check(loaded.module, module, Precision.BF16, seeds=(0, 1), example_inputs=loaded.inputs)
    assert report.passed, report
