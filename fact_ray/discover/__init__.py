"""Discovery: Graph -> ranked [Match].

Rules (rules.py, declarative) are matched on the graph (match.py), each match is costed on a roofline per arch
and precision policy (cost.py) and ranked by its estimated share of the module's time. `profile` replaces the
estimates with eager timings on a GPU.
"""

from __future__ import annotations

from fact_ray.discover.cost import estimate, resolve_arch, resolve_policy
from fact_ray.discover import match as _match
from fact_ray.discover.report import format_matches, matches_to_json
from fact_ray.errors import UnsupportedDtype
from fact_ray.types import Arch, Graph, Match, Precision

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

__all__ = ["discover", "profile", "format_matches", "matches_to_json", "find_matches", "SUPPORTED_DTYPES"]


def find_matches(graph: Graph, rules: tuple | None = None) -> list[Match]:
    """All non-overlapping matches of the rule table (or of `rules`) in graph order (unranked, no costs yet)."""
    from fact_ray.discover.rules import RULES

    return _match.find_matches(graph, RULES if rules is None else rules)


def discover(graph: Graph, arch: Arch | str, policy: Precision | str) -> list[Match]:
    """Matches of the rule table, costed for `arch` under `policy`, largest estimated time first."""
    arch = resolve_arch(arch)
    policy = resolve_policy(policy)
    matches = find_matches(graph)
    for m in matches:
        if m.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedDtype(
                f"{graph.model_name}: {m.rule} at node {m.anchor} computes in {m.dtype}; fact-ray tunes "
                f"{', '.join(SUPPORTED_DTYPES)} (convert the model and its inputs, e.g. with .float())")
    return estimate(graph, matches, arch, policy)


def profile(captured, matches: list[Match], *, warmup: int = 5, reps: int = 20) -> list[Match]:
    """Time each match's subgraph eagerly on the GPU (CUDA events, median) and rank by the measured times."""
    from fact_ray.discover.profile import profile as _profile

    return _profile(captured, matches, warmup=warmup, reps=reps)
