"""The one realization pipeline: plan -> build -> trial -> select, for any kernel family, run by an executor.

    plan     match -> its family's problem -> candidates (within the budget) -> translation units (pure, no GPU)
    build    every unit of every plan once (a unit shared by plans compiles once)
    trial    one call per candidate: the family's trial, the config against the model's own op, on a GPU
    select   the fastest verified candidate, or the PyTorch op

Two executors run the build and trial steps: `LocalExecutor` in this process (nvcc threads, trials on the local
GPU: `fact-ray tune` and tests) and the farm's Ray executor (`fact_ray.actors.executor.RayExecutor`: compile
tasks, GPU trial workers with time limits). Both see the same plans, build the same units and run one trial per
candidate, so the same pattern and budget give the same candidates and, timing noise aside, the same winner.

What happens along the way is reported to `Hooks` (the farm turns it into events and table commits; `tune` into
progress lines). Without a GPU (`executor.can_trial` False) the pipeline stops after the build.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Protocol, Sequence

from fact_ray.errors import CannotImplement
from fact_ray.realize import family as registry
from fact_ray.realize import halving as halving_rules
from fact_ray.types import Arch, Library, Match, Precision, Source, Trial, TrialStatus, Winner


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """What one pattern will try: its family, problem, candidates (in trial order) and the units holding them."""

    match: Match
    family: str
    problem: Any
    configs: tuple[Any, ...]
    sources: tuple[Source, ...]

    def only(self, config_name: str) -> "Plan":
        """This plan narrowed to one of its candidates (a winner re-verified on a changed host)."""
        configs = tuple(c for c in self.configs if c.name == config_name)
        return replace(self, configs=configs,
                       sources=tuple(s for s in self.sources if any(c.name == config_name for c in s.configs)))

    def source_of(self, config_name: str) -> Source:
        for src in self.sources:
            if any(c.name == config_name for c in src.configs):
                return src
        raise KeyError(config_name)


def plan(match: Match, policy: Precision | str, arch: Arch | str, budget: int, hinted: Sequence[str] = (),
         banned: frozenset[str] = frozenset(), ranker: Any = None) -> Plan:
    """Plan one match: at most `budget` candidates, `hinted` names first, never one of `banned` (kernels the table
    invalidated). `ranker` orders the space of a family that takes one (`takes_ranker`: the GEMM family; see
    search_spaces.rankers). CannotImplement (one line, the reason the PyTorch op stays) when no family realizes
    it, its family refuses its parameters, or no candidate fits."""
    policy, arch = Precision(policy), Arch(arch)
    fam = registry.for_match(match)
    if fam is None:
        raise CannotImplement(f"{match.family}: no kernel family yet")
    problem = fam.problem(match, policy)
    hinted = tuple(n for n in dict.fromkeys(hinted) if n not in banned)
    # Ask for as many more as could be banned, so that the budget is filled with candidates that may run.
    extra = {"ranker": ranker} if ranker is not None and getattr(fam, "takes_ranker", False) else {}
    configs = tuple(c for c in fam.candidates(problem, policy, arch, budget + len(banned), hinted, **extra)
                    if c.name not in banned)[:budget]
    if not configs:
        raise CannotImplement("no configuration of the search space fits")
    return Plan(match=match, family=fam.name, problem=problem, configs=configs,
                sources=tuple(fam.sources(configs, arch)))


# --------------------------------------------------------------------------------------------- executors


@dataclass(frozen=True)
class Built:
    """One unit after the build step. `handle` is the executor's own record (the farm's CompileOutcome)."""

    source: Source
    library: Library
    lost: bool = False  # could not be built at all (a lost compile task), as opposed to a compile error
    handle: Any = None

    @property
    def ok(self) -> bool:
        return self.library.ok


@dataclass(frozen=True)
class TrialCall:
    plan: Plan
    config: Any
    built: Built
    screen: bool = False  # a screening trial (successive halving's cheap first rung), not the full one

    def family(self) -> Any:
        """The family object the executor runs this call's trial with (its screening form for a screen)."""
        fam = registry.by_name(self.plan.family)
        return Screening(fam) if self.screen else fam


