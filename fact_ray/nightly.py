"""One night's judgement per key: tonight's re-measurement of the incumbent and the new candidates against the
previous night's winner, what the table must learn from it, and whether a served winner must be re-verified.

The farm measures (the incumbent first: `warm_start`); this module only compares and writes rows:

- an incumbent verified again but no longer the fastest gets a `demoted` row with tonight's time (its latest row,
  so it leaves the serving set: `pattern_table.truth`);
- an incumbent that fails verification tonight gets an `invalidated` row: never served again for the key;
- a regression is flagged when tonight's time of the incumbent, or of tonight's winner, is slower than the previous
  winner's by more than the threshold (on the same GPU model; across GPU models the speedups over the PyTorch op,
  each measured side by side, are compared instead: absolute times are not comparable, measuring.md).

Serve-time validity (`environment_drift`): a row records the environment it was measured in (GPU model, driver,
cuBLAS, cuDNN, torch, CUDA/nvcc, CUTLASS). A winner whose recorded environment differs from this host's in a fact
this host knows is not served as is: it is re-verified first (the farm re-tunes the key with it as the first
candidate, and `judge` records the outcome).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from fact_ray.pattern_table.row import TableRow
from fact_ray.pattern_table.truth import DEMOTED, INVALIDATED, current
from fact_ray.types import Trial, TrialStatus

DEFAULT_THRESHOLD = 0.05  # 5 %: above the spread of a median of 100 interleaved runs (measuring.md)

# Trial statuses that mean "the kernel computed a wrong result": a verification failure, not bad luck.
_WRONG = frozenset({TrialStatus.WRONG})

# The environment facts a row records, as (name, how to read it from a row). Names match the host facts.
ENV_FACTS = ("gpu_name", "driver", "cublas", "cudnn", "torch", "cuda", "cutlass")


def row_environment(row: TableRow) -> dict[str, str]:
    """The environment a row was measured in ("" where the row does not say: rows older than the fact)."""
    tc = row.toolchain
    return {"gpu_name": row.gpu_name or "", "driver": getattr(row, "driver", None) or "",
            "cublas": getattr(row, "cublas", None) or "", "cudnn": getattr(row, "cudnn", None) or "",
            "torch": tc.torch or "", "cuda": tc.cuda or "", "cutlass": tc.cutlass or ""}


def environment_drift(row: TableRow, host: Mapping[str, str]) -> tuple[str, ...]:
    """The facts in which `row`'s environment differs from `host`'s, as "name: row -> host". A fact the host does
    not know (no GPU, no cuDNN) is no evidence either way; one the host knows and the row does not (a row written
    before it was recorded) counts as a difference: nothing shows the row holds here."""
    env = row_environment(row)
    out = []
    for name in ENV_FACTS:
        here = str(host.get(name) or "")
        if here and env[name] != here:
            out.append(f"{name}: {env[name] or 'not recorded'} -> {here}")
    return tuple(out)


def previous_winner(history: Sequence[TableRow], before: datetime) -> TableRow | None:
    """The key's winner as it stood before `before` (the night's start): current truth over the older rows."""
    from fact_ray.pattern_table.store import rank

    top = rank(current([r for r in history if r.created_at < before]))
    return top[0] if top else None


def warm_start(previous: TableRow | None) -> tuple[str, ...]:
    """Config names to try first tonight: the incumbent (re-measured before any new candidate)."""
    if previous is None or previous.config_json is None:
        return ()
    return (previous.config_name,)


@dataclass(frozen=True)
class KeyVerdict:
    """What one night decided for one key."""

    match_key: str
    rule: str
    shapes: str
    previous: str  # the previous winner's config name ("torch": the PyTorch op; "" none)
    previous_ms: float
    previous_speedup: float
    winner: str  # tonight's winner ("torch" when the PyTorch op stays)
    winner_ms: float
    baseline_ms: float  # the PyTorch op tonight, timed beside the winner
    speedup: float  # tonight's winner over the PyTorch op
    rel_err: float
    incumbent_ms: float  # the incumbent re-measured tonight (nan: not re-measured)
    changed: bool  # tonight's winner is not the previous one
    regressed: bool  # incumbent or key slower than the previous winner beyond the threshold
    invalidated: bool  # the incumbent failed verification tonight
    reverified: tuple[str, ...] = ()  # environment facts that differed and forced a re-verification
    note: str = ""

    @property
    def change_vs_previous(self) -> float:
        """Tonight's time over the previous night's, minus one (+0.10: 10 % slower); nan without both."""
        if not (self.previous_ms > 0 and self.winner_ms > 0):
            return math.nan
        return self.winner_ms / self.previous_ms - 1.0

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

        d = {k: (num(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        d["reverified"] = list(self.reverified)
        d["change_vs_previous"] = num(self.change_vs_previous)
        return d


def _ms(t: Trial | None) -> float:
    return t.time.median_ms if t is not None and t.time is not None else math.nan


def _slower(now_ms: float, now_speedup: float, prev: TableRow, gpu_name: str | None, threshold: float) -> bool:
    if math.isnan(now_ms):
        return False
    if prev.gpu_name and gpu_name and prev.gpu_name != gpu_name:
        # Different GPU models: only ratios measured side by side on each are comparable.
        return bool(prev.speedup and now_speedup == now_speedup and now_speedup < prev.speedup / (1 + threshold))
    return prev.median_ms is not None and now_ms > prev.median_ms * (1 + threshold)


def judge(previous: TableRow | None, trials: Sequence[Trial], chosen: Trial, *, match_key: str, rule: str = "",
          shapes: str = "", gpu_name: str | None = None, threshold: float = DEFAULT_THRESHOLD,
          drift: tuple[str, ...] = ()) -> tuple[KeyVerdict, tuple[Trial, ...]]:
    """Tonight's verdict for one key, and the trials to record beside the farm's winner row: the incumbent's
    re-measurement as `demoted` (verified, not chosen) or `invalidated` (failed verification). `chosen` is the
    trial the farm selected (`realize.select.select`)."""
    inc_name = previous.config_name if previous is not None else ""
    inc = next((t for t in trials if t.candidate_name == inc_name), None) if inc_name else None
    extra: list[Trial] = []
    invalid = inc is not None and inc.status in _WRONG and inc_name != "torch"
    if invalid:
        extra.append(replace(inc, status=INVALIDATED, error=f"failed verification on re-measurement: {inc.error}"))
    elif inc is not None and inc.candidate_name != chosen.candidate_name and inc.status.correct:
        extra.append(replace(inc, status=DEMOTED, error=f"re-measured; {chosen.candidate_name} is faster now"))
    regressed = False
    notes = []
    if previous is not None and previous.valid:
        if inc is not None and _slower(_ms(inc), inc.speedup, previous, gpu_name, threshold):
            regressed = True
            notes.append(f"incumbent {inc_name} {previous.median_ms:.4g} -> {_ms(inc):.4g} ms")
        if _slower(_ms(chosen), chosen.speedup, previous, gpu_name, threshold):
            regressed = True
            notes.append(f"best {previous.median_ms:.4g} -> {_ms(chosen):.4g} ms")
    if invalid:
        notes.append(f"incumbent {inc_name} failed verification: invalidated")
    if drift:
        notes.append("environment changed (" + "; ".join(drift) + "): re-verified")
    verdict = KeyVerdict(
        match_key=match_key, rule=rule, shapes=shapes, previous=inc_name,
        previous_ms=previous.median_ms if previous is not None and previous.median_ms is not None else math.nan,
        previous_speedup=previous.speedup if previous is not None and previous.speedup is not None else math.nan,
        winner=chosen.candidate_name, winner_ms=_ms(chosen),
        baseline_ms=chosen.baseline.median_ms if chosen.baseline is not None else math.nan,
        speedup=chosen.speedup, rel_err=chosen.rel_err, incumbent_ms=_ms(inc),
        changed=previous is not None and chosen.candidate_name != inc_name,
        regressed=regressed, invalidated=invalid, reverified=drift, note="; ".join(notes))
    return verdict, tuple(extra)


def verdict_rows(extra: Sequence[Trial], previous: TableRow, match: Any, ctx: Any) -> list[TableRow]:
    """Table rows for `judge`'s extra trials (all of the incumbent: its config and library as stored)."""
    from fact_ray.pattern_table.row import row_from_trial

    return [row_from_trial(t, match, ctx, policy=previous.policy, arch=previous.arch, config=previous.config,
                           library_key=previous.library_key, library_uri=previous.library_uri,
                           library_symbol=previous.library_symbol) for t in extra]


