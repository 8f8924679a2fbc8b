"""Successive halving over candidates: cheap screening timings first, full timings only for the survivors.

A rung times every surviving candidate with that rung's effort (few repetitions and one verification seed at
first, the full trial last) and keeps the best 1/eta of them (at least one); the last rung is the full trial.
The search also stops early when the leader is clearly ahead: faster than the runner-up by `lead` or more and
beyond the noise of both timings (their p10-p90 ranges do not overlap), so it keeps only the leader.

Pure: `measure` is injected (a GPU trial in the pipeline, a synthetic timing in tests), and so is the clock
for the budget in seconds. `keep` is the one survivor rule, shared with the pipeline's two-rung form.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

ETA = 4  # keep a quarter per rung: 256 -> 64 -> 16 -> 4
LEAD = 1.25  # a leader this much faster than the runner-up, beyond noise, ends the search


@dataclass(frozen=True)
class Timing:
    """One measurement: the median and the p10/p90 spread (ms); relative times (over a baseline) work as well."""

    median: float
    p10: float = float("nan")
    p90: float = float("nan")


@dataclass(frozen=True)
class Outcome:
    """What the search decided: the survivors of its last rung, best first, and how far it went."""

    ranking: tuple[str, ...]  # the last rung's measured candidates, best first
    rungs: int  # rungs run
    measurements: int  # calls of `measure`
    early_stop: bool  # stopped because the leader was clearly ahead
    out_of_time: bool  # stopped because the budget in seconds ran out
    eliminated: dict[str, int] = field(default_factory=dict)  # candidate -> the rung that dropped it

    @property
    def best(self) -> Optional[str]:
        return self.ranking[0] if self.ranking else None


def clearly_ahead(leader: Timing, second: Timing, lead: float = LEAD) -> bool:
    """Leader faster than the runner-up by `lead`x, and their spreads apart (noise cannot swap them)."""
    if not (leader.median > 0 and second.median > 0):
        return False
    apart = not (math.isfinite(leader.p90) and math.isfinite(second.p10)) or leader.p90 < second.p10
    return second.median / leader.median >= lead and apart


def keep(timings: dict[str, Timing], order: Sequence[str], eta: int = ETA, lead: float = LEAD) -> tuple[list[str], bool]:
    """(survivors best first, whether the leader is clearly ahead). `order` breaks ties (the ranker's order):
    the best ceil(n / eta) by median, or the leader alone when it is clearly ahead."""
    if eta < 2:
        raise ValueError(f"eta must be at least 2, got {eta}")
    pos = {n: i for i, n in enumerate(order)}
    ranked = sorted(timings, key=lambda n: (timings[n].median, pos.get(n, len(pos))))
    if len(ranked) >= 2 and clearly_ahead(timings[ranked[0]], timings[ranked[1]], lead):
        return ranked[:1], True
    return ranked[:max(1, math.ceil(len(ranked) / eta))], False


def successive_halving(candidates: Sequence[str], measure: Callable[[str, int], Optional[Timing]], rungs: int, *,
                       eta: int = ETA, lead: float = LEAD, budget_s: Optional[float] = None,
                       clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Run up to `rungs` rungs over `candidates` (in the ranker's order); `measure(name, rung)` returns a
    Timing, or None for a candidate that failed (it is dropped). Rung r < rungs - 1 is screening, the last is
    the full measurement. With `budget_s`, no new measurement starts after the budget: the rung in progress
    ends with what it measured, and its ranking is the answer."""
    if rungs < 1:
        raise ValueError(f"rungs must be at least 1, got {rungs}")
    start = clock()
    alive = list(dict.fromkeys(candidates))
    eliminated: dict[str, int] = {}
    calls, early, late = 0, False, False
    ranking: list[str] = []
    for r in range(rungs):
        timings: dict[str, Timing] = {}
        for name in alive:
            if budget_s is not None and clock() - start >= budget_s:
                late = True
                break
            t = measure(name, r)
            calls += 1
            if t is None:
                eliminated[name] = r
            else:
                timings[name] = t
        if not timings:
            return Outcome((), r + 1, calls, False, late, eliminated)
        last = r == rungs - 1 or late
        survivors, early = keep(timings, alive, eta, lead)
        ranking = sorted(timings, key=lambda n: (timings[n].median, alive.index(n)))
        if last:
            return Outcome(tuple(ranking), r + 1, calls, early and len(timings) > 1, late, eliminated)
        for n in timings:
            if n not in survivors:
                eliminated[n] = r
        alive = survivors
        if early:
            # The leader's lead holds beyond noise: the remaining rungs only confirm it (its full measurement).
            t = measure(alive[0], rungs - 1)
            calls += 1
            if t is None:
                eliminated[alive[0]] = rungs - 1
                return Outcome((), r + 2, calls, True, late, eliminated)
            return Outcome(tuple(alive), r + 2, calls, True, late, eliminated)
    return Outcome(tuple(ranking), rungs, calls, early, late, eliminated)