class Screening:
    """A family whose `trial` is its `screen`: one verification seed and few timed rounds. It travels to the GPU
    workers in place of the family (executors run `family.trial`), so workers need no second entry point."""

    def __init__(self, family: Any) -> None:
        self.family = family
        self.name = family.name

    def trial(self, problem: Any, config: Any, library: Library, policy: Precision, device: Any) -> tuple:
        return self.family.screen(problem, config, library, policy, device)


@dataclass(frozen=True)
class Search:
    """How the trial step spends its budget. `halving`: successive halving with one screening rung (families
    that can `screen`: the GEMM family) before the full trials of the best 1/eta, or of the leader alone when it
    is clearly ahead (realize/halving.py). `budget_s` > 0: no trial starts after that many seconds of the trial
    step; candidates not started are left out (reported, never recorded as failures). Trials are then submitted
    in chunks of `chunk`, in the ranker's order, so that the budget goes to the likeliest winners."""

    halving: bool = False
    eta: int = halving_rules.ETA
    lead: float = halving_rules.LEAD
    budget_s: float = 0.0
    chunk: int = 8
    clock: Callable[[], float] = time.monotonic


@dataclass(frozen=True)
class TrialDone:
    """One call's result: the candidate's trial, and the PyTorch op's when the trial measured it."""

    index: int
    trial: Trial
    torch_trial: Optional[Trial] = None
    slot: int = -1  # the worker that ran it (one per GPU; 0 for this process's GPU); -1: none ran it
    host: str = ""  # the node of that worker


class Executor(Protocol):
    can_trial: bool  # False: no GPU to run trials on (the pipeline stops after the build)

    def build(self, sources: Sequence[Source], on_done: Callable[[Built], None]) -> list[Built]:
        """Build every source (results in input order), reporting each as it finishes."""

    def trials(self, calls: Sequence[TrialCall], policy: Precision, on_done: Callable[[TrialDone], None]) -> None:
        """Run each call's trial once, reporting each as it finishes."""


class LocalExecutor:
    """Builds with nvcc threads in this process; runs trials one at a time on `device` (None: no GPU here)."""

    def __init__(self, cache_dir: str, *, jobs: int = 0, nvcc: str = "nvcc", device: Any = None) -> None:
        self.cache_dir, self.nvcc, self.device = cache_dir, nvcc, device
        self.jobs = jobs or os.cpu_count() or 1
        self.can_trial = device is not None

    def build(self, sources: Sequence[Source], on_done: Callable[[Built], None]) -> list[Built]:
        from fact_ray.realize.build import build, resolve_nvcc

        if not sources:
            return []
        resolve_nvcc(self.nvcc)  # fail once, up front, with the one-line fix
        out: dict[int, Built] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(self.jobs, len(sources)))) as pool:
            futures = {pool.submit(build, s, self.cache_dir, self.nvcc): i for i, s in enumerate(sources)}
            for fut in as_completed(futures):
                i = futures[fut]
                out[i] = Built(sources[i], fut.result())
                on_done(out[i])
        return [out[i] for i in range(len(sources))]

    def trials(self, calls: Sequence[TrialCall], policy: Precision, on_done: Callable[[TrialDone], None]) -> None:
        from fact_ray.errors import CandidateError
        import torch

        from fact_ray.realize.gemm_trial import context_alive, one_line  # torch: this executor runs trials here

        lost = ""  # the candidate after which this process's CUDA context died: nothing can run after it
        for i, call in enumerate(calls):
            name = call.config.name
            if lost:
                on_done(TrialDone(i, Trial(name, TrialStatus.CRASHED, error=f"not run: CUDA context lost after {lost}")))
                continue
            fam = call.family()
            try:
                torch_trial, trial = fam.trial(call.plan.problem, call.config, call.built.library, policy,
                                               self.device)
            except CandidateError as e:
                torch_trial, trial = None, Trial(name, e.status, error=one_line(e))
            if trial.status == TrialStatus.CRASHED and not context_alive(torch.device(self.device)):
                lost = name
            on_done(TrialDone(i, trial, torch_trial, slot=0))


