"""Read-only indexes over a Graph that the matcher and the cost model share (users, packets, identity ops)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

from fact_ray.types import Graph, Node, Ref, TensorMeta

# Ops that move no data and compute nothing: reshaping views, slicing, and taking items of a split.
VIEW_OPS = frozenset({
    "aten.view", "aten.reshape", "aten._unsafe_view", "aten.transpose", "aten.t", "aten.permute", "aten.expand",
    "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select", "aten.split", "aten.split_with_sizes",
    "aten.chunk", "aten.unbind", "aten.as_strided", "aten.alias", "aten.detach", "aten.numpy_T", "aten.mT",
    "aten.flatten", "aten.unflatten", "aten.expand_as", "aten.view_as", "aten.narrow", "getitem",
})
# Ops that return their input unchanged in eval mode (when their output meta equals their input's).
IDENTITY_OPS = frozenset({
    "aten.dropout", "aten.alias", "aten.clone", "aten.contiguous", "aten.detach", "aten.lift_fresh_copy",
    "aten.to", "aten._to_copy", "aten.type_as", "aten.feature_dropout", "aten.alpha_dropout",
})


def packet(target: str) -> str:
    """'aten.linear.default' -> 'aten.linear'; other targets unchanged."""
    if target.startswith("aten.") and target.count(".") >= 2:
        return target.rsplit(".", 1)[0]
    return target


def is_assertion(target: str) -> bool:
    p = packet(target)
    return p.startswith("aten._assert") or p.startswith("aten.sym_constrain") or p.startswith("_assert") or \
        "._assert" in p


def refs(value: Any) -> Iterator[str]:
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from refs(v)


class GraphView:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.nodes: dict[str, Node] = {n.name: n for n in graph.nodes}
        self.order: dict[str, int] = {n.name: i for i, n in enumerate(graph.nodes)}
        users: dict[str, list[str]] = defaultdict(list)
        for n in graph.nodes:
            if is_assertion(n.target):  # runtime checks read a tensor but are not part of any computation
                continue
            for r in set(self.inputs(n.name)):
                users[r].append(n.name)
        self._users = {k: tuple(sorted(v, key=self.order.__getitem__)) for k, v in users.items()}

    def users(self, name: str) -> tuple[str, ...]:
        return self._users.get(name, ())

    def inputs(self, name: str) -> list[str]:
        n = self.nodes[name]
        return list(refs(n.args)) + list(refs(tuple(v for _, v in n.kwargs)))

    def packet(self, name: str) -> str:
        return packet(self.nodes[name].target)

    def meta(self, name: str | None) -> TensorMeta | None:
        if name is None or name not in self.nodes:
            return None
        return self.nodes[name].meta

    def is_leaf(self, name: str) -> bool:
        return self.nodes[name].op in ("placeholder", "get_attr")

    def is_identity(self, name: str) -> bool:
        """An op that returns its first input unchanged (eval-mode dropout, clone, same-dtype casts)."""
        n = self.nodes[name]
        p = packet(n.target)
        if p not in IDENTITY_OPS or not n.args or not isinstance(n.args[0], Ref):
            return False
        if "dropout" in p:
            p_drop = n.args[1] if len(n.args) > 1 else n.kwarg("p", 0.5)
            train = n.args[2] if len(n.args) > 2 else n.kwarg("train", n.kwarg("training", True))
            if train is not False and p_drop != 0:
                return False
        src, out = self.meta(n.args[0].name), n.meta
        return src is not None and out is not None and src.shape == out.shape and src.dtype == out.dtype
