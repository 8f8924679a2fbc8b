"""The composed module's cheap entry (fact_ray/entry.py): no hooks, no pytree walk, its checks as the graph's first
node; and those checks hold through recompile, deepcopy, torch.compile and torch.export, with users' hooks still
running."""

import copy
import textwrap
from pathlib import Path

import pytest
import torch

from fact_ray import entry
from fact_ray.capture import capture, load_model
from fact_ray.compose import compose
from fact_ray.errors import ComposeError, InferenceOnly
from fact_ray.types import Precision

REPO = Path(__file__).resolve().parents[1]
LLAMA = str(REPO / "benchmarks" / "models" / "llama_block.py")
SMALL = {"FR_BATCH": "1", "FR_SEQ": "8", "FR_EMBD": "64", "FR_HEADS": "4", "FR_FFN": "128"}


@pytest.fixture()
def llama(monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)
    loaded = load_model(LLAMA)
    return loaded, compose(capture(loaded), [], {}, Precision.FP32)


def refuses_a_wrong_shape(module, x):
    with pytest.raises(ComposeError, match="composed for"):
        module(torch.randn(x.shape[0] + 1, *x.shape[1:]))


def test_the_entry_has_no_hooks_no_pytree_and_checks_first(llama):
    loaded, module = llama
    assert not module._forward_pre_hooks and type(module).__call__ is entry._direct_call
    assert "tree_flatten_spec" not in module.code and "tree_unflatten" not in module.code
    first_op = next(n for n in module.graph.nodes if n.op == "call_function")
    assert first_op.target is entry.check_call
    x = loaded.inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(module(x), loaded.module(x), rtol=0, atol=0)
        refuses_a_wrong_shape(module, x)
        with pytest.raises(ComposeError, match="composed for"):
            module(x, x)  # the count too


def test_the_checks_survive_recompile_deepcopy_and_dead_code_elimination(llama):
    loaded, module = llama
    x = loaded.inputs[0]
    module.graph.eliminate_dead_code()  # the check has no users: FX must know it has effects
    module.recompile()  # puts GraphModule's own __call__ back: slower, still checked
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for m in (module, twin):
            torch.testing.assert_close(m(x), loaded.module(x), rtol=0, atol=0)
            refuses_a_wrong_shape(m, x)


def test_a_users_hooks_still_run(llama):
    loaded, module = llama
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    x = loaded.inputs[0]
    with torch.no_grad():
        module(x)
        handle.remove()
        module(x)
    assert seen == [tuple(x.shape)]


def test_compile_and_export_see_the_same_module(llama):
    loaded, module = llama
    x = loaded.inputs[0]
    with torch.no_grad():
        want = loaded.module(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), want, rtol=1e-5, atol=1e-5)
        program = torch.export.export(module, (x,))
        assert not [n for n in program.graph.nodes if "check_call" in str(n.target)]
        torch.testing.assert_close(program.module()(x), want, rtol=0, atol=0)


def test_outputs_keep_their_structure(tmp_path):
    """Plain code generation returns what the model returned: a tuple and a dict stay a tuple and a dict."""
    src = tmp_path / "two_outputs.py"
    src.write_text(textwrap.dedent("""
        import torch
        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 8)
            def forward(self, x, y):
                h = self.lin(x)
                return h, {"sum": h + y, "pair": (h * 2, y)}
        def get_inputs():
            return [torch.randn(2, 8), torch.randn(2, 8)]
        def get_init_inputs():
            return []
    """))
    loaded = load_model(str(src))
    module = compose(capture(loaded), [], {}, Precision.FP32)
    assert "tree_unflatten" not in module.code
    with torch.no_grad():
        got, want = module(*loaded.inputs), loaded.module(*loaded.inputs)
    assert isinstance(got, tuple) and isinstance(got[1], dict) and isinstance(got[1]["pair"], tuple)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inference_only_refuses_autograd_at_the_first_node(llama):
    loaded, module = llama
    x = loaded.inputs[0]
    module(x).sum().backward()  # nothing replaced: autograd works as ever
    entry.inference_only(module)
    with pytest.raises(InferenceOnly, match="inference only"):
        module(x)  # the parameters require grad
    with torch.no_grad():
        module(x)
    for p in module.parameters():
        p.requires_grad_(False)
    module(x)
    with pytest.raises(InferenceOnly):
        module(x.clone().requires_grad_(True))