# --------------------------------------------------------------------------------------------- the run


@dataclass
class PatternRun:
    """One plan's progress through the pipeline (driver-side, mutable; the values it collects are frozen)."""

    plan: Plan
    built: list[Built] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)  # candidates, in completion order
    torch_trial: Optional[Trial] = None
    pending: int = 0
    winner: Optional[Winner] = None
    left_out: tuple[str, ...] = ()  # candidates the time budget left untried
    chosen: Optional[Built] = None  # the unit holding the winner (None: the PyTorch op stays)

    @property
    def all_trials(self) -> list[Trial]:
        return ([self.torch_trial] if self.torch_trial else []) + self.trials


class Hooks:
    """What the pipeline reports; every method may be left as is."""

    def compiled(self, run: PatternRun, built: Built) -> None:
        """A unit of this pattern finished building (a shared unit is reported to each of its patterns)."""

    def build_done(self, built: Sequence[Built]) -> None:
        """The build step is over (every unit, in plan order)."""

    def trial(self, run: PatternRun, trial: Trial, slot: int = -1, host: str = "") -> None:
        """A trial of this pattern is recorded (the PyTorch op's own first, once), with the worker (`slot`, -1:
        none) and node that ran it."""

    def finished(self, run: PatternRun) -> None:
        """Every candidate of this pattern has its trial; `run.winner` is selected."""


def realize(plans: Sequence[Plan], executor: Executor, policy: Precision | str, arch: Arch | str,
            hooks: Optional[Hooks] = None, *, min_speedup: float = 1.0,
            search: Optional[Search] = None) -> list[PatternRun]:
    """Build every plan's units once, run one trial per candidate that built (or screen them first: `search`),
    select each plan's winner."""
    policy, arch = Precision(policy), Arch(arch)
    hooks = hooks or Hooks()
    search = search or Search()
    runs = [PatternRun(p) for p in plans]
    unique: dict[str, Source] = {}
    users: dict[str, list[PatternRun]] = {}
    for r in runs:
        for src in r.plan.sources:
            unique.setdefault(src.name, src)
            users.setdefault(src.name, []).append(r)

    def compiled(b: Built) -> None:
        for r in users[b.source.name]:
            r.built.append(b)
            hooks.compiled(r, b)

    all_built = executor.build(list(unique.values()), compiled)
    hooks.build_done(all_built)
    built = {b.source.name: b for b in all_built}
    if not executor.can_trial:
        return runs

    first: list[TrialCall] = []  # screening calls, and the full calls of plans that are not screened
    owner: dict[int, PatternRun] = {}
    screened_plans: set[int] = set()
    for r in runs:
        calls = []
        for cfg in r.plan.configs:
            b = built[r.plan.source_of(cfg.name).name]
            if not b.ok:
                why = "compile task lost" if b.lost else f"its TU {b.source.name} failed to compile"
                _record(r, Trial(cfg.name, TrialStatus.COMPILE_ERROR, error=why), hooks)
                continue
            calls.append(TrialCall(r.plan, cfg, b))
        owner[id(r.plan)] = r
        if search.halving and len(calls) > 1 and hasattr(registry.by_name(r.plan.family), "screen"):
            screened_plans.add(id(r.plan))
            calls = [replace(c, screen=True) for c in calls]
        r.pending = len(calls)
        first += calls
        if not calls:
            _finish(r, built, policy, arch, hooks, min_speedup)
    deadline = search.clock() + search.budget_s if search.budget_s > 0 else None
    screened_trials: dict[int, dict[str, Trial]] = {}

    def settle(r: PatternRun) -> None:
        r.pending -= 1
        if r.pending == 0:
            _finish(r, built, policy, arch, hooks, min_speedup)

    def done(call: TrialCall, d: TrialDone) -> None:
        r = owner[id(call.plan)]
        if call.screen and d.trial.status in (TrialStatus.OK, TrialStatus.SLOWER) and d.trial.time \
                and d.trial.baseline:
            screened_trials.setdefault(id(r.plan), {})[d.trial.candidate_name] = d.trial
            return  # judged with its plan's other screens, after the rung
        if not call.screen and r.torch_trial is None and d.torch_trial is not None:
            r.torch_trial = d.torch_trial
            hooks.trial(r, d.torch_trial, d.slot, d.host)
        _record(r, d.trial, hooks, d.slot, d.host)  # a full trial, or a screen that failed (wrong, crashed: final)
        settle(r)

    left_out = _run_calls(first, executor, policy, done, search.chunk, deadline, search.clock)
    # Successive halving's cut: the best 1/eta of each screened plan (the leader alone when clearly ahead) go on
    # to the full trial; the others are recorded with their screening trial.
    second: list[TrialCall] = []
    for r in runs:
        got = screened_trials.get(id(r.plan), {})
        if id(r.plan) not in screened_plans or not got:
            continue
        keep, _ = halving_rules.keep({n: _relative(t) for n, t in got.items()},
                                     [c.name for c in r.plan.configs], search.eta, search.lead)
        r.pending += len(keep) - len(got)  # the dropped ones are settled here, the kept ones by their full trial
        for name, t in got.items():
            if name not in keep:
                _record(r, _screened_out(t, got[keep[0]]), hooks)
        second += [TrialCall(r.plan, c, built[r.plan.source_of(c.name).name]) for c in r.plan.configs
                   if c.name in keep]
        if r.pending == 0:
            _finish(r, built, policy, arch, hooks, min_speedup)
    left_out += _run_calls(second, executor, policy, done, search.chunk, deadline, search.clock)
    for r in runs:
        r.left_out = tuple(c.config.name for c in left_out if c.plan is r.plan)
    for call in left_out:
        settle(owner[id(call.plan)])  # not started: the time budget ran out
    return runs


