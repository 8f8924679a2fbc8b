"""The composed graph calls eager's Python bindings (fact_ray/fastcall.py): only where the binding provably makes
the same call, with the same result, and with less host time per call than the aten overloads export wrote."""

import time
from pathlib import Path

import torch

from fact_ray.capture import capture, load_model
from fact_ray.compose import compose, runnable_module
from fact_ray.fastcall import ATEN_TARGET, aten_name, binding_for, use_python_bindings
from fact_ray.types import Precision

REPO = Path(__file__).resolve().parents[1]
LLAMA = str(REPO / "benchmarks" / "models" / "llama_block.py")
SMALL = {"FR_BATCH": "1", "FR_SEQ": "8", "FR_EMBD": "64", "FR_HEADS": "4", "FR_FFN": "128"}


def graph_of(fn, *example):
    return torch.export.export(fn, example, strict=False).module()


class Ops(torch.nn.Module):
    def forward(self, x, w):
        y = torch.nn.functional.linear(x, w) + 1.5  # add.Tensor with a Python number
        z = y.view(4, 8).transpose(0, 1).contiguous()
        return torch.add(z, z, alpha=2), z.sum(dim=0, keepdim=True)


def test_every_swapped_node_computes_what_the_overload_did_and_names_it():
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    gm = graph_of(Ops(), x, w)
    want = gm(x, w)
    before = {n.name: n.target for n in gm.graph.nodes if n.op == "call_function"}
    changed = use_python_bindings(gm)
    gm.recompile()
    swapped = [n for n in gm.graph.nodes if ATEN_TARGET in n.meta]
    assert changed == len(swapped) >= 5
    for n in swapped:
        assert not isinstance(n.target, torch._ops.OpOverload) and aten_name(n) == str(before[n.name])
    got = gm(x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def one_call(op, *args, **kwargs):
    """A graph of one call of `op` on a 2x2 placeholder (its meta value as export records it)."""
    graph = torch.fx.Graph()
    t = graph.placeholder("t")
    t.meta["val"] = torch.empty(2, 2, device="meta")
    call = graph.call_function(op, (t, *args) if "self" not in kwargs else args, kwargs)
    graph.output(call)
    return torch.fx.GraphModule(torch.nn.Module(), graph), call, t


def test_a_binding_that_resolves_another_overload_is_refused():
    # torch.add(t, 2) dispatches aten.add.Tensor (the 2 wrapped as a tensor), not aten.add.Scalar: not the same call
    gm, call, _ = one_call(torch.ops.aten.add.Scalar, 2)
    assert binding_for(gm, call) is None
    gm, call, _ = one_call(torch.ops.aten.add.Tensor, 2)
    assert binding_for(gm, call) is torch._C._VariableFunctions.add
    # an overload called with the schema's own keyword `self`: torch.neg takes `input`, so no binding
    gm, call, t = one_call(torch.ops.aten.neg.default, self=None)
    call.kwargs = {"self": t}
    assert binding_for(gm, call) is None


def test_composed_llama_block_runs_eagers_bindings_with_the_same_output(monkeypatch):
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)
    loaded = load_model(LLAMA)
    captured = capture(loaded)
    composed = compose(captured, [], {}, Precision.FP32)
    calls = [n for n in composed.graph.nodes if n.op == "call_function"]
    swapped = [n for n in calls if ATEN_TARGET in n.meta]
    assert len(swapped) >= 0.8 * len(calls)
    assert any(aten_name(n) == "aten.linear.default" for n in swapped)
    x = loaded.inputs[0]
    with torch.no_grad():
        want = loaded.module(x)
        torch.testing.assert_close(composed(x), want, rtol=0, atol=0)
        # what the bench stacks and what deploy packages: one graph under dynamo, and torch.export takes it
        torch._dynamo.reset()
        compiled = torch.compile(composed, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
        exported = torch.export.export(composed, (x,))
        torch.testing.assert_close(exported.module()(x), want, rtol=0, atol=0)


def host_ms(fns, n=30, rounds=9):
    """Best per-call time of each of `fns`, their rounds alternated so that a busy spell of the machine falls on
    all of them alike."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
    return [b * 1e3 for b in best]


def test_swapped_graph_costs_less_host_time_than_the_overloads(monkeypatch):
    """Not a wall-time threshold: the same graph, with and without the swap, timed alternately on tiny tensors
    (host time only), best of seven rounds; the swapped one must be the cheaper of the two."""
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)
    loaded = load_model(LLAMA)
    captured = capture(loaded)
    plain = runnable_module(captured)
    swapped = runnable_module(captured)
    use_python_bindings(swapped)
    swapped.recompile()
    x = loaded.inputs[0]
    with torch.no_grad():
        plain_ms, swapped_ms = host_ms([lambda: plain(x), lambda: swapped(x)])
    assert swapped_ms < plain_ms, (swapped_ms, plain_ms)
