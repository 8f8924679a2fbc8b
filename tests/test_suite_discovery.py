"""Discovery on every model of benchmarks/models/ (issue 15), captured on the CPU at small sizes: each lists its
GEMMs, attention and norms, in the families and numbers the model has (no crash, no silent miss), and what no
kernel family realizes yet is listed as such."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from fact_ray.capture import capture, load_model, under_policy
from fact_ray.discover import discover
from fact_ray.discover.report import format_matches
from fact_ray.discover.rules import NOT_REALIZED
from fact_ray.discover.view import packet
from fact_ray.fastcall import aten_name

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "models"
# Every op of these kinds in a suite graph must be inside some match.
COVERED = {"aten.linear", "aten.addmm", "aten.mm", "aten.bmm", "aten.matmul", "aten.baddbmm",
           "aten.scaled_dot_product_attention", "aten.layer_norm", "aten.rms_norm"}
BLOCK = {"gemm_bias": 1, "gemm_bias_act": 1, "gemm_bias_residual": 2, "attention": 1, "layernorm": 2}
HF_ENCODER = {"gemm_bias": 6, "gemm_bias_act": 2, "gemm_bias_residual": 4, "attention": 2, "layernorm": 5}
EXPECTED = {
    "gpt2_medium_block": BLOCK,
    "kb_minigpt_closure": BLOCK,
    "llama_block": {"gemm": 5, "swiglu": 1, "attention": 1, "rmsnorm": 2, "rope": 2},  # RoPE on q and on k
    "kb_attention_split": {"gemm_bias": 2, "attention": 1},
    # grouped-query attention through baddbmm and bmm over repeat_interleave'd K and V: one attention match
    "kb_gqa_baddbmm": {"gemm": 5, "swiglu": 1, "attention": 1},
    # two layers each; HF's Conv1D (addmm, then a view) carries its GELU and residual (GPT-2)
    "hf_gpt2": {"gemm_bias": 2, "gemm_bias_act": 2, "gemm_bias_residual": 4, "attention": 2, "layernorm": 5},
    # grouped-query attention as HF runs it (K and V repeated, then SDPA); its RMSNorm upcasts to float32 inside
    "hf_llama": {"gemm": 10, "swiglu": 2, "attention": 2, "rmsnorm": 5, "rope": 4},
    # one decoder layer as transformers writes it; cos and sin come out of an autocast block (a nested graph)
    "hf_llama3_8b_layer": {"gemm": 5, "swiglu": 1, "attention": 1, "rmsnorm": 2, "rope": 2},
    "hf_bert": HF_ENCODER,  # SDPA with an all-visible padding mask: attention without a mask
    "hf_vit": HF_ENCODER,
}


@pytest.fixture
def tiny(small, monkeypatch):
    monkeypatch.setenv("FR_LAYERS", "2")
    monkeypatch.setenv("FR_IMAGE", "32")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_discovery_lists_every_gemm_attention_and_norm(name, tiny):
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    loaded = under_policy(load_model(str(SUITE / f"{name}.py")), "bf16")
    captured = capture(loaded)
    assert captured.method == "export"
    matches = discover(captured.graph, "sm90", "bf16")
    assert dict(Counter(m.family for m in matches)) == EXPECTED[name]
    inside = {n for m in matches for n in m.nodes}
    missed = [n.name for n in captured.graph.nodes
              if n.op == "call_function" and packet(n.target) in COVERED and n.name not in inside]
    assert not missed, f"{name}: not in any match: {missed}"
    if name in ("hf_llama", "hf_llama3_8b_layer"):  # HF's RMSNorm upcasts to float32 inside the bf16 model: one
        # bf16 norm, weight included
        assert {(m.dtype, len(m.nodes)) for m in matches if m.family == "rmsnorm"} == {("bfloat16", 8)}
    if name == "hf_gpt2":
        assert {dict(m.params)["activation"] for m in matches if m.family == "gemm_bias_act"} == {"gelu_tanh"}
        assert all(dict(m.params)["causal"] for m in matches if m.family == "attention")
    if name in ("hf_bert", "hf_vit"):
        assert not any(dict(m.params)["causal"] for m in matches if m.family == "attention")


def test_what_is_not_realized_is_listed_as_such():
    import torch
    import torch.nn as nn
    from rich.console import Console

    from fact_ray.capture import LoadedModel

    class Baddbmm(nn.Module):
        def forward(self, bias, a, b):
            return torch.baddbmm(bias, a, b, beta=0.5)

    inputs = (torch.randn(2, 8, 16), torch.randn(2, 8, 32), torch.randn(2, 32, 16))
    (bad,) = discover(capture(LoadedModel(Baddbmm(), inputs, "baddbmm", "h")).graph, "sm90", "fp32")
    assert bad.family == "baddbmm" in NOT_REALIZED and dict(bad.params)["beta"] == 0.5
    console = Console(width=200, record=True)
    console.print(format_matches([bad]))
    assert "baddbmm (not realized yet)" in console.export_text()


def test_sdpa_with_grouped_query_heads_is_attention():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from fact_ray.capture import LoadedModel

    class GQA(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k, v = torch.randn(2, 8, 32, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    (m,) = discover(capture(LoadedModel(GQA(), (q, k, v), "gqa", "h")).graph, "sm90", "fp32")
    p = dict(m.params)
    assert m.family == "attention" and (p["H"], p["kv_heads"], p["causal"], p["spelling"]) == (8, 2, True, "sdpa_gqa")


def test_kv_heads_repeated_before_an_explicit_product_is_attention():
    import math

    import torch
    import torch.nn as nn

    from fact_ray.capture import LoadedModel

    class Repeated(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(32, 32, dtype=torch.bool).triu(1))

        def forward(self, q, k, v):
            k = k.repeat_interleave(4, dim=1)  # GQA's K, one way
            v = v[:, :, None].expand(2, 2, 4, 32, 16).reshape(2, 8, 32, 16)  # and V, HF's repeat_kv way
            s = (q @ k.transpose(-2, -1)) / math.sqrt(16)
            return torch.softmax(s.masked_fill(self.mask, float("-inf")), -1) @ v

    q, k, v = torch.randn(2, 8, 32, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    (m,) = discover(capture(LoadedModel(Repeated(), (q, k, v), "rep", "h")).graph, "sm90", "fp32")
    p = dict(m.params)
    assert m.family == "attention" and (p["H"], p["causal"], p["scale"]) == (8, True, 0.25)
    assert p["kv_heads"] == 2  # both repeats folded into the match (tests/test_gqa.py covers each spelling)


@pytest.mark.nvcc
def test_hf_llama_upcast_rmsnorm_composes_with_the_norm_kernel(tiny, session_build_cache):
    """HF's RMSNorm in a bf16 model (upcast, normalise, cast back, weight) is one bf16 rmsnorm match; composing it
    with the real norm kernel replaces all five per model, export's metadata checks of the intermediates
    included, and the module still traces (fake tensors: the kernel is a GPU's work)."""
    pytest.importorskip("transformers")
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fact_ray.compose import KernelChoice, compose
    from fact_ray.realize.norm import build_norm

    lib = build_norm("bfloat16", session_build_cache)  # the unit tests/test_norm_attention.py builds too
    assert lib.ok, lib.log[-2000:]
    loaded = under_policy(load_model(str(SUITE / "hf_llama.py")), "bf16")
    captured = capture(loaded)
    matches = discover(captured.graph, "sm80", "bf16")
    norms = [m for m in matches if m.family == "rmsnorm"]
    assert len(norms) == 5 and {m.dtype for m in norms} == {"bfloat16"}
    assert all(len(m.nodes) == 8 and dict(dict(m.params)["operands"]).get("weight") for m in norms)
    cfg = lib.source.configs[0]
    winners = {m.key: KernelChoice(cfg, lib.path, lib.source.symbols[0], 1.5) for m in norms}
    composed = compose(captured, matches, winners, "bf16", arch="sm80")
    assert len(composed.fact_ray.replacements) == 5 and not composed.fact_ray.fallbacks
    calls = [aten_name(n) for n in composed.graph.nodes if n.op == "call_function"]
    assert not any("rsqrt" in c for c in calls)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        y = composed(*loaded.inputs)
    assert tuple(y.shape) == (2, 16, 32) and y.dtype == torch.bfloat16
