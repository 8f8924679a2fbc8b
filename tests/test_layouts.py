"""Layouts as they are (issue 15): a replacement whose kernel cannot take the graph's strided operands keeps its
PyTorch op, the composition says so once, and the module still composes and computes the model's answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fact_ray.capture import capture, load_model
from fact_ray.compose import KernelChoice, compose
from fact_ray.discover.match import find_matches
from fact_ray.discover.rules import RULES
from fact_ray.layouts import is_contiguous, operand_misfit
from fact_ray.realize.problem import problem_from_match
from fact_ray.search_spaces import space
from fact_ray.types import Arch, Precision

SPLIT = str(Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "kb_attention_split.py")


def test_the_issue_stride_is_no_gemm_operand_but_attention_takes_it():
    shape, stride = (16, 12, 1024, 64), (2359296, 64, 2304, 1)  # q from c_attn(x).split + view + transpose
    assert not is_contiguous(shape, stride)
    assert "not contiguous (stride (2359296, 64, 2304, 1))" in operand_misfit("bmm", "a", shape, stride, "float32")
    assert operand_misfit("attention", "q", shape, stride, "float32") == ""
    assert operand_misfit("bmm", "a", (8, 16, 8), (128, 8, 1), "float32") == ""
    assert operand_misfit("bmm", "a", (1, 16, 8), (999, 8, 1), "float32") == ""  # extent-1 dims: any stride
    assert "aligned" in operand_misfit("gemm", "b", (16, 8), (8, 1), "bfloat16", offset=4)
    assert operand_misfit("layernorm", "x", (32, 64), (192, 1), "float32") == ""  # a column slice: strided rows



def test_split_view_transpose_attention_composes_and_matches(small):
    loaded = load_model(SPLIT)
    captured = capture(loaded)
    # Without the attention rule the scores and output products are batched GEMMs over the strided q, k, v
    # (as in the issue, where the bmm kernels had been tuned on contiguous operands).
    matches = find_matches(captured.graph, tuple(r for r in RULES if r.family != "attention"))
    bmms = [m for m in matches if m.family == "bmm"]
    assert len(bmms) == 2
    winners = {}
    for m in bmms:
        problem = problem_from_match(m, Precision.FP32)
        cfg = next(iter(space(problem, Arch.SM80, Precision.FP32)))
        # The library is never opened: composition decides on the graph's strides before it loads anything.
        winners[m.key] = KernelChoice(cfg, "/nonexistent/never-loaded.so", "sym", 1.5)
    composed = compose(captured, matches, winners, Precision.FP32)
    comp = composed.fact_ray
    assert comp.replacements == ()
    assert {k for k, _ in comp.fallbacks} == set(winners) and set(winners) <= set(comp.kept)
    reasons = [why for _, why in comp.fallbacks]
    assert all("keeps its PyTorch op" in r and "not contiguous" in r for r in reasons), reasons
    x = loaded.inputs[0]
    with torch.no_grad():
        assert torch.allclose(composed(x), loaded.module(x), rtol=1e-5, atol=1e-6)
    from fact_ray.bench import _composed_variant

    v = _composed_variant(composed)  # the bench's composed row says so, once
    assert v.kernels == 0 and v.note.startswith("2 winner(s) kept the PyTorch op") and "1 more" in v.note
