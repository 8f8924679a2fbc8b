"""Eager timings of matched subgraphs on a GPU: the measured counterpart of the cost model's estimates.

The captured graph runs once on the GPU with the model's own inputs, keeping the values that enter each match;
then each match's subgraph (its nodes copied into a graph of their own) and the whole graph are timed with CUDA
events (warm-up, then the median of `reps`). A share is a match's time over the whole graph's time.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Any, Callable

import torch

from fact_ray.errors import NotAvailable
from fact_ray.types import Match


def _time_cuda(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median seconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


class _Keeper(torch.fx.Interpreter):
    """Runs the graph once and keeps only the values some subgraph reads from outside."""

    def __init__(self, gm: torch.fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.kept: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.keep:
            self.kept[n.name] = value
        return value


def subgraph_module(gm: torch.fx.GraphModule, names: tuple[str, ...], anchor: str
                    ) -> tuple[torch.fx.GraphModule, list[str]]:
    """The match's nodes as a GraphModule of their own; its placeholders are the outside values it reads."""
    inside = set(names)
    nodes = [n for n in gm.graph.nodes if n.name in inside]
    external: list[str] = []
    for n in nodes:
        for i in n.all_input_nodes:
            if i.name not in inside and i.name not in external:
                external.append(i.name)
    g = torch.fx.Graph()
    env = {name: g.placeholder(name) for name in external}
    for n in nodes:
        env[n.name] = g.node_copy(n, lambda x: env[x.name])
    g.output(env[anchor])
    return torch.fx.GraphModule(gm, g), external


def _to_cuda(x: Any) -> Any:
    return x.to("cuda") if isinstance(x, torch.Tensor) else x


def profile(captured: Any, matches: list[Match], *, warmup: int = 5, reps: int = 20) -> list[Match]:
    if not torch.cuda.is_available():
        raise NotAvailable("profiling needs a CUDA GPU and none is visible; the estimates stand")
    inputs = tuple(_to_cuda(a) for a in captured.inputs)
    if captured.exported is not None:
        # The exported graph has CPU devices burnt into some nodes (factory ops, metadata asserts): move a copy
        # of the whole program, graph included, rather than only its tensors.
        from torch.export.passes import move_to_device_pass

        from fact_ray.capture import exported_args

        ep = move_to_device_pass(copy.deepcopy(captured.exported), "cuda")
        gm = ep.graph_module
        args = exported_args(ep, inputs)
    else:
        gm = copy.deepcopy(captured.graph_module).to("cuda")
        args = inputs
    subs = [subgraph_module(gm, m.nodes, m.anchor) for m in matches]
    keeper = _Keeper(gm, {name for _, ext in subs for name in ext})
    with torch.no_grad():
        keeper.run(*args)
        whole = _time_cuda(lambda: gm(*args), warmup, reps)
        timed = []
        for m, (sub, ext) in zip(matches, subs):
            inputs = [keeper.kept[name] for name in ext]
            t = _time_cuda(lambda: sub(*inputs), warmup, reps)
            timed.append(dataclasses.replace(m, est_time_s=t, share=t / whole if whole > 0 else 0.0, measured=True))
    return sorted(timed, key=lambda m: -m.est_time_s)
