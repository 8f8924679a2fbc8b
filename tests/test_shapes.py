"""Several shapes (issue 15): buckets from --shapes or get_shapes(), a model reference per bucket, and a served
module that runs the bucket's composition for tuned shapes and the PyTorch ops for any other shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fact_ray import shapes as sh
from fact_ray.capture import capture, load_model
from fact_ray.compose import compose
from fact_ray.discover import discover
from fact_ray.errors import UserError
from fact_ray.types import Arch, Precision

MODELS = Path(__file__).parent / "models"
SHAPED = str(MODELS / "shaped_mlp.py")
SPLIT = str(Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "kb_attention_split.py")


def test_parse_shapes_and_one_line_errors():
    assert sh.parse_shapes("1x512x1024; 8x2048x1024;1x512x1024") == (
        sh.Bucket(((1, 512, 1024),)), sh.Bucket(((8, 2048, 1024),)))
    assert sh.parse_shapes("2x16,-").__getitem__(0).shapes == ((2, 16), None)
    assert sh.parse_shapes(None) == () and sh.parse_shapes(" ") == ()
    for bad in ("8xbig", "0x4"):
        with pytest.raises(UserError) as e:
            sh.parse_shapes(bad)
        assert "\n" not in str(e.value)


def test_get_shapes_and_a_shaped_reference_load_the_bucket():
    loaded = load_model(SHAPED)
    assert loaded.buckets == (sh.Bucket(((2, 8, 64),)), sh.Bucket(((4, 16, 64),)))
    assert sh.model_buckets(SHAPED, None) == loaded.buckets and sh.model_buckets(SHAPED, "3x5x64") == (
        sh.Bucket(((3, 5, 64),)),)
    assert sh.model_buckets(str(MODELS / "compose_mlp.py"), None) == ()  # no get_shapes(): one shape, as before
    ref = sh.shaped_ref(SHAPED, loaded.buckets[1])
    at = load_model(ref)
    assert tuple(at.inputs[0].shape) == (4, 16, 64) and at.inputs[0].dtype == torch.float32
    assert at.model_hash == loaded.model_hash and at.ref == ref
    assert capture(at).graph.nodes != capture(loaded).graph.nodes  # captured at the bucket's shapes
    with pytest.raises(UserError, match="has 3 dims"):
        load_model(SHAPED + "@shapes=4x64")


def test_untuned_shape_runs_the_pytorch_ops_and_returns_the_right_answer(small):
    base = load_model(SPLIT)
    buckets = sh.parse_shapes("2x16x32;1x8x32")
    comps = {}
    for b in buckets:
        at = load_model(sh.shaped_ref(SPLIT, b))
        assert at.module is not base.module  # (each load builds the model; share the weights explicitly)
        at.module.load_state_dict(base.module.state_dict())
        cap = capture(at)
        comps[b] = compose(cap, discover(cap.graph, "sm90", "fp32"), {}, Precision.FP32)
    served = sh.ShapeDispatch(base.module, comps)
    x_tuned = torch.randn(1, 8, 32)
    x_untuned = torch.randn(3, 5, 32)  # no bucket: the original module's own ops
    assert served.module_for(x_tuned) is served.compositions["b1"]
    assert served.module_for(x_untuned) is base.module and served.rule == sh.RULE
    with torch.no_grad():
        assert torch.allclose(served(x_untuned), base.module(x_untuned), rtol=1e-6, atol=1e-6)
        assert torch.allclose(served(x_tuned), base.module(x_tuned), rtol=1e-5, atol=1e-6)
        with pytest.raises(Exception):  # what the dispatch avoids: a composition is specialised to its shapes
            comps[buckets[0]](x_untuned)
    from fact_ray.bench import _composed_variant

    untuned, tuned = _composed_variant(served, (x_untuned,)), _composed_variant(served, (x_tuned,))
    assert untuned.fn is served and untuned.kernels == 0 and "3x5x32: no tuned bucket" in untuned.note
    assert tuned.fn is served and tuned.kernels == 0 and tuned.note == ""  # the bucket's composition (no kernels)


@pytest.mark.nvcc
def test_dispatch_artifact_saves_the_rule_and_loads_a_served_module(tmp_path, fc1_gelu_kernel):
    """One real sm80 library (the fc1 + GELU kernel), composed for both buckets of get_shapes(), each bucket saved
    as an ordinary artifact, then dispatch.json; fact_ray.load gives the ShapeDispatch back."""
    from fact_ray.artifact import load, load_report, save

    cfg, lib_path, symbol = fc1_gelu_kernel
    base = load_model(SHAPED)
    saved = []
    for i, b in enumerate(base.buckets):
        at = load_model(sh.shaped_ref(SHAPED, b))
        cap = capture(at)
        matches = discover(cap.graph, Arch.SM80, Precision.FP32)
        fc1 = next(m for m in matches if m.rule == "linear_bias_act")
        composed = compose(cap, matches, {fc1.key: (cfg, lib_path, symbol)}, Precision.FP32)
        save(composed, tmp_path / "art" / f"bucket-{i}", allow_unchecked=True)
        saved.append((b, f"bucket-{i}"))
    sh.save_dispatch(tmp_path / "art", saved, {"name": base.name, "hash": base.model_hash})
    manifest = json.loads((tmp_path / "art" / sh.DISPATCH_FILE).read_text())
    assert manifest["rule"] == sh.RULE and [b["spec"] for b in manifest["buckets"]] == ["2x8x64", "4x16x64"]
    assert "rule exact-input-shapes" in load_report(tmp_path / "art")
    assert sh.policy_manifest(tmp_path / "art")["policy"] == "fp32"  # what bench --artifact checks

    served = load(tmp_path / "art", base, expect_arch="sm80")
    assert isinstance(served, sh.ShapeDispatch) and served.buckets == base.buckets
    x = torch.randn(3, 8, 64)  # untuned: the PyTorch ops, on the CPU, the right answer
    with torch.no_grad():
        assert torch.allclose(served(x), base.module(x))
    with torch.no_grad(), pytest.raises(Exception, match="runs on cuda tensors"):  # tuned: the bucket's kernel
        served(torch.randn(4, 16, 64))
    assert load(tmp_path / "art" / "bucket-0", base, expect_arch="sm80").fact_ray.replacements  # an ordinary artifact as before
