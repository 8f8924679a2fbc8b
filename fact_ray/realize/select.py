"""Pick the realization of one pattern from its trials.

The PyTorch op ("torch") is always a candidate and wins unless a verified kernel is faster: faster than the
op timed beside it by more than the timing noise, and by at least `min_speedup`. A trial whose status is not
"ok" (compile_error, cannot_implement, wrong, crashed, timeout, slower) is never selected.
"""

from __future__ import annotations

from typing import Sequence

from fact_ray.realize.bench import clearly_faster
from fact_ray.types import TimeStats, Trial, TrialStatus

TORCH = "torch"


def _baseline(trial: Trial, torch_trial: Trial | None) -> TimeStats | None:
    # The baseline measured side by side with the kernel is the one to compare with; the torch trial's own
    # time is the fallback for trials that carry none.
    if trial.baseline is not None:
        return trial.baseline
    return torch_trial.time if torch_trial is not None else None


def speedup_over_torch(trial: Trial, torch_trial: Trial | None = None) -> float:
    base = _baseline(trial, torch_trial)
    if trial.time is None or base is None or trial.time.median_ms <= 0:
        return float("nan")
    return base.median_ms / trial.time.median_ms


def eligible(trial: Trial, torch_trial: Trial | None = None, min_speedup: float = 1.0) -> bool:
    """A kernel trial that may replace the torch op."""
    if trial.candidate_name == TORCH or trial.status != TrialStatus.OK or trial.time is None:
        return False
    base = _baseline(trial, torch_trial)
    if base is None:
        return False  # never timed against the op: nothing shows it is faster
    return clearly_faster(trial.time, base) and speedup_over_torch(trial, torch_trial) >= min_speedup


def select(trials: Sequence[Trial], min_speedup: float = 1.0) -> Trial:
    """The fastest eligible kernel trial, else the torch op's trial (made up, untimed, if none was given)."""
    torch_trial = next((t for t in trials if t.candidate_name == TORCH), None)
    best = [t for t in trials if eligible(t, torch_trial, min_speedup)]
    if best:
        return max(best, key=lambda t: (speedup_over_torch(t, torch_trial), -t.time.median_ms))
    if torch_trial is not None:
        return torch_trial
    return Trial(candidate_name=TORCH, status=TrialStatus.OK, error="no trial of the PyTorch op was recorded")
