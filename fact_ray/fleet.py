"""A fleet file and `fact-ray retune --fleet`: every model of a production fleet re-tuned in one night, one Ray job.

    # fleet.toml
    name = "prod"               # the fleet's name: an MLflow tag, the report's title
    budget = 16                 # candidates per pattern (the incumbent is always the first)
    time_cap_s = 21600          # no model starts after this many seconds; those left are reported as not run
    threshold = 0.05            # slower than the previous night by more than this: a regression
    policies = ["fp32"]         # default policies of every model
    webhook = "https://hooks.example/fact-ray"   # optional: the night's summary is POSTed here as JSON
    register = true             # compose, log and register each model's artifact (needs a GPU); default false
    explore = "on-change"       # new candidates only for keys whose incumbent regressed, failed or lost; "always":
                                # every key, every night

    [[models]]
    name = "minigpt"            # optional (default: the ref)
    ref = "examples/minigpt.py" # a KernelBench-format file (relative to the fleet file) or pkg.module:factory
    policies = ["fp32", "bf16"] # optional, overrides the default

One model entry is one set of input shapes (the model's `get_inputs`, or the factory's example inputs): a model
served at several shapes is listed once per shape, each entry naming a file or factory for it.

The night (`retune`): one Ray connection for the whole fleet (the cluster of `--address`, or the running cluster a
`ray job submit` job joins, or a local one), then per (model, policy):

1. incumbents first: a farm run that re-measures each key's incumbent alone (beside the PyTorch op); keys with no
   winner yet are tuned in full. A pattern two models share is measured for the first and served tonight's row for
   the second (`fresh_since`: the night's start);
2. new candidates: a farm run re-tuning, with the full budget (the incumbent again first), the keys whose incumbent
   regressed, failed verification or lost to the PyTorch op (`explore = "on-change"`), or every key
   (`explore = "always"`).

`nightly.judge` compares each key with the previous night and writes the demotions and invalidations. A night in
which nothing changed is therefore one trial per key, not a budget's worth. On a machine without a GPU every step up to the
trials still runs (capture, discovery, planning, compiles) and the report says what could not be measured.
"""

from __future__ import annotations

import math
import os
import time
import tomllib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from fact_ray.config import Settings
from fact_ray.errors import ConfigError
from fact_ray.events import PatternFinished, PatternStarted, RunStarted
from fact_ray.nightly import DEFAULT_THRESHOLD, KeyVerdict, ModelNight, NightReport
from fact_ray.types import Precision

_TOP = {"name", "budget", "time_cap_s", "threshold", "policies", "webhook", "register", "explore", "models"}
EXPLORE = ("on-change", "always")
_MODEL = {"name", "ref", "policies"}


@dataclass(frozen=True)
class FleetModel:
    name: str
    ref: str  # a file path (absolute) or pkg.module:factory
    policies: tuple[Precision, ...]


@dataclass(frozen=True)
class Fleet:
    name: str
    models: tuple[FleetModel, ...]
    budget: int = 16
    time_cap_s: float = 6 * 3600.0
    threshold: float = DEFAULT_THRESHOLD
    webhook: str = ""
    register: bool = False
    explore: str = "on-change"
    path: str = ""

    def jobs(self) -> list[tuple[FleetModel, Precision]]:
        """(model, policy) pairs in the order they run: by policy first, so that patterns the models share under
        one policy are tuned once and served to the others from tonight's rows."""
        pairs = [(m, p) for m in self.models for p in m.policies]
        order = {p: i for i, p in enumerate(dict.fromkeys(p for _, p in pairs))}
        return sorted(pairs, key=lambda mp: order[mp[1]])


def _policy(value: Any, where: str) -> Precision:
    try:
        return Precision(str(value).lower())
    except ValueError:
        raise ConfigError(f"{where}: unknown policy {value!r} (one of {', '.join(p.value for p in Precision)})"
                          ) from None


