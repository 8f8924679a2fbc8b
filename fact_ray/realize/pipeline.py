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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Protocol, Sequence

from fact_ray.errors import CannotImplement
from fact_ray.realize import family as registry
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
            fam = registry.by_name(call.plan.family)
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
            hooks: Optional[Hooks] = None, *, min_speedup: float = 1.0) -> list[PatternRun]:
    """Build every plan's units once, run one trial per candidate that built, select each plan's winner."""
    policy, arch = Precision(policy), Arch(arch)
    hooks = hooks or Hooks()
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

    calls: list[TrialCall] = []
    owner: list[PatternRun] = []
    for r in runs:
        for cfg in r.plan.configs:
            b = built[r.plan.source_of(cfg.name).name]
            if not b.ok:
                why = "compile task lost" if b.lost else f"its TU {b.source.name} failed to compile"
                _record(r, Trial(cfg.name, TrialStatus.COMPILE_ERROR, error=why), hooks)
                continue
            r.pending += 1
            calls.append(TrialCall(r.plan, cfg, b))
            owner.append(r)
    for r in runs:
        if r.pending == 0:
            _finish(r, built, policy, arch, hooks, min_speedup)

    def done(d: TrialDone) -> None:
        r = owner[d.index]
        if r.torch_trial is None and d.torch_trial is not None:
            r.torch_trial = d.torch_trial
            hooks.trial(r, d.torch_trial, d.slot, d.host)
        _record(r, d.trial, hooks, d.slot, d.host)
        r.pending -= 1
        if r.pending == 0:
            _finish(r, built, policy, arch, hooks, min_speedup)

    if calls:
        executor.trials(calls, policy, done)
    return runs


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