# --------------------------------------------------------------------------------------------- the night


@dataclass(frozen=True)
class ModelNight:
    """One model under one policy, tonight."""

    model: str
    policy: str
    arch: str
    gpu: str
    verdicts: tuple[KeyVerdict, ...]
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    run_id: str = ""  # the farm's run id
    mlflow_run_id: str = ""
    failed: str = ""  # the model could not be re-tuned at all (one line)


@dataclass(frozen=True)
class NightReport:
    fleet: str
    night: str  # e.g. "2026-12-02"
    started: str
    seconds: float
    gpus: int
    threshold: float
    models: tuple[ModelNight, ...]
    previous_night: str = ""
    notes: tuple[str, ...] = ()

    @property
    def regressions(self) -> list[tuple[str, KeyVerdict]]:
        return [(m.model, v) for m in self.models for v in m.verdicts if v.regressed]

    @property
    def invalidations(self) -> list[tuple[str, KeyVerdict]]:
        return [(m.model, v) for m in self.models for v in m.verdicts if v.invalidated]

    @property
    def failures(self) -> list[ModelNight]:
        return [m for m in self.models if m.failed]

    @property
    def clean(self) -> bool:
        """Verified and not regressed: the only kind of night that may move the `production` alias."""
        return not (self.regressions or self.invalidations or self.failures)

    @property
    def exit_code(self) -> int:
        """0 on a clean night; 1 on a regression, a failed verification, or a model that could not be re-tuned
        (what a scheduler alerts on)."""
        return 0 if self.clean else 1

    def summary_line(self) -> str:
        keys = sum(len(m.verdicts) for m in self.models)
        changed = sum(v.changed for m in self.models for v in m.verdicts)
        state = "clean" if self.clean else "ALERT"
        return (f"fact-ray night {self.night} of fleet {self.fleet}: {state}; {len(self.models)} model runs, "
                f"{keys} patterns, {changed} winners changed, {len(self.regressions)} regressions, "
                f"{len(self.invalidations)} invalidated, {len(self.failures)} failed, {self.seconds:.0f} s "
                f"on {self.gpus} GPUs")

    def to_json(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "night": self.night, "started": self.started, "seconds": self.seconds,
                "gpus": self.gpus, "threshold": self.threshold, "previous_night": self.previous_night,
                "clean": self.clean, "exit_code": self.exit_code, "summary": self.summary_line(),
                "notes": list(self.notes),
                "models": [{"model": m.model, "policy": m.policy, "arch": m.arch, "gpu": m.gpu,
                            "seconds": m.seconds, "notes": list(m.notes), "run_id": m.run_id,
                            "mlflow_run_id": m.mlflow_run_id, "failed": m.failed,
                            "patterns": [v.to_json() for v in m.verdicts]} for m in self.models]}
