"""Vetting what the LLM agent proposes: nothing it writes is used before passing our own checks.

Two kinds of proposal:
  * a search-space hint (`HintProposal`): config names to try first for one match. Accepted only if every name
    is a config that `search_spaces.space` itself produces for that match's problem, so a hint can reorder our
    candidates but never add one.
  * a new rule (`RuleProposal`): an unmatched subgraph, named by graph node names, mapped onto an existing GEMM
    family with its parameters. Accepted only if the nodes exist, are not matched already, form a closed
    subgraph, the parameters agree with the nodes' shapes, and its first config compiles (and, with a GPU,
    verifies against the float64 reference). The farm then tunes it like any match, verifying every candidate
    before anything is selected.

The model's text never reaches a compiler: a proposal is reduced to a `Match` (names and integers), and the C++
comes from our templates, the same path our own rules take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from fact_ray.errors import CandidateError, CannotImplement, first_line
from fact_ray.types import Arch, Graph, Match, Precision, Ref, freeze

# Families a proposal may map onto: the GEMM families a template here realizes (realize.problem).
PROPOSABLE_FAMILIES = ("gemm", "gemm_bias", "gemm_bias_act", "gemm_bias_residual", "bmm")
OPERAND_ROLES = ("a", "b", "bias", "residual")


@dataclass(frozen=True)
class RuleProposal:
    """A new rule from the agent, as plain values (validated by the JSON schema, not yet by meaning)."""

    name: str
    family: str
    nodes: tuple[str, ...]
    anchor: str
    operands: tuple[tuple[str, str], ...]  # role -> node name
    params: tuple[tuple[str, Any], ...]  # M, N, K, L, layout_a, layout_b, activation, broadcast_b
    why: str = ""

    @property
    def summary(self) -> str:
        ps = ",".join(f"{k}={v}" for k, v in self.params)
        return f"rule {self.name}: {self.family} over {', '.join(self.nodes)} ({ps})"


@dataclass(frozen=True)
class HintProposal:
    match_key: str
    match_label: str  # "#3 linear_bias" for people
    configs: tuple[str, ...]
    why: str = ""

    @property
    def summary(self) -> str:
        return f"hint for {self.match_label}: try {', '.join(self.configs)} first"


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    match: Match | None = None


def _users(graph: Graph) -> dict[str, set[str]]:
    users: dict[str, set[str]] = {n.name: set() for n in graph.nodes}
    for n in graph.nodes:
        for r in _refs((n.args, tuple(v for _, v in n.kwargs))):
            users.setdefault(r, set()).add(n.name)
    return users


def _refs(value: Any):
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _refs(v)


def _prod(xs: Sequence[int]) -> int:
    return math.prod(xs) if xs else 1


def proposal_match(p: RuleProposal, graph: Graph, matched: Sequence[Match], known_rules: Sequence[str] = ()
                   ) -> Match:
    """The Match a rule proposal describes, or CannotImplement naming the first thing wrong with it."""
    if p.name in known_rules:
        raise CannotImplement(f"rule name {p.name!r} is already taken by the rule table")
    if p.family not in PROPOSABLE_FAMILIES:
        raise CannotImplement(f"unknown kernel family {p.family!r} (proposable: {', '.join(PROPOSABLE_FAMILIES)})")
    names = {n.name: i for i, n in enumerate(graph.nodes)}
    unknown = [n for n in (*p.nodes, p.anchor, *(v for _, v in p.operands)) if n not in names]
    if unknown:
        raise CannotImplement(f"unknown node name(s): {', '.join(sorted(set(unknown)))[:200]}")
    if p.anchor not in p.nodes:
        raise CannotImplement(f"anchor {p.anchor} is not one of the proposal's nodes")
    covered = {n for m in matched for n in m.nodes}
    taken = [n for n in p.nodes if n in covered]
    if taken:
        raise CannotImplement(f"node(s) already matched by a rule: {', '.join(taken)}")
    not_ops = [n for n in p.nodes if graph.node(n).op != "call_function"]
    if not_ops:
        raise CannotImplement(f"not computations: {', '.join(not_ops)}")
    # Closed: only the anchor's value may leave the subgraph, else replacing it would drop a value others read.
    users = _users(graph)
    inside = set(p.nodes)
    leaks = [n for n in p.nodes if n != p.anchor and not users.get(n, set()) <= inside]
    if leaks:
        raise CannotImplement(f"node(s) {', '.join(leaks)} are used outside the subgraph")
    inputs = {r for n in p.nodes for r in _refs((graph.node(n).args, tuple(v for _, v in graph.node(n).kwargs)))
              if r not in inside}
    ops = dict(p.operands)
    if "a" not in ops or "b" not in ops:
        raise CannotImplement("operands a and b are required")
    for role, name in ops.items():
        if role not in OPERAND_ROLES:
            raise CannotImplement(f"unknown operand role {role!r}")
        if name not in inputs:
            raise CannotImplement(f"operand {role}={name} is not an input of the subgraph")
    metas = {role: graph.node(name).meta for role, name in ops.items()}
    out = graph.node(p.anchor).meta
    if out is None or any(m is None for m in metas.values()):
        raise CannotImplement("an operand or the anchor has no tensor shape")

    params = dict(p.params)
    try:
        M, N, K, L = (int(params[k]) if k in params else 1 for k in ("M", "N", "K", "L"))
    except (TypeError, ValueError):
        raise CannotImplement("M, N, K, L must be integers") from None
    if "M" not in params or "N" not in params or "K" not in params:
        raise CannotImplement("params M, N and K are required")
    layout_a, layout_b = str(params.get("layout_a", "row")), str(params.get("layout_b", "col"))
    broadcast_b = bool(params.get("broadcast_b", False))
    a, b = metas["a"], metas["b"]
    dtype = out.dtype
    bad = []
    if out.shape[-1:] != (N,) or _prod(out.shape[:-1]) != M * L:
        bad.append(f"output {tuple(out.shape)} is not {L}x{M}x{N}")
    a_tail = (M, K) if layout_a == "row" else (K, M)
    a_ok = a.shape[-1:] == (K,) if layout_a == "row" and L == 1 else tuple(a.shape[-2:]) == a_tail
    if a.numel != L * M * K or not a_ok:
        bad.append(f"a {tuple(a.shape)} is not {'x'.join(map(str, a_tail))} ({layout_a}) x L={L}")
    b_tail = (N, K) if layout_b == "col" else (K, N)
    b_copies = 1 if broadcast_b or L == 1 else L
    if tuple(b.shape[-2:]) != b_tail or b.numel != b_copies * K * N:
        bad.append(f"b {tuple(b.shape)} is not {'x'.join(map(str, b_tail))} ({layout_b})")
    if "bias" in metas and metas["bias"].numel != N:
        bad.append(f"bias {tuple(metas['bias'].shape)} does not have N={N} elements")
    if "residual" in metas and tuple(metas["residual"].shape) != tuple(out.shape):
        bad.append(f"residual {tuple(metas['residual'].shape)} is not the output's shape {tuple(out.shape)}")
    mixed = sorted({m.dtype for m in metas.values()} - {dtype})
    if mixed:
        bad.append(f"operand dtype(s) {', '.join(mixed)} differ from the output's {dtype}")
    if bad:
        raise CannotImplement("parameters disagree with the graph: " + "; ".join(bad))

    order = sorted(p.nodes, key=names.__getitem__)
    match_params = {
        "M": M, "N": N, "K": K, "L": L, "layout_a": layout_a, "layout_b": layout_b, "broadcast_b": broadcast_b,
        "activation": str(params.get("activation", "none")), "has_bias": "bias" in ops,
        "residual": "residual" in ops, "operands": freeze(ops),
    }
    shapes = tuple(tuple(metas[r].shape) for r in OPERAND_ROLES if r in metas)
    return Match(rule=p.name, family=p.family, nodes=tuple(order), anchor=p.anchor, params=freeze(match_params),
                 dtype=dtype, shapes=shapes)


def vet_proposal(proposal: RuleProposal, graph: Graph, arch: Arch, policy: Precision, cache_dir: str, *,
                 matched: Sequence[Match] = (), known_rules: Sequence[str] = (), nvcc: str = "nvcc") -> Verdict:
    """Accept a rule proposal only if it describes the graph truthfully and its kernel compiles (and verifies,
    when a GPU is here). Never raises for a bad proposal: the verdict says why it was rejected."""
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.realize.problem import problem_from_match
    from fact_ray.search_spaces import space

    try:
        match = proposal_match(proposal, graph, matched, known_rules)
        problem = problem_from_match(match, policy)
        configs = space(problem, arch, policy, 1)
    except CannotImplement as e:
        return Verdict(False, f"rejected: {e}")
    if not configs:
        return Verdict(False, "rejected: no configuration of the search space fits its problem")
    cfg = configs[0]
    library = build(emit([cfg], arch)[0], cache_dir, nvcc=nvcc)
    if not library.ok:
        return Verdict(False, f"rejected: {cfg.name} failed to compile: {first_line(library.log)}")
    reason = _verify_on_gpu(library, cfg, problem, policy)
    if reason:
        return Verdict(False, f"rejected: {reason}")
    gpu = _gpu_present()
    what = "compiled and verified" if gpu else "compiled; verification needs a GPU (the farm verifies every " \
                                               "candidate before selecting)"
    return Verdict(True, f"accepted: {cfg.name} {what}", match)


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def _verify_on_gpu(library: Any, cfg: Any, problem: Any, policy: Precision) -> str:
    """"" when verified (or when there is no GPU to verify on), else why the kernel is wrong."""
    if not _gpu_present():
        return ""
    from fact_ray.realize.kernel import GemmKernel
    from fact_ray.realize.verify import verify

    try:
        kernel = GemmKernel(library, cfg, problem)
        res = verify(lambda a, b, bias, residual, out: kernel(a, b, bias, residual, out=out), problem, policy,
                     "cuda")
    except CandidateError as e:
        return f"{cfg.name}: {first_line(e, named=False)}"
    return "" if res.ok else f"{cfg.name} is wrong: {res.reason}"


def vet_hint(hint: HintProposal, match: Match, arch: Arch, policy: Precision) -> Verdict:
    """A hint passes if each config it names is one the search space produces for this match."""
    from fact_ray.realize.problem import problem_from_match
    from fact_ray.search_spaces import space

    try:
        names = {c.name for c in space(problem_from_match(match, policy), arch, policy)}
    except CannotImplement as e:
        return Verdict(False, f"rejected: the match has no search space ({e})")
    unknown = [c for c in hint.configs if c not in names]
    if unknown:
        return Verdict(False, f"rejected: not in the search space of {hint.match_label}: {', '.join(unknown)[:300]}")
    return Verdict(True, f"accepted: {len(hint.configs)} config(s) tried first", match)
