"""The matcher: applies the rule table (rules.py) to a Graph and picks non-overlapping matches.

Every rule is tried at every node. A pattern may match in several ways (alternatives, commutative arguments,
looking through a transpose or not); the way covering most nodes that is closed (no node but the root feeds
anything outside the match) and whose parameters the rule can read wins for that rule and root. Then matches
are accepted greedily, largest first (so a linear inside a matched linear + bias + activation is not listed
again), each node belonging to at most one match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from fact_ray.discover import evaluate
from fact_ray.discover.patterns import Absent, Activation, Alt, CausalMask, Const, Op, Pattern, Seq, Var
from fact_ray.discover.view import GraphView
from fact_ray.types import Graph, Match, Node, Ref, TensorMeta, freeze

if TYPE_CHECKING:
    from fact_ray.discover.rules import Rule  # rules imports params, which imports this module

_MISSING = object()


@dataclass(frozen=True)
class State:
    bindings: tuple[tuple[str, Any], ...] = ()
    covered: frozenset[str] = frozenset()
    inputs: frozenset[str] = frozenset()  # nodes bound by Var: the subgraph's inputs
    masks: tuple[str, ...] = ()  # mask nodes whose exclusive producers join the match afterwards

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.bindings:
            if k == key:
                return v
        return default

    def bind(self, key: str, value: Any) -> "State | None":
        for k, v in self.bindings:
            if k == key:
                return self if v == value else None
        return State(self.bindings + ((key, value),), self.covered, self.inputs, self.masks)

    def cover(self, *names: str) -> "State":
        return State(self.bindings, self.covered | frozenset(names), self.inputs, self.masks)


class Bound:
    """What a rule's parameter reader sees: the bindings of one match, and the graph to read metas from."""

    def __init__(self, view: GraphView, state: State) -> None:
        self.view = view
        self.state = state
        self.values = dict(state.bindings)

    def has(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def node(self, key: str) -> Node | None:
        name = self.values.get(key)
        return self.view.nodes.get(name) if isinstance(name, str) else None

    def meta(self, key: str) -> TensorMeta | None:
        n = self.node(key)
        return n.meta if n is not None else None


class Matcher:
    def __init__(self, view: GraphView) -> None:
        self.view = view
        self._masks: dict[str, tuple[str, int] | None] = {}  # many attention alternatives test the same mask

    def mask_form(self, name: str) -> tuple[str, int] | None:
        if name not in self._masks:
            self._masks[name] = evaluate.mask_form(self.view, name)
        return self._masks[name]

    def match(self, pat: Pattern, value: Any, st: State) -> Iterator[State]:
        if isinstance(pat, Op):
            yield from self._op(pat, value, st)
        elif isinstance(pat, Var):
            if isinstance(value, Ref) and value.name in self.view.nodes:
                node = self.view.nodes[value.name]
                if pat.check is None or pat.check(node):
                    nst = st.bind(pat.name, value.name)
                    if nst is not None:
                        yield State(nst.bindings, nst.covered, nst.inputs | {value.name}, nst.masks)
        elif isinstance(pat, Const):
            v = value if not isinstance(value, Ref) else evaluate.scalar_value(self.view, value)
            if v is not None and v is not _MISSING and (pat.check is None or pat.check(v)):
                nst = st.bind(pat.name, v)
                if nst is not None:
                    yield nst
        elif isinstance(pat, Absent):
            if value is _MISSING or value is None:
                yield st
        elif isinstance(pat, Seq):
            if isinstance(value, (tuple, list)) and len(value) == len(pat.items):
                yield from self._args(pat.items, tuple(value), 0, st)
        elif isinstance(pat, Alt):
            for option in pat.options:
                yield from self.match(option, value, st)
        elif isinstance(pat, Activation):
            yield from self._activation(pat, value, st)
        elif isinstance(pat, CausalMask):
            if isinstance(value, Ref):
                found = self.mask_form(value.name)
                if found is not None and found[0] == pat.form:
                    nst = st.bind(pat.name, value.name)
                    nst = nst.bind(pat.name + "_n", found[1]) if nst is not None else None
                    if nst is not None:
                        yield State(nst.bindings, nst.covered, nst.inputs, nst.masks + (value.name,))
        else:  # pragma: no cover - the pattern types are closed
            raise TypeError(f"not a pattern: {pat!r}")

    def _op(self, pat: Op, value: Any, st: State, at_root: bool = False) -> Iterator[State]:
        if not isinstance(value, Ref):
            return
        view = self.view
        name = value.name
        skipped: list[str] = []
        while True:
            node = view.nodes.get(name)
            if node is None or node.op != "call_function":
                return
            if view.packet(name) in pat.ops:
                break
            if at_root or not view.is_identity(name):
                return
            skipped.append(name)
            name = node.args[0].name
        if pat.name and (pat.name, name) in st.bindings and not skipped:
            yield st  # a named node met again (an upcast x read twice, as a Var may be): it matched the first time
            return
        if name in st.covered or any(s in st.covered for s in skipped):
            return
        if pat.check is not None and not pat.check(view, node):
            return
        base = st.cover(name, *skipped)
        if pat.name:
            base = base.bind(pat.name, name)
            if base is None:
                return
        orders = [pat.args]
        if pat.commutative and len(pat.args) >= 2:
            orders.append((pat.args[1], pat.args[0], *pat.args[2:]))
        for order in orders:
            yield from self._args(order, node.args, 0, base)

    def _args(self, pats: tuple[Pattern, ...], args: tuple[Any, ...], i: int, st: State) -> Iterator[State]:
        if i == len(pats):
            yield st
            return
        value = args[i] if i < len(args) else _MISSING
        for nst in self.match(pats[i], value, st):
            yield from self._args(pats, args, i + 1, nst)

    def _activation(self, pat: Activation, value: Any, st: State) -> Iterator[State]:
        """Find leaves L such that the elementwise ops between L and this node use nothing but L and numbers,
        and compute one of the known activations of L; then match the activation's input against L."""
        if not isinstance(value, Ref):
            return
        view = self.view
        root = value.name
        if view.nodes[root].op != "call_function" or view.packet(root) not in evaluate.ELEMENTWISE:
            return
        cone: set[str] = set()  # elementwise ancestors of root (root included)
        frontier: set[str] = set()
        todo = [root]
        while todo:
            n = todo.pop()
            if n in cone:
                continue
            cone.add(n)
            for r in view.inputs(n):
                if view.nodes[r].op == "call_function" and view.packet(r) in evaluate.ELEMENTWISE and len(cone) < 64:
                    todo.append(r)
                else:
                    frontier.add(r)
        for leaf in sorted(cone | frontier, key=view.order.__getitem__):
            if leaf == root:
                continue
            region = self._region(cone, root, leaf)
            if region is None:
                continue
            kind = evaluate.identify_activation(view, region, root, leaf)
            if kind is None or kind not in pat.kinds:
                continue
            if region & st.covered:
                continue
            nst = st.cover(*region).bind(pat.name, kind)
            if nst is None:
                continue
            nst = nst.bind(pat.name + "_leaf", leaf)
            if nst is not None:
                yield from self.match(pat.input, Ref(leaf), nst)

    def _region(self, cone: set[str], root: str, leaf: str) -> frozenset[str] | None:
        """Nodes of the cone between leaf and root, if they read only each other, the leaf and numbers."""
        view = self.view
        region = {n for n in cone if self._depends_on(n, leaf, cone)}
        if root not in region:
            return None
        for n in region:
            if any(r != leaf and r not in region for r in view.inputs(n)):
                return None
        return frozenset(region)

    def _depends_on(self, name: str, leaf: str, cone: set[str]) -> bool:
        seen: set[str] = set()
        todo = [name]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            for r in self.view.inputs(n):
                if r == leaf:
                    return True
                if r in cone:
                    todo.append(r)
        return False


def _with_mask_producers(view: GraphView, st: State) -> frozenset[str]:
    """The covered set plus the ops computing each mask that feed nothing else (e.g. eq(tril_buffer, 0))."""
    covered = set(st.covered)
    ancestors: set[str] = set()
    todo = list(st.masks)
    while todo:
        n = todo.pop()
        if n in ancestors or view.nodes[n].op != "call_function":
            continue
        ancestors.add(n)
        todo.extend(view.inputs(n))
    for n in sorted(ancestors, key=view.order.__getitem__, reverse=True):
        if n not in covered and view.users(n) and all(u in covered for u in view.users(n)):
            covered.add(n)
    return frozenset(covered)


def _closed(view: GraphView, covered: frozenset[str], root: str, inputs: frozenset[str]) -> bool:
    if inputs & covered:
        return False
    return all(n == root or all(u in covered for u in view.users(n)) for n in covered)


@dataclass(frozen=True)
class Found:
    rule: Rule
    root: str
    covered: frozenset[str]
    params: dict[str, Any]


def candidates(view: GraphView, rules: tuple[Any, ...]) -> list[Found]:
    """For every (rule, node): the largest closed way the rule matches with the node as root."""
    matcher = Matcher(view)
    out: list[Found] = []
    for node in view.graph.nodes:
        if node.op != "call_function":
            continue
        for rule in rules:
            best: Found | None = None
            for st in _root_states(matcher, rule.pattern, node.name):
                covered = _with_mask_producers(view, st)
                if not _closed(view, covered, node.name, st.inputs):
                    continue
                if best is not None and len(covered) <= len(best.covered):
                    continue
                params = rule.read(Bound(view, State(st.bindings, covered, st.inputs, st.masks)))
                if params is not None:
                    best = Found(rule, node.name, covered, params)
            if best is not None:
                out.append(best)
    return out


def _root_states(matcher: Matcher, pat: Pattern, root: str) -> Iterator[State]:
    """Match with `root` as the subgraph's output: the root op itself must match (no identity looked through)."""
    if isinstance(pat, Alt):
        for option in pat.options:
            yield from _root_states(matcher, option, root)
    elif isinstance(pat, Op):
        yield from matcher._op(pat, Ref(root), State(), at_root=True)
    else:
        yield from matcher.match(pat, Ref(root), State())


def select(view: GraphView, found: list[Found]) -> list[Found]:
    """Largest first, then the rule table's order, then graph order; a node belongs to at most one match."""
    ranked = sorted(found, key=lambda f: (-len(f.covered), f.rule.priority, view.order[f.root]))
    taken: set[str] = set()
    chosen: list[Found] = []
    for f in ranked:
        if f.covered & taken:
            continue
        taken |= f.covered
        chosen.append(f)
    return sorted(chosen, key=lambda f: view.order[f.root])


def to_match(view: GraphView, f: Found) -> Match:
    params = dict(f.params)
    dtype = params.pop("dtype")
    operands: dict[str, str] = params.pop("operands")
    shapes = tuple(view.meta(operands[role]).shape for role in f.rule.roles
                   if role in operands and view.meta(operands[role]) is not None)
    params["operands"] = freeze(operands)
    return Match(rule=f.rule.name, family=f.rule.family,
                 nodes=tuple(sorted(f.covered, key=view.order.__getitem__)), anchor=f.root,
                 params=freeze(params), dtype=dtype, shapes=shapes)


def find_matches(graph: Graph, rules: tuple[Any, ...]) -> list[Match]:
    """All non-overlapping matches of `rules` in graph order (unranked, no costs yet). The rule table is passed in
    (discover.find_matches passes rules.RULES): the rules' parameter functions import this module."""
    view = GraphView(graph)
    return [to_match(view, f) for f in select(view, candidates(view, rules))]

