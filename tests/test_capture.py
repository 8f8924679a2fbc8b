"""capture.py: loading KernelBench files and factories, tracing into a Graph, and every user error typed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from fact_ray import capture as cap
from fact_ray.errors import CaptureError, ModelInvalid, ModelNotFound, ModelRaised, UserError

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(__file__).resolve().parent / "models"
EXAMPLES = ROOT / "examples"


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------- graphs


@pytest.fixture(scope="module")
def minigpt():
    loaded = cap.load_model(str(EXAMPLES / "minigpt.py"))
    t0 = time.perf_counter()
    captured = cap.capture(loaded)
    return loaded, captured, time.perf_counter() - t0


def test_minigpt_exports_with_shapes_kinds_and_canonical_targets(minigpt):
    loaded, c, seconds = minigpt
    print(f"capture of the full-size MiniGPT block: {seconds:.2f} s")
    assert c.method == "export" and c.notes == () and c.exported is not None
    g = c.graph
    assert g.capture == "export" and g.model_name == "minigpt" and g.model_hash == loaded.model_hash
    kinds = [n.kind for n in g.nodes if n.op == "placeholder"]
    assert kinds.count("parameter") == 12 and kinds.count("buffer") == 1 and kinds.count("input") == 1
    x = next(n for n in g.nodes if n.kind == "input")
    assert x.meta.shape == (128, 512, 768) and x.meta.dtype == "float32" and x.meta.stride == (512 * 768, 768, 1)
    mask = next(n for n in g.nodes if n.kind == "buffer")
    assert mask.kwarg("fqn") == "attn.bias" and mask.kwarg("content") == "tril"
    weight = g.node("p_c_fc_weight")
    assert weight.kind == "parameter" and weight.kwarg("fqn") == "c_fc.weight" and weight.meta.shape == (3072, 768)
    targets = {n.target for n in g.nodes if n.op == "call_function"}
    assert {"aten.linear.default", "aten.layer_norm.default", "aten.softmax.int", "aten.matmul.default"} <= targets
    # every tensor-valued node carries its meta; a transposed view its real strides
    for n in g.nodes:
        if n.op in ("placeholder", "call_function") and n.target != "getitem" and "split" not in n.target:
            assert n.meta is not None, n
    k_t = next(n for n in g.nodes if n.target == "aten.transpose.int" and n.args[1:] == (-2, -1))
    assert not k_t.meta.contiguous


def test_capture_never_runs_the_model_on_real_tensors():
    from torch._subclasses.fake_tensor import FakeTensor

    loaded = cap.load_model(str(EXAMPLES / "minigpt.py"))
    seen: list[type] = []
    loaded.module.register_forward_pre_hook(lambda mod, args: seen.append(type(args[0])))
    cap.capture(loaded)
    assert seen and all(issubclass(t, FakeTensor) for t in seen), seen


def test_graph_module_runs_with_flat_args_like_the_model():
    loaded = cap.load_model(str(MODELS / "small_block.py"))
    c = cap.capture(loaded)
    with torch.no_grad():
        want = loaded.module(*loaded.inputs)
        got = c.graph_module(*c.flat_args())
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, want)


def test_model_hash_follows_source_and_init_inputs(tmp_path):
    a = cap.load_model(str(MODELS / "small_block.py"))
    copy = tmp_path / "same.py"
    shutil.copy(MODELS / "small_block.py", copy)
    assert cap.load_model(str(copy)).model_hash == a.model_hash  # content, not path
    changed = tmp_path / "changed.py"
    changed.write_text((MODELS / "small_block.py").read_text().replace("return [32, 4, 8]", "return [64, 4, 8]")
                       .replace("torch.randn(2, 8, 32)", "torch.randn(2, 8, 64)"))
    other = cap.load_model(str(changed))
    assert other.model_hash != a.model_hash and other.module.c_fc.in_features == 64
    assert a.module.training is False


def test_factory_reference(monkeypatch):
    monkeypatch.syspath_prepend(str(MODELS))
    loaded = cap.load_model("fr_factories:make_mlp")
    assert loaded.name == "fr_factories:make_mlp" and loaded.inputs[0].shape == (4, 16)
    c = cap.capture(loaded)
    assert c.method == "export"
    assert [n.target for n in c.graph.nodes if n.op == "call_function"] == [
        "aten.linear.default", "aten.relu.default", "aten.linear.default"]


def test_fx_fallback_when_export_fails_is_noted():
    c = cap.capture(cap.load_model(str(MODELS / "custom_op_block.py")))
    assert c.method == "fx" and c.exported is None and c.graph.capture == "fx"
    assert any("torch.export failed" in n and "torch.fx" in n for n in c.notes)
    nodes = {n.name: n for n in c.graph.nodes}
    assert nodes["qkv_weight"].kind == "parameter" and nodes["qkv_weight"].meta.shape == (96, 32)
    assert any(n.kwarg("content") == "triu1" for n in c.graph.nodes if n.op == "get_attr")  # folded mask
    # Python-level calls are named and laid out as ATen does, shape arithmetic folded into literals
    ln = next(n for n in c.graph.nodes if n.target.startswith("aten.layer_norm"))
    assert ln.args[1] == (32,) and ln.args[4] == 1e-05
    view = next(n for n in c.graph.nodes if n.target.startswith("aten.view"))
    assert view.args[1] == (2, 8, 4, 8)
    assert all(n.meta is not None for n in c.graph.nodes if n.target.startswith("aten.linear"))


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ref, error, words", [
    ("tests/models/does_not_exist.py", ModelNotFound, ["does_not_exist.py", "no such file"]),
    ("tests/models", ModelInvalid, ["folder"]),
    ("tests/models/no_model.py", ModelInvalid, ["no_model.py", "Model"]),
    ("tests/models/no_inputs.py", ModelInvalid, ["no_inputs.py", "get_inputs"]),
    ("tests/models/raises_init.py", ModelRaised, ["raises_init.py", "ValueError", "width 7 is not supported"]),
    ("no_such_pkg_fr.mod:make", ModelNotFound, ["no_such_pkg_fr.mod"]),
    ("fr_factories:nope", ModelInvalid, ["nope"]),
    ("fr_factories:not_callable", ModelInvalid, ["not_callable"]),
    ("fr_factories:make_raises", ModelRaised, ["RuntimeError", "no weights at /nowhere"]),
    ("fr_factories:make_wrong", ModelInvalid, ["(torch.nn.Module, example_inputs"]),
])
def test_load_errors_are_typed_one_line(monkeypatch, ref, error, words):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(MODELS))
    with pytest.raises(error) as info:
        cap.load_model(ref)
    msg = _one_line(info.value)
    for w in words:
        assert w in msg, msg


def test_syntax_error_is_invalid(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("class Model(:\n    pass\n")
    with pytest.raises(ModelInvalid) as info:
        cap.load_model(str(bad))
    assert "bad.py:1" in _one_line(info.value) and "syntax" in str(info.value)


def test_forward_that_raises_is_model_raised():
    loaded = cap.load_model(str(MODELS / "raises_forward.py"))
    with pytest.raises(ModelRaised) as info:
        cap.capture(loaded)
    msg = _one_line(info.value)
    assert "raises_forward" in msg and "RuntimeError" in msg


def test_untraceable_model_is_capture_error(capfd):
    loaded = cap.load_model(str(MODELS / "untraceable.py"))
    with pytest.raises(CaptureError) as info:
        cap.capture(loaded)
    msg = _one_line(info.value)
    assert "untraceable" in msg and "torch.export" in msg and "torch.fx" in msg
    assert isinstance(info.value, UserError)
    # torch's own dumps of the failed trace stay off the terminal
    assert "def forward" not in capfd.readouterr().err


def test_bf16_policy_runs_the_model_in_bf16_and_fp32_leaves_it_alone():
    from fact_ray.discover import discover
    from fact_ray.types import Arch

    loaded = cap.load_model(str(MODELS / "small_block.py"))
    assert cap.under_policy(loaded, "fp32") is loaded
    assert cap.under_policy(loaded, "tf32") is loaded
    bf = cap.under_policy(loaded, "bf16")
    assert {p.dtype for p in bf.module.parameters()} == {torch.bfloat16}
    assert all(x.dtype == torch.bfloat16 for x in bf.inputs if isinstance(x, torch.Tensor) and x.is_floating_point())
    matches = discover(cap.capture(bf).graph, Arch.SM90, "bf16")
    assert matches and {m.dtype for m in matches if m.family.startswith("gemm")} == {"bfloat16"}
    with pytest.raises(ValueError, match="unknown precision policy"):
        cap.under_policy(loaded, "int8")
