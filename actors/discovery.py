"""The discovery actor: capture the model and find its patterns, in a Ray worker process.

Why an actor, not a call in the driver: capture imports and runs the user's model code (a model that segfaults
or leaks takes a worker down, not the driver), and the LLM agent that will rank and propose patterns is a
long-lived client worth keeping in one process across calls.

The seam for that agent is `Ranker`: `RuleRanker` keeps the rules' own ranking (--llm off, the default);
`llm_agent.LlmRanker` (--llm rank | propose) asks an OpenAI-compatible endpoint to re-order the matches and,
with propose, to add vetted rules and search-space hints. Its whole result (moves against the rules, proposals
with verdicts, notes, tokens, latency) travels back in `Discovery` for the farm to report and log.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from fact_ray.errors import ConfigError
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
    # What the LLM agent did (all empty with the rules alone); types from fact_ray.actors.llm_agent.
    moves: tuple[Any, ...] = ()  # Move: matches the agent placed differently from the rules
    proposals: tuple[Any, ...] = ()  # ProposalOutcome: accepted or rejected, with the reason
    hints: tuple[tuple[str, tuple[str, ...]], ...] = ()  # match key -> config names to try first
    agent_notes: tuple[str, ...] = ()  # also in `notes`
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    requests: int = 0
    answer_used: bool = False  # the agent's answer was used (False: the rules' ranking stands)

    @property
    def agent_used(self) -> bool:
        return self.ranker != "rules"

    def hinted(self, match_key: str) -> tuple[str, ...]:
        return dict(self.hints).get(match_key, ())


class Ranker(Protocol):
    name: str

    def rank(self, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision) -> list[Match]: ...


class RuleRanker:
    """The rules' own ranking (estimated time share, Amdahl): nothing to change."""

    name = "rules"

    def rank(self, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision) -> list[Match]:
        return list(matches)


def make_ranker(llm: str, settings: Any = None, *, env: Mapping[str, str] | None = None,
                config: Any = None) -> Ranker:
    """The ranker for the `llm` setting (off | rank | propose). rank/propose need OPENAI_BASE_URL,
    OPENAI_API_KEY and a model (settings.llm_model): a missing one is a ConfigError line, raised before a run
    starts. `config` (an llm_agent.LlmConfig) skips the lookup: the farm resolves it on the driver."""
    if llm == "off":
        return RuleRanker()
    if llm not in ("rank", "propose"):
        raise ConfigError(f"--llm must be off, rank or propose, got {llm!r}")
    from fact_ray.actors.llm_agent import LlmRanker

    return LlmRanker(config if config is not None else llm_config(llm, settings, env=env))


def llm_config(llm: str, settings: Any = None, *, env: Mapping[str, str] | None = None) -> Any:
    """The agent's LlmConfig from settings and the environment (see llm_agent.config_from)."""
    from fact_ray.actors.llm_agent import config_from
    from fact_ray.config import Settings

    s = settings if settings is not None else Settings()
    table = s.resolved_table_uri
    # Absolute paths: the actor's worker does not share the driver's working directory.
    if "://" not in table:
        table = str(Path(table).absolute())
    return config_from(llm, s.llm_model, table_uri=table, cache_dir=str(Path(s.resolved_cache_dir).absolute()),
                       nvcc=s.nvcc, env=env)


@functools.cache
def discovery_actor() -> Any:
    """DiscoveryAgent as a Ray actor class. Made on demand: a run that the table serves whole never starts Ray,
    and does not pay for importing it (half a second) either."""
    import ray

    return ray.remote(num_cpus=1, max_restarts=0)(DiscoveryAgent)


class DiscoveryAgent:
    """Capture and discovery for one run, in a Ray worker on the driver's node (see discovery_actor)."""

    def __init__(self, llm: str = "off", config: Any = None) -> None:
        self._ranker = make_ranker(llm, config=config)

    def discover(self, ref: str, arch: Arch, policy: Precision, capture_dir: str = "") -> Discovery:
        """`capture_dir`: the capture cache to read and fill (this actor runs on the driver's node); "" for none."""
        # Imported here: the driver never needs torch for discovery, the worker does.
        from fact_ray.capture import capture, load_model, under_policy
        from fact_ray.capture_cache import captured
        from fact_ray.discover import discover

        loaded = under_policy(load_model(ref), policy)
        cap = captured(loaded, capture_dir)[0] if capture_dir else capture(loaded)
        matches = discover(cap.graph, arch, policy)
        return rank_matches(self._ranker, cap.graph, matches, arch, policy, cap.method, tuple(cap.notes))


def rank_matches(ranker: Ranker, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision,
                 method: str, notes: tuple[str, ...] = ()) -> Discovery:
    """Rank with `ranker` and package the outcome (the agent's whole result when the ranker is the agent)."""
    consult = getattr(ranker, "consult", None)
    if consult is None:
        ranked = ranker.rank(graph, matches, arch, policy)
        return Discovery(graph.model_name, graph.model_hash, method, graph, tuple(ranked), notes, ranker.name)
    r = consult(graph, matches, arch, policy)
    return Discovery(graph.model_name, graph.model_hash, method, graph, tuple(r.matches), notes + r.notes,
                     ranker.name, moves=r.moves, proposals=r.proposals, hints=r.hints, agent_notes=r.notes,
                     prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, latency_s=r.latency_s,
                     requests=r.requests, answer_used=r.answer_used)
