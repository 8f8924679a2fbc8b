"""The discovery actor: capture the model and find its patterns, in a Ray worker process.

Why an actor, not a call in the driver: capture imports and runs the user's model code (a model that segfaults
or leaks takes a worker down, not the driver), and the LLM agent that will rank and propose patterns is a
long-lived client worth keeping in one process across calls.

The seam for that agent is `Ranker`: discovery today is the rules alone (`RuleRanker`, which keeps the rules'
own ranking); an LLM ranker will implement the same `rank` over the same inputs and return a re-ordered (or
extended) list. Asking for one before it exists is a clear NotAvailable, never a silent fall back to rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import ray

from fact_ray.errors import NotAvailable
from fact_ray.types import Arch, Graph, Match, Precision


@dataclass(frozen=True)
class Discovery:
    """What discovery hands the farm: the traced graph, its ranked matches and what capture had to say."""

    model_name: str
    model_hash: str
    method: str  # "export" | "fx"
    graph: Graph
    matches: tuple[Match, ...]  # ranked, most worth tuning first
    notes: tuple[str, ...] = ()
    ranker: str = "rules"


class Ranker(Protocol):
    name: str

    def rank(self, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision) -> list[Match]: ...


class RuleRanker:
    """The rules' own ranking (estimated time share, Amdahl): nothing to change."""

    name = "rules"

    def rank(self, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision) -> list[Match]:
        return list(matches)


def make_ranker(llm: str) -> Ranker:
    """The ranker for the `llm` setting (off | rank | propose)."""
    if llm == "off":
        return RuleRanker()
    raise NotAvailable(f"--llm {llm}: the LLM discovery agent is not implemented yet; run with --llm off "
                       "(the rules rank alone)")


@ray.remote(num_cpus=1, max_restarts=0)
class DiscoveryAgent:
    def __init__(self, llm: str = "off") -> None:
        self._ranker = make_ranker(llm)

    def discover(self, ref: str, arch: Arch, policy: Precision) -> Discovery:
        # Imported here: the driver never needs torch for discovery, the worker does.
        from fact_ray.capture import capture, load_model
        from fact_ray.discover import discover

        captured = capture(load_model(ref))
        graph = captured.graph
        matches = discover(graph, arch, policy)
        ranked = self._ranker.rank(graph, matches, arch, policy)
        return Discovery(graph.model_name, graph.model_hash, captured.method, graph, tuple(ranked),
                         tuple(captured.notes), self._ranker.name)
