"""Current truth per key: which of a key's rows still speak for their kernel.

History is kept whole (every night appends), but a row is only evidence until the same kernel is measured again:

- a kernel's **latest** row on a GPU speaks for it there; older ones are history. So an incumbent that a new driver
  made slower is ranked by tonight's time, not by the best time it ever had, and a re-measurement that demotes it
  (status `demoted`: verified, re-measured, no longer the winner) takes it out of the serving set;
- a kernel with an `invalidated` row (it produced wrong results on a re-check) is never served again for that key,
  whatever older or newer rows say: being right once does not outweigh being wrong once.

`rank` (in `store`) then orders what is left exactly as before.
"""

from __future__ import annotations

from typing import Iterable

from fact_ray.types import TrialStatus

# Row statuses of the nightly re-tune (fact_ray.nightly), never written by a first tuning (see TrialStatus).
INVALIDATED = TrialStatus.INVALIDATED.value  # failed verification on a re-check: never served again for this key
DEMOTED = TrialStatus.DEMOTED.value  # verified on a re-measurement, but no longer the winner (slower than tonight's)
REVERIFIED = TrialStatus.REVERIFIED.value  # a note row: re-checked under a new environment (its ok row follows)


def invalidated(rows: Iterable) -> frozenset[str]:
    """Config names of the kernels a row invalidated."""
    return frozenset(r.config_name for r in rows if r.status == INVALIDATED)


def current(rows: Iterable) -> list:
    """The rows that speak for their kernels now (input oldest first; output in the same order): each kernel's
    latest row per GPU, without invalidated kernels. Note rows (`reverified`) say nothing about speed and are not
    a kernel's latest word."""
    rows = [r for r in rows if r.status != REVERIFIED]
    bad = invalidated(rows)
    latest: dict[tuple, object] = {}
    for r in rows:
        latest[(r.gpu_name, r.config_name)] = r  # later rows (oldest first) overwrite
    keep = {id(r) for r in latest.values()}
    return [r for r in rows if id(r) in keep and r.config_name not in bad]