def _run_calls(calls: Sequence[TrialCall], executor: Executor, policy: Precision,
               on_done: Callable[[TrialCall, TrialDone], None], chunk: int, deadline: Optional[float],
               clock: Callable[[], float]) -> list[TrialCall]:
    """Run `calls` (all at once, or in chunks of `chunk` until `deadline`); the calls not started come back."""
    if not calls:
        return []
    if deadline is None:
        executor.trials(calls, policy, lambda d: on_done(calls[d.index], d))
        return []
    for start in range(0, len(calls), max(1, chunk)):
        if clock() >= deadline:
            return list(calls[start:])
        part = calls[start:start + max(1, chunk)]
        executor.trials(part, policy, lambda d, part=part: on_done(part[d.index], d))
    return []


def _relative(t: Trial) -> halving_rules.Timing:
    """A screening trial's time over the PyTorch op timed beside it (drift between trials cancels out)."""
    base = t.baseline.median_ms
    return halving_rules.Timing(t.time.median_ms / base, t.time.p10_ms / base, t.time.p90_ms / base)


def _screened_out(t: Trial, leader: Trial) -> Trial:
    """The screening trial of a candidate halving dropped: verified on one seed, timed in few rounds, slower than
    the survivors; recorded as `slower` (never selected) with its screening time and why."""
    ratio = _relative(t).median / _relative(leader).median
    return replace(t, status=TrialStatus.SLOWER,
                   error=f"screened out: {ratio:.2f}x the leader's time in {t.time.reps} rounds (successive halving)")


def _record(r: PatternRun, trial: Trial, hooks: Hooks, slot: int = -1, host: str = "") -> None:
    r.trials.append(trial)
    hooks.trial(r, trial, slot, host)


def _finish(r: PatternRun, built: dict[str, Built], policy: Precision, arch: Arch, hooks: Hooks,
            min_speedup: float) -> None:
    from fact_ray.realize.select import select

    trials = r.all_trials
    chosen = select(trials, min_speedup)
    config = next((c for c in r.plan.configs if c.name == chosen.candidate_name), None)
    r.chosen = built[r.plan.source_of(config.name).name] if config is not None else None
    m = r.plan.match
    r.winner = Winner(match_key=m.key, rule=m.rule, precision=policy, arch=arch, config=config, trial=chosen,
                      library_key=r.chosen.library.key if r.chosen else "", trials=tuple(trials))
    hooks.finished(r)
