"""discover/: the rule table on the examples, the cost model, ranking, errors, and the table/JSON views."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fact_ray import capture as cap
from fact_ray.discover import discover, find_matches, format_matches, matches_to_json, profile
from fact_ray.discover.cost import ROOFLINES, unmatched_time, work
from fact_ray.errors import NotAvailable, UnknownArch, UnknownPolicy, UnsupportedDtype
from fact_ray.types import Arch, Precision

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(__file__).resolve().parent / "models"


@pytest.fixture(scope="module")
def graphs():
    """Captured graphs of the examples at their full sizes (each capture takes seconds: fake tensors)."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            path = ROOT / "examples" / name if (ROOT / "examples" / name).exists() else MODELS / name
            cache[name] = cap.capture(cap.load_model(str(path)))
        return cache[name]

    return get


def by_weight(matches, weight):
    return next(m for m in matches if dict(m.param("operands", ())).get("b") == weight)


# ------------------------------------------------------------------------------------------------ examples


def test_minigpt_has_the_seven_expected_matches(graphs):
    g = graphs("minigpt.py").graph
    ms = discover(g, "sm90", "fp32")
    assert Counter(m.family for m in ms) == Counter(
        {"gemm_bias_residual": 2, "gemm_bias": 1, "gemm_bias_act": 1, "attention": 1, "layernorm": 2})

    qkv = by_weight(ms, "p_attn_c_attn_weight")
    assert qkv.family == "gemm_bias" and qkv.rule == "linear_bias"
    assert (qkv.param("M"), qkv.param("N"), qkv.param("K"), qkv.param("L")) == (128 * 512, 2304, 768, 1)
    assert qkv.param("layout_a") == "row" and qkv.param("layout_b") == "col" and qkv.param("has_bias") is True
    assert dict(qkv.param("operands")) == {"a": "layer_norm", "b": "p_attn_c_attn_weight",
                                            "bias": "p_attn_c_attn_bias"}
    assert qkv.shapes == ((128, 512, 768), (2304, 768), (2304,)) and qkv.dtype == "float32"

    out_proj = by_weight(ms, "p_attn_c_proj_weight")
    assert out_proj.family == "gemm_bias_residual" and out_proj.param("residual") is True
    assert dict(out_proj.param("operands"))["residual"] == "x"

    fc = by_weight(ms, "p_c_fc_weight")
    assert fc.family == "gemm_bias_act" and fc.param("activation") == "gelu_tanh" and fc.param("N") == 3072
    assert len(fc.nodes) == 9  # the linear and the eight ops of the written-out tanh GELU

    mlp_proj = by_weight(ms, "p_c_proj_weight")
    assert mlp_proj.family == "gemm_bias_residual" and mlp_proj.param("K") == 3072
    assert dict(mlp_proj.param("operands"))["residual"] == "add"

    att = next(m for m in ms if m.family == "attention")
    assert (att.param("B"), att.param("H"), att.param("S"), att.param("D")) == (128, 8, 512, 96)
    assert att.param("causal") is True and att.param("spelling") == "explicit"
    assert att.param("scale") == pytest.approx(1 / math.sqrt(96))
    assert {"masked_fill", "softmax", "matmul", "matmul_1"} <= set(att.nodes)

    for ln in (m for m in ms if m.family == "layernorm"):
        assert (ln.param("rows"), ln.param("cols"), ln.param("eps"), ln.param("affine")) == (65536, 768, 1e-5, True)

    # each node in at most one match; the FC linear is not listed again on its own
    all_nodes = [n for m in ms for n in m.nodes]
    assert len(all_nodes) == len(set(all_nodes))
    assert not any(m.anchor == "linear_2" for m in ms)

    # ranked by estimated time, shares honest (the unmatched copy of the attention output counts too)
    times = [m.est_time_s for m in ms]
    assert times == sorted(times, reverse=True) and all(t > 0 for t in times)
    assert 0.5 < sum(m.share for m in ms) < 1.0


@pytest.mark.parametrize("example, M, N, K", [("matmul_square.py", 4096, 4096, 4096),
                                              ("matmul_large_k.py", 256, 256, 524288)])
def test_square_and_large_k_are_one_row_major_gemm(graphs, example, M, N, K):
    ms = discover(graphs(example).graph, "sm80", "fp32")
    assert [(m.rule, m.family) for m in ms] == [("matmul", "gemm")]
    m = ms[0]
    assert (m.param("M"), m.param("N"), m.param("K"), m.param("L")) == (M, N, K, 1)
    assert m.param("layout_b") == "row" and m.param("broadcast_b") is False and m.share == pytest.approx(1.0)


def test_batched_is_one_bmm(graphs):
    ms = discover(graphs("matmul_batched.py").graph, "sm90", "tf32")
    assert [(m.rule, m.family) for m in ms] == [("batched_matmul", "bmm")]
    assert (ms[0].param("L"), ms[0].param("M"), ms[0].param("K"), ms[0].param("N")) == (128, 512, 1024, 2048)


def test_fx_captured_graph_finds_the_same_families():
    c = cap.capture(cap.load_model(str(MODELS / "custom_op_block.py")))
    assert c.method == "fx"
    ms = discover(c.graph, "sm90", "bf16")
    assert Counter(m.family for m in ms) == Counter(
        {"gemm_bias": 1, "attention": 1, "gemm_bias_act": 1, "gemm_bias_residual": 1, "layernorm": 1})
    assert next(m for m in ms if m.family == "attention").param("causal") is True


