"""Which model orders a GEMM space: the analytic prior (rank.score), a cost model learned from the table's
history (learned.py), or NVIDIA's matmul heuristics (nvmmh.py), chosen once per run.

A ranker gives `scores(problem, configs, arch)`, higher is better, or None where it does not know the problem;
rank.order then spreads the picks over families, tiles and kernels as it does for the analytic scores. `auto`
takes the learned model where the history is deep enough, then NVIDIA's heuristics where installed and the
policy is one they model, else the analytic prior; `choose` says which, and why, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence

from fact_ray.types import Arch, GemmProblem, KernelConfig, Precision

from fact_ray.search_spaces import learned, nvmmh

KINDS = ("auto", "heuristic", "learned", "nvmmh")


class Ranker(Protocol):
    name: str

    def scores(self, problem: GemmProblem, configs: Sequence[KernelConfig], arch: Arch) -> Optional[list[float]]:
        ...


@dataclass(frozen=True)
class Chain:
    """The first ranker that knows the problem; None from all of them keeps the analytic order."""

    rankers: tuple
    name: str

    def scores(self, problem: GemmProblem, configs: Sequence[KernelConfig], arch: Arch) -> Optional[list[float]]:
        for r in self.rankers:
            s = r.scores(problem, configs, arch)
            if s is not None:
                return s
        return None


def choose(kind: str, policy: Precision, arch: Arch,
           history: Iterable[learned.Sample] = ()) -> tuple[Optional[Ranker], str]:
    """(the ranker, a line saying which and why). None: the analytic prior orders (rank.score). `history`: the
    table's timed trials (learned.samples_from_rows); only those of this policy train the model."""
    if kind not in KINDS:
        raise ValueError(f"unknown ranker {kind!r} (have {', '.join(KINDS)})")
    policy, arch = Precision(policy), Arch(arch)
    if kind == "heuristic":
        return None, "ranking: the analytic prior (asked for)"
    model, model_why = None, ""
    if kind in ("auto", "learned"):
        mine = [s for s in history if Precision(s.config.precision) is policy]
        model = learned.fit(mine, arch)
        model_why = (f"a cost model learned from {model.samples} trials of {model.problems} problems" if model
                     else f"table history too thin to learn from ({len(mine)} timed trials of {policy.value} "
                          f"on {arch.value}; {learned.MIN_SAMPLES} over {learned.MIN_PROBLEMS} problems needed)")
    heur = nvmmh.NvMatmulHeuristicsRanker(policy)
    heur_ok = nvmmh.available().ok and policy in nvmmh.PRECISION
    heur_why = ("nvidia-matmul-heuristics" if heur_ok else
                nvmmh.available().why or f"nvidia-matmul-heuristics does not model the {policy.value} policy")
    if kind == "learned":
        return (model, f"ranking: {model_why}") if model else (None, f"ranking: the analytic prior ({model_why})")
    if kind == "nvmmh":
        return (heur, f"ranking: {heur_why}") if heur_ok else (None, f"ranking: the analytic prior ({heur_why})")
    rankers = tuple(r for r in (model, heur if heur_ok else None) if r is not None)
    if not rankers:
        return None, f"ranking: the analytic prior ({model_why}; {heur_why})"
    names = " then ".join([model_why] * bool(model) + [heur_why] * heur_ok)
    return Chain(rankers, "+".join(r.name for r in rankers)), f"ranking: {names}, the analytic prior elsewhere"
