"""Grouped-query and multi-query attention on the CPU (issue 16): the FMHA tile space enumerates and prunes per head
dim, discovery folds the spellings of a key/value repeat into the attention match (SDPA's enable_gqa,
repeat_interleave, HF's repeat_kv expand + reshape, the baddbmm model of the suite) and refuses a repeat in the
wrong order, and the attention family offers only the FMHA for a grouped problem, with its baseline paying the
model's own repeat. The FMHA's one real compile and its C ABI's refusals are in tests/test_fmha.py; the numbers
against float64 in tests/test_gqa_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fact_ray.capture import LoadedModel, capture
from fact_ray.discover import discover
from fact_ray.fastcall import aten_name
from fact_ray.search_spaces import attention as space
from fact_ray.types import Arch, Precision

# --------------------------------------------------------------------------------------------- the tile space


def test_head_dim_tiles_are_sized_to_the_head_dim():
    assert [space.head_dim_tile(d) for d in (8, 64, 72, 96, 104, 128, 136)] == [64, 64, 96, 96, 128, 128, None]
    assert space.fmha_tiles(136) == ()
    for d, tile in ((64, 64), (96, 96), (128, 128)):
        tiles = space.fmha_tiles(d)
        assert tiles and {t.head_dim for t in tiles} == {tile}  # never padded to a wider tile than needed
        assert tiles[0].block == (128, 128, tile)  # example 88's own tile leads


def test_tiles_are_pruned_by_registers_and_shared_memory():
    for d in (64, 96, 128):
        for t in space.fmha_tiles(d):
            assert space.why_invalid(t.q, t.k, t.head_dim) == ""
            assert t.warp_groups == t.q // 64 and space.MIN_STAGES <= t.stages <= space.MAX_STAGES
            smem = (t.q + t.stages * t.k) * t.head_dim * 2
            assert smem <= space.SMEM_BUDGET
    blocks = {d: {t.block for t in space.fmha_tiles(d)} for d in (64, 96, 128)}
    # 192 keys at head dim 128: about 248 registers per consumer thread, 240 there; at 96 it fits
    assert (128, 192, 128) not in blocks[128] and (128, 192, 96) in blocks[96]
    assert "registers" in space.why_invalid(128, 192, 128)
    # three consumer warp groups have 160 registers each: 128 keys no longer fit beside the output
    assert (192, 128, 64) not in blocks[64] and (192, 64, 64) in blocks[64]
    assert "warp groups" in space.why_invalid(64, 64, 64) and "WGMMA" in space.why_invalid(128, 72, 64)
    assert "head-dim tile" in space.why_invalid(128, 128, 80)
    assert space.stages_for(128, 256, 128) < space.MIN_STAGES  # one K/V buffer is 64 KB there
    with pytest.raises(ValueError, match="128x256x128"):
        space.tile(128, 256, 128)


def test_fmha_renders_each_tile_and_refuses_an_invalid_one():
    from fact_ray.errors import CannotImplement
    from fact_ray.realize import fmha

    s = fmha.emit_fmha("bfloat16", block=(128, 64, 96))
    (cfg,) = s.configs
    assert cfg.block == (128, 64, 96) and cfg.name == "fmha_sm90_causal_bfloat16_q128_k64_d96"
    assert "Shape<Int<128>, Int<64>, Int<96>>" in s.code and "Int<5>" in s.code and "{{" not in s.code
    assert s.code != fmha.emit_fmha("bfloat16", block=(128, 128, 96)).code
    with pytest.raises(CannotImplement, match="registers"):
        fmha.emit_fmha("bfloat16", block=(128, 192, 128))


# --------------------------------------------------------------------------------------------- discovery


def _attention(module: nn.Module, *inputs: torch.Tensor, policy: str = "fp32"):
    captured = capture(LoadedModel(module.eval(), tuple(inputs), type(module).__name__, "test"))
    matches = [m for m in discover(captured.graph, "sm90", policy) if m.family == "attention"]
    assert len(matches) == 1, matches
    return matches[0], captured


class Sdpa(nn.Module):
    def __init__(self, how: str, group: int = 4):
        super().__init__()
        self.how, self.group = how, group

    def forward(self, q, k, v):
        b, g, s, d = k.shape
        r = self.group
        if self.how == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if self.how == "repeat_interleave":
            k, v = k.repeat_interleave(r, dim=1), torch.repeat_interleave(v, r, dim=1)
        elif self.how == "repeat_kv":  # HF's repeat_kv
            k = k[:, :, None, :, :].expand(b, g, r, s, d).reshape(b, g * r, s, d)
            v = v[:, :, None, :, :].expand(b, g, r, s, d).reshape(b, g * r, s, d)
        elif self.how == "tiled":  # the other order: query head h reads h % g, not h // r
            k = k[:, None].expand(b, r, g, s, d).reshape(b, g * r, s, d)
            v = v[:, None].expand(b, r, g, s, d).reshape(b, g * r, s, d)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


QKV = (torch.randn(2, 8, 32, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16))


@pytest.mark.parametrize("how, nodes, spelling", [
    ("enable_gqa", 1, "sdpa_gqa"), ("repeat_interleave", 3, "sdpa"), ("repeat_kv", 7, "sdpa"),
])
def test_sdpa_spellings_of_grouped_query_attention_fold_the_repeat(how, nodes, spelling):
    m, captured = _attention(Sdpa(how), *QKV)
    p = dict(m.params)
    assert (p["H"], p["kv_heads"], p["S"], p["D"], p["causal"], p["spelling"]) == (2 * 4, 2, 32, 16, True, spelling)
    assert len(m.nodes) == nodes  # the repeat's ops are inside the match: the replacement drops them
    ops = dict(p["operands"])
    assert (ops["k"], ops["v"]) == ("k", "v")  # the un-repeated inputs
    assert m.shapes[1] == (2, 2, 32, 16)


def test_a_repeat_in_the_other_order_stays_outside_the_match():
    m, _ = _attention(Sdpa("tiled"), *QKV)
    p = dict(m.params)
    assert p["H"] == 8 and "kv_heads" not in p and len(m.nodes) == 1  # over the repeated tensors, as before


def test_multi_query_attention_has_one_key_value_head():
    q, k, v = torch.randn(1, 8, 32, 16), torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)
    m, _ = _attention(Sdpa("repeat_interleave", group=8), q, k, v)
    assert (m.param("H"), m.param("kv_heads")) == (8, 1)


class Explicit(nn.Module):
    """Hand-written grouped-query attention: K repeated by repeat_interleave, V by repeat_kv, a causal buffer."""

    def __init__(self, s: int = 32):
        super().__init__()
        self.register_buffer("mask", torch.ones(s, s, dtype=torch.bool).triu(1))

    def forward(self, q, k, v):
        k = k.repeat_interleave(4, dim=1)
        v = v[:, :, None].expand(2, 2, 4, 32, 16).reshape(2, 8, 32, 16)
        s = (q @ k.transpose(-2, -1)) / math.sqrt(16)
        return torch.softmax(s.masked_fill(self.mask, float("-inf")), -1) @ v


def test_a_hand_written_repeat_interleave_model_is_grouped_query_attention():
    m, _ = _attention(Explicit(), *QKV)
    p = dict(m.params)
    assert (p["H"], p["kv_heads"], p["causal"], p["scale"], p["spelling"]) == (8, 2, True, 0.25, "explicit")
    assert dict(p["operands"])["k"] == "k"


def test_the_suites_baddbmm_model_is_grouped_query_attention(small, monkeypatch):
    from fact_ray.capture import load_model, under_policy
    from test_suite_discovery import SUITE

    monkeypatch.setenv("FR_HEADS", "4")
    monkeypatch.setenv("FR_KV_HEADS", "2")
    loaded = under_policy(load_model(str(SUITE / "kb_gqa_baddbmm.py")), "bf16")
    captured = capture(loaded)
    matches = discover(captured.graph, "sm90", "bf16")
    (m,) = [m for m in matches if m.family == "attention"]
    p = dict(m.params)
    n_embd = int(loaded.inputs[0].shape[-1])
    assert (p["H"], p["kv_heads"], p["D"], p["causal"]) == (4, 2, n_embd // 4, True)
    assert math.isclose(p["scale"], 1 / math.sqrt(n_embd // 4))  # baddbmm's alpha
    packets = {str(n.target) for n in captured.graph.nodes if n.name in m.nodes}
    # the repeats, the zero scores buffer, baddbmm, the views around it: all inside the one match
    assert {"aten.repeat_interleave.self_int", "aten.baddbmm.default", "aten.zeros.default",
            "aten.bmm.default"} <= packets
    assert not [x for x in matches if x.family in ("baddbmm", "bmm")]


def test_hf_llama_attention_reads_the_key_value_heads_unrepeated(small, monkeypatch):
    pytest.importorskip("transformers")
    from fact_ray.capture import load_model, under_policy
    from test_suite_discovery import SUITE

    monkeypatch.setenv("FR_LAYERS", "1")
    captured = capture(under_policy(load_model(str(SUITE / "hf_llama.py")), "bf16"))
    (m,) = [m for m in discover(captured.graph, "sm90", "bf16") if m.family == "attention"]
    assert m.param("kv_heads") < m.param("H") and m.param("causal") is True
    assert any("expand" in n for n in m.nodes)  # repeat_kv's expand + reshape are in the match


def test_the_llama3_8b_layer_attention_is_grouped_query_attention(monkeypatch):
    """The Llama-3-8B layer of the suite (32 query heads over 8 in its true sizes) through SDPA's enable_gqa, at
    the CPU sizes its docstring gives."""
    from fact_ray.capture import load_model, under_policy
    from test_suite_discovery import SUITE

    for k, v in dict(FR_BATCH="1", FR_SEQ="32", FR_EMBD="256", FR_HEADS="4", FR_KV_HEADS="2", FR_HEAD_DIM="64",
                     FR_FFN="512").items():
        monkeypatch.setenv(k, v)
    captured = capture(under_policy(load_model(str(SUITE / "llama3_8b_layer.py")), "bf16"))
    (m,) = [m for m in discover(captured.graph, "sm90", "bf16") if m.family == "attention"]
    assert (m.param("H"), m.param("kv_heads"), m.param("D"), m.param("spelling")) == (4, 2, 64, "sdpa_gqa")


# --------------------------------------------------------------------------------------------- the family


def _problem(**kw):
    from fact_ray.realize.attention_family import AttentionProblem

    base = dict(B=2, H=8, S=512, D=96, dtype="bfloat16", causal=True, scale=96 ** -0.5, spelling="sdpa_gqa",
                kv_heads=2)
    return AttentionProblem(**{**base, **kw})


def test_grouped_problems_get_fmha_tiles_only_and_mha_keeps_example_41():
    from fact_ray.errors import CannotImplement
    from fact_ray.realize.attention_family import AttentionFamily

    fam = AttentionFamily()
    gqa = fam.candidates(_problem(), Precision.BF16, Arch.SM90, budget=16)
    assert [c.block for c in gqa] == [t.block for t in space.fmha_tiles(96)]
    assert {c.template for c in gqa} == {"fmha_sm90"}
    mha = fam.candidates(_problem(kv_heads=8), Precision.BF16, Arch.SM90, budget=16)
    assert mha[:len(gqa)] == gqa and {c.template for c in mha[len(gqa):]} == {"attention_sm80"}
    assert fam.accepts(mha[-1], _problem()) and not fam.accepts(gqa[0], _problem())
    with pytest.raises(CannotImplement, match="Hopper FMHA only"):
        fam.candidates(_problem(), Precision.BF16, Arch.SM80, budget=16)
    srcs = fam.sources(gqa, Arch.SM90)
    assert [s.configs for s in srcs] == [(c,) for c in gqa]


def test_a_problem_stored_before_grouped_heads_is_multi_head():
    p = _problem(kv_heads=0)
    assert p.kv_heads == p.H and not p.grouped


@pytest.mark.parametrize("spelling", ["sdpa_gqa", "sdpa", "explicit"])
def test_the_baseline_is_the_models_op_repeat_included(spelling):
    """The PyTorch op a GQA kernel must beat computes grouped attention, whichever spelling the model used."""
    from fact_ray.realize.attention import reference
    from fact_ray.realize.attention_family import AttentionFamily

    fam = AttentionFamily()
    p = _problem(B=1, H=4, S=16, D=8, dtype="float32", scale=0.3, spelling=spelling, kv_heads=2)
    q, k, v = fam.make_inputs(p, "cpu", 0)
    assert q.shape == (1, 4, 16, 8) and k.shape == v.shape == (1, 2, 16, 8)
    out = fam.torch_fn(p)(q.double(), k.double(), v.double())
    ref = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, scale=0.3)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-12)
    # the order matters: query head h reads key/value head h // 2, not h % 2 (a tiled repeat)
    tiled = reference(q.transpose(1, 2), k.repeat(1, 2, 1, 1).transpose(1, 2), v.repeat(1, 2, 1, 1).transpose(1, 2),
                      causal=True, scale=0.3)
    assert not torch.allclose(out, tiled.transpose(1, 2), atol=1e-3)


# --------------------------------------------------------------------------------------------- composition


@pytest.mark.nvcc
def test_the_composed_baddbmm_model_calls_the_fmha_with_the_repeat_gone(monkeypatch, session_build_cache):
    """kb_gqa_baddbmm at head dim 96 composed onto the FMHA TU of tests/test_fmha.py (the same build, shared through
    the session's cache: still one sm_90a compile): one native attention call with K and V un-repeated; the repeat,
    baddbmm, mask and softmax are gone, and the module traces under fake tensors (running it is a GPU's work:
    tests/test_gqa_gpu.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fact_ray.capture import load_model, under_policy
    from fact_ray.compose import KernelChoice, compose
    from test_fmha import CPU_BLOCK, fmha_libraries
    from test_suite_discovery import SUITE

    for k, v in dict(FR_BATCH="2", FR_SEQ="64", FR_EMBD="384", FR_HEADS="4", FR_KV_HEADS="2").items():
        monkeypatch.setenv(k, v)
    ((_, lib),) = fmha_libraries(session_build_cache, [("bfloat16", CPU_BLOCK)]).items()
    assert lib.ok, lib.log[-3000:]
    loaded = under_policy(load_model(str(SUITE / "kb_gqa_baddbmm.py")), "bf16")
    captured = capture(loaded)
    matches = discover(captured.graph, "sm90", "bf16")
    (attn,) = [m for m in matches if m.family == "attention"]
    module = compose(captured, matches, {attn.key: KernelChoice(lib.source.configs[0], lib.path, "fr_fmha_run", 2.0)},
                     Precision.BF16)
    calls = [aten_name(n) for n in module.graph.nodes if n.op == "call_function"]
    assert sum(c.startswith("fact_ray") for c in calls) == 1
    for gone in ("aten.repeat_interleave.self_int", "aten.baddbmm.default", "aten.softmax.int", "aten.bmm.default",
                 "aten.masked_fill.Scalar", "aten.zeros.default"):
        assert gone not in calls, f"{gone} should be replaced (or dead and removed)"
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        y = module(torch.empty(2, 64, 384, dtype=torch.bfloat16))
    assert tuple(y.shape) == (2, 64, 384) and y.dtype == torch.bfloat16