# ------------------------------------------------------------------------------------------------ cost model


def test_roofline_numbers_of_one_gemm(graphs):
    g = graphs("matmul_square.py").graph
    n = 4096
    for arch in (Arch.SM80, Arch.SM90):
        for policy in Precision:
            m = discover(g, arch, policy)[0]
            elem = 2 if policy in (Precision.BF16, Precision.FP16) else 4
            roof = ROOFLINES[arch]
            assert m.flops == 2 * n ** 3 and m.bytes == 3 * n * n * elem
            assert m.est_time_s == pytest.approx(max(m.flops / roof.tensor_flops[policy], m.bytes / roof.bandwidth))
    # faster hardware and cheaper numerics estimate less time
    t = {(a, p): discover(g, a, p)[0].est_time_s for a in Arch for p in (Precision.FP32, Precision.TF32, Precision.BF16)}
    assert t[Arch.SM80, Precision.FP32] > t[Arch.SM90, Precision.FP32]
    assert t[Arch.SM90, Precision.FP32] > t[Arch.SM90, Precision.TF32] > t[Arch.SM90, Precision.BF16]


def test_causal_attention_counts_half_the_flops(graphs):
    att = next(m for m in discover(graphs("small_block.py").graph, "sm90", "fp32") if m.family == "attention")
    full = dataclasses.replace(att, params=tuple((k, False if k == "causal" else v) for k, v in att.params))
    B, H, S, D = 2, 4, 8, 8
    assert work(full, Precision.FP32)[0] == 4 * B * H * S * S * D == 2 * work(att, Precision.FP32)[0]


def test_shares_include_unmatched_ops():
    class LinearThenSoftmax(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.softmax(self.fc(x), dim=-1) * 3.0

    c = cap.capture(cap.LoadedModel(LinearThenSoftmax().eval(), (torch.randn(32, 64),), "m", "h"))
    ms = discover(c.graph, "sm90", "fp32")
    assert [m.family for m in ms] == ["gemm_bias"]
    rest = unmatched_time(c.graph, ms, ROOFLINES[Arch.SM90])
    assert rest > 0 and ms[0].share == pytest.approx(ms[0].est_time_s / (ms[0].est_time_s + rest))


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_arch_and_policy(graphs):
    g = graphs("small_block.py").graph
    with pytest.raises(UnknownArch, match="sm75"):
        discover(g, "sm75", "fp32")
    with pytest.raises(UnknownPolicy, match="fp8"):
        discover(g, "sm90", "fp8")
    assert discover(g, "SM_90a", "BF16")  # spelled loosely, still understood


def test_float64_gemm_is_unsupported_dtype():
    c = cap.capture(cap.load_model(str(MODELS / "float64_matmul.py")))
    with pytest.raises(UnsupportedDtype) as info:
        discover(c.graph, "sm90", "fp32")
    msg = str(info.value)
    assert "\n" not in msg and "float64" in msg and "float64_matmul" in msg


# ------------------------------------------------------------------------------------------------ views


def test_table_and_json(graphs):
    ms = discover(graphs("small_block.py").graph, "sm80", "bf16")
    assert len(ms) == 7
    table = format_matches(ms)
    assert [c.header for c in table.columns] == ["#", "rule", "family", "nodes", "shapes", "dtype", "est. time",
                                                 "share"]
    assert table.row_count == len(ms)
    out = io.StringIO()
    Console(file=out, width=200).print(table)
    text = out.getvalue()
    for m in ms:
        assert m.rule in text
    assert "9: linear_2 … mul_4" in text  # count + first/last node names

    data = json.loads(json.dumps(matches_to_json(ms)))
    assert [d["rank"] for d in data] == list(range(1, 8))
    assert [d["rule"] for d in data] == [m.rule for m in ms]
    fc = next(d for d in data if d["family"] == "gemm_bias_act")
    assert fc["params"]["activation"] == "gelu_tanh" and fc["params"]["operands"]["b"] == "p_c_fc_weight"
    assert fc["shapes"] == [[2, 8, 32], [128, 32], [128]] and fc["key"].startswith("linear_bias_act|")
    assert all(d["measured"] is False and d["est_time_s"] > 0 and 0 < d["share"] < 1 for d in data)


def test_find_matches_is_deterministic(graphs):
    g = graphs("small_block.py").graph
    assert find_matches(g) == find_matches(g)


# ------------------------------------------------------------------------------------------------ profile


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_profile_without_gpu_is_not_available(graphs):
    c = graphs("small_block.py")
    with pytest.raises(NotAvailable, match="GPU"):
        profile(c, discover(c.graph, "sm90", "fp32"))


@pytest.mark.gpu
def test_profile_measures_every_match_on_gpu(graphs):
    c = graphs("small_block.py")
    ms = profile(c, discover(c.graph, "sm90", "fp32"), warmup=2, reps=5)
    assert len(ms) == 7 and all(m.measured and m.est_time_s > 0 and 0 < m.share for m in ms)
    assert [m.est_time_s for m in ms] == sorted((m.est_time_s for m in ms), reverse=True)