def load_fleet(path: str | os.PathLike) -> Fleet:
    """Read and check a fleet file; every mistake is one ConfigError line naming the file and the field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such fleet file")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise ConfigError(f"{path}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_TOP))})")
    default_policies = tuple(_policy(x, f"{path}: policies") for x in data.get("policies", ["fp32"]))
    models = []
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: no [[models]] entries")
    for i, m in enumerate(entries):
        where = f"{path}: models[{i}]"
        if not isinstance(m, dict) or "ref" not in m:
            raise ConfigError(f"{where}: needs ref = a model file or pkg.module:factory")
        bad = sorted(set(m) - _MODEL)
        if bad:
            raise ConfigError(f"{where}: unknown field {bad[0]!r} (fields: {', '.join(sorted(_MODEL))})")
        ref = str(m["ref"])
        if ref.endswith(".py") or os.sep in ref:
            ref = str((p.parent / ref).resolve())
            if not Path(ref).is_file():
                raise ConfigError(f"{where}: model file {m['ref']!r} not found (relative to the fleet file)")
        pols = tuple(_policy(x, where) for x in m.get("policies", ())) or default_policies
        models.append(FleetModel(str(m.get("name") or m["ref"]), ref, pols))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: model names must differ (give each entry a name)")
    try:
        fleet = Fleet(name=str(data.get("name") or p.stem), models=tuple(models), budget=int(data.get("budget", 16)),
                      time_cap_s=float(data.get("time_cap_s", 6 * 3600)),
                      threshold=float(data.get("threshold", DEFAULT_THRESHOLD)), webhook=str(data.get("webhook", "")),
                      register=bool(data.get("register", False)), explore=str(data.get("explore", "on-change")),
                      path=str(p.resolve()))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if fleet.explore not in EXPLORE:
        raise ConfigError(f"{path}: explore must be one of {', '.join(EXPLORE)}, got {fleet.explore!r}")
    if fleet.budget < 1 or fleet.time_cap_s <= 0 or fleet.threshold < 0:
        raise ConfigError(f"{path}: budget and time_cap_s must be positive, threshold not negative")
    return fleet


# --------------------------------------------------------------------------------------------- the night


class _Collector:
    """A farm listener that keeps what the night's judgement needs: each pattern's match, trials and winner."""

    def __init__(self) -> None:
        self.matches: dict[str, Any] = {}
        self.finished: dict[str, PatternFinished] = {}
        self.gpu = ""

    def on_event(self, ev: Any) -> None:
        if isinstance(ev, RunStarted):
            self.gpu = ev.gpu
        elif isinstance(ev, PatternStarted):
            self.matches.setdefault(ev.match.key, ev.match)
        elif isinstance(ev, PatternFinished):
            self.finished[ev.match_key] = ev


def _judge_run(summary: Any, col: _Collector, table: Any, night_start: datetime, threshold: float,
               shared: dict[tuple, KeyVerdict]) -> tuple[tuple[KeyVerdict, ...], tuple[str, ...]]:
    """Tonight's verdict for every pattern the run tuned (and the shared verdict for those served from tonight's
    rows); the demotion and invalidation rows are committed here."""
    from fact_ray.nightly import judge, previous_winner, verdict_rows
    from fact_ray.pattern_table import RowContext, TableKey

    verdicts: list[KeyVerdict] = []
    notes: list[str] = []
    ctx = RowContext(toolchain=summary.toolchain, run_id=summary.run_id, gpu_name=summary.gpu or None)
    for p in summary.patterns:
        if p.same_as:
            continue
        skey = (p.match_key, summary.policy.value, summary.arch.value)
        ev = col.finished.get(p.match_key)
        if ev is not None and ev.from_table and skey in shared:
            verdicts.append(shared[skey])  # tuned tonight for an earlier model of the fleet
            continue
        if ev is None or ev.winner is None or ev.from_table:
            notes.append(f"#{p.index} {p.rule}: not measured tonight ({p.reason or p.status})")
            continue
        key = TableKey.of(p.match_key, summary.policy, summary.arch, summary.toolchain)
        prev = previous_winner(table.history(key), night_start)
        drift = tuple(p.reason.removeprefix("re-verified: ").split("; ")) if p.reason.startswith("re-verified") else ()
        verdict, extra = judge(prev, ev.trials, ev.winner.trial, match_key=p.match_key, rule=p.rule, shapes=p.shapes,
                               gpu_name=summary.gpu or None, threshold=threshold, drift=drift)
        if extra:
            table.commit(verdict_rows(extra, prev, col.matches[p.match_key], ctx))
        shared[skey] = verdict
        verdicts.append(verdict)
    return tuple(verdicts), tuple(notes)


def _phase(ref: str, settings: Settings, opts: "NightOptions", table: Any, night_start: datetime, threshold: float,
           shared: dict, **how: Any) -> tuple[Any, tuple[KeyVerdict, ...], tuple[str, ...]]:
    """One farm run of the night (`how`: farm.run's night arguments), judged."""
    from fact_ray import farm

    col = _Collector()
    summary = farm.run(ref, settings, [col, *opts.listeners], retune=True, track=opts.track, **how)
    verdicts, notes = _judge_run(summary, col, table, night_start, threshold, shared)
    return summary, verdicts, (*summary.notes, *notes)


@dataclass
class NightOptions:
    out_dir: str = ""  # where the report files go ("" -> <home>/nights/<fleet>/<night>)
    listeners: Iterable[Any] = ()
    track: bool = True
    say: Callable[[str], None] = field(default=lambda line: None)


def retune(fleet: Fleet, settings: Settings, opts: NightOptions | None = None) -> NightReport:
    """Re-tune the whole fleet tonight and judge it; returns the night's report (files written by `report_html`)."""
    from fact_ray.actors import cluster
    from fact_ray.pattern_table import PatternTable

    opts = opts or NightOptions()
    t0 = time.monotonic()
    night_start = datetime.now(timezone.utc)
    table = PatternTable(settings.resolved_table_uri)
    table.check_writable()
    if opts.track:
        from fact_ray.tracking import check_reachable

        check_reachable(settings.resolved_tracking_uri)
    base = replace(settings, budget=fleet.budget)
    conn = cluster.connect(settings.ray_address)  # one Ray for every model of the night
    shared: dict[tuple, KeyVerdict] = {}
    done: set[tuple[str, str]] = set()  # (key, policy) decided tonight: a second model sharing one is served
    models: list[ModelNight] = []
    gpus = 0
    try:
        gpus = cluster.gpu_count()
        run_settings = replace(base, ray_address="")  # the connection above is reused by every run
        for fm, policy in fleet.jobs():
            label = f"{fm.name} {policy.value}"
            if time.monotonic() - t0 > fleet.time_cap_s:
                models.append(ModelNight(fm.name, policy.value, "", "", (), failed="not run: the time cap was reached"))
                continue
            opts.say(f"{label}: re-measuring the incumbents")
            m0 = time.monotonic()
            try:
                first = fleet.explore == "on-change"
                summary, verdicts, notes = _phase(fm.ref, replace(run_settings, policy=policy), opts, table,
                                                  night_start, fleet.threshold, shared, fresh_since=night_start,
                                                  only_incumbent=first)
                again = frozenset(v.match_key for v in verdicts if (v.regressed or v.invalidated or v.changed)
                                  and (v.match_key, policy.value) not in done)
                if first and again:
                    opts.say(f"{label}: new candidates for {len(again)} patterns")
                    summary, later, notes2 = _phase(fm.ref, replace(run_settings, policy=policy), opts, table,
                                                    night_start, fleet.threshold, shared, retune_keys=again)
                    by_key = {v.match_key: v for v in later}
                    verdicts = tuple(by_key.get(v.match_key, v) for v in verdicts)
                    notes = (*notes, *(n for n in notes2 if n not in notes))
                done |= {(v.match_key, policy.value) for v in verdicts}
            except Exception as e:  # noqa: BLE001 -- one model failing must not stop the fleet: recorded, alerted
                from fact_ray.errors import UserError, first_line

                line = first_line(e, 500, named=not isinstance(e, UserError))  # a bug names its type
                models.append(ModelNight(fm.name, policy.value, "", "", (), seconds=time.monotonic() - m0,
                                         failed=line))
                opts.say(f"{label}: FAILED: {line}")
                continue
            models.append(ModelNight(fm.name, policy.value, summary.arch.value, summary.gpu, verdicts,
                                     seconds=time.monotonic() - m0, notes=notes, run_id=summary.run_id,
                                     mlflow_run_id=summary.mlflow_run_id))
    finally:
        cluster.disconnect(conn)
    notes = () if gpus else ("no GPU in the cluster: captured, discovered, planned and compiled; nothing was "
                             "measured, so no winner was re-verified",)
    return NightReport(fleet=fleet.name, night=f"{night_start:%Y-%m-%d}", started=night_start.isoformat(
        timespec="seconds"), seconds=time.monotonic() - t0, gpus=gpus, threshold=fleet.threshold,
        models=tuple(models), notes=notes)


def with_notes(report: NightReport, notes: Iterable[str]) -> NightReport:
    return replace(report, notes=(*report.notes, *notes))


def publish(fleet: Fleet, settings: Settings, report: NightReport, out_dir: str | os.PathLike) -> list[str]:
    """After the night: each model's winners composed (checked end to end on this host's GPU), logged to its run and
    registered; the `production` alias moved only when the whole night was clean. Returns what happened, per model.
    Needs a GPU (an unchecked composition is never saved): without one it says so and registers nothing."""
    from fact_ray import night_tracking as nt
    from fact_ray.artifact import compose_from_table

    if not report.gpus:
        return ["not registered: no GPU to check the compositions on"]
    refs = {fm.name: fm.ref for fm in fleet.models}
    out = []
    for m in report.models:
        if m.failed or not m.mlflow_run_id:
            continue
        name = nt.registered_name(fleet.name, m.model, m.policy)
        path = compose_from_table(refs[m.model], replace(settings, policy=Precision(m.policy)),
                                  Path(out_dir) / "composed" / f"{m.model}-{m.policy}")
        version = nt.register(settings.resolved_tracking_uri, m.mlflow_run_id, str(path), name)
        moved = nt.promote(settings.resolved_tracking_uri, name, version, report)
        out.append(f"{name} version {version}: " + (f"{nt.ALIAS} moved to it" if moved else
                                                     f"{nt.ALIAS} not moved (the night was not clean)"))
    return out
