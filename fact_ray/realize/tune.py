"""`fact-ray tune`: one match realized on the local GPU through the one pipeline (realize/pipeline.py) with the
in-process executor, and the trials table a person reads. The GEMM trial itself is realize/gemm_trial.py (its
names are re-exported here for the scripts that import them from this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from rich.table import Table

from fact_ray.config import Settings
from fact_ray.errors import CannotImplement, NotAvailable
from fact_ray.realize.gemm_trial import (  # noqa: F401 - re-exported
    Choice, Progress, TuneProgress, context_alive, one_line, tune_problem)
from fact_ray.realize.pipeline import Hooks
from fact_ray.realize.select import TORCH
from fact_ray.toolchain import target_arch
from fact_ray.types import Arch, Match, TimeStats, Trial, TrialStatus, Winner, Precision


@dataclass(frozen=True)
class TuneResult:
    match: Match
    problem: Any  # the family's problem: GemmProblem, AttentionProblem, NormProblem, ...
    winner: Winner
    trials: tuple[Trial, ...]
    gpu: str
    configs: int
    libraries: int
    libraries_ok: int
    compile_seconds: float  # summed over libraries (cached ones count their original build time)


# --------------------------------------------------------------------------------------------- the stage


def local_arch(device: torch.device, wanted: Optional[Arch]) -> Arch:
    """The architecture to build for on this GPU, checked against a requested one."""
    return target_arch(wanted, tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device))


def tune_match(match: Match, settings: Settings, *, progress: Optional[Progress] = None) -> TuneResult:
    """Realize one match on the local GPU through the one pipeline (realize/pipeline.py) with the in-process
    executor: plan (problem -> candidates within the budget -> units) -> build -> one trial per candidate ->
    winner. The farm runs the very same plan with its Ray executor.

    Raises NotAvailable (one line) without a GPU, for a GPU that is not a target, and for a match that no kernel
    family realizes.
    """
    from fact_ray.realize import pipeline

    if not torch.cuda.is_available():
        raise NotAvailable("no CUDA GPU: tune verifies and times kernels on a local GPU, and torch sees none")
    report = progress or (lambda _ev: None)
    device = torch.device("cuda", torch.cuda.current_device())
    arch = local_arch(device, settings.arch)
    policy = Precision(settings.policy)
    try:
        plan = pipeline.plan(match, policy, arch, settings.budget)
    except CannotImplement as e:
        raise NotAvailable(f"cannot tune {match.rule}: {e}") from None
    n_cfg, n_src = len(plan.configs), len(plan.sources)
    report(TuneProgress("space", n_cfg, n_cfg, f"{n_cfg} {plan.family} candidates for {arch.value}"))
    report(TuneProgress("compile", 0, n_src, f"{n_src} translation units"))
    executor = pipeline.LocalExecutor(settings.resolved_cache_dir, jobs=settings.jobs or 0, nvcc=settings.nvcc,
                                      device=device)
    search = pipeline.Search(halving=settings.search == "halving", budget_s=settings.budget_s, chunk=1)
    (run,) = pipeline.realize([plan], executor, policy, arch, _ProgressHooks(report, n_src, n_cfg), search=search)
    libraries = [b.library for b in run.built]
    trials = tuple(run.all_trials)
    return TuneResult(match=match, problem=plan.problem, winner=run.winner, trials=trials,
                      gpu=torch.cuda.get_device_name(device), configs=n_cfg, libraries=len(libraries),
                      libraries_ok=sum(lib.ok for lib in libraries),
                      compile_seconds=sum(lib.seconds for lib in libraries))


class _ProgressHooks(Hooks):
    """The pipeline's reports as TuneProgress lines (the hooks it does not report keep Hooks' no-op: `fact-ray tune`
    on a GPU died on `build_done` when the pipeline grew that hook and this class did not)."""

    def __init__(self, report: Progress, n_sources: int, n_configs: int) -> None:
        self.report, self.n_sources, self.n_configs = report, n_sources, n_configs

    def compiled(self, run: Any, built: Any) -> None:
        ok = sum(b.ok for b in run.built)
        self.report(TuneProgress("compile", len(run.built), self.n_sources, f"{ok} built"))

    def trial(self, run: Any, trial: Trial, slot: int = -1, host: str = "") -> None:
        if trial.candidate_name != TORCH:
            self.report(TuneProgress("verify", len(run.trials), self.n_configs,
                                     f"{trial.candidate_name}: {trial.status.value}"))

    def finished(self, run: Any) -> None:
        self.report(TuneProgress("done", self.n_configs, self.n_configs, f"best: {run.winner.trial.candidate_name}"))


# --------------------------------------------------------------------------------------------- reporting


def _fmt_time(t: Optional[TimeStats]) -> str:
    if t is None:
        return "-"
    return f"{t.median_ms:.4g} ({t.p10_ms:.3g}-{t.p90_ms:.3g})"


def format_trials(trials: Sequence[Trial], chosen: str = "", title: str = "") -> Table:
    """A table a person can read: config, status, error, time (median and p10-p90), TFLOP/s, speedup."""
    table = Table(title=title or None)
    for col, kw in (("config", {"overflow": "fold"}), ("status", {}), ("error", {"overflow": "fold"}),
                    ("time ms", {"justify": "right"}), ("TFLOP/s", {"justify": "right"}),
                    ("speedup", {"justify": "right"}), ("rel err", {"justify": "right"})):
        table.add_column(col, **kw)
    style = {TrialStatus.OK: "green", TrialStatus.SLOWER: "yellow", TrialStatus.CANNOT_IMPLEMENT: "dim"}  # else red
    for t in trials:
        mark = " *" if chosen and t.candidate_name == chosen else ""
        sp = t.speedup
        table.add_row(t.candidate_name + mark, f"[{style.get(t.status, 'red')}]{t.status.value}[/]", t.error or "", _fmt_time(t.time), f"{t.tflops:.1f}" if t.tflops else "-",
                      f"{sp:.2f}x" if sp == sp else "-", f"{t.rel_err:.1e}" if t.rel_err == t.rel_err else "-")
    return table
