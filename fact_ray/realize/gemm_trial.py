"""The GEMM family's trial: check, verify and time compiled GEMM configs against the torch op (cuBLAS) on the local
GPU, and select. `tune_problem` is the GPU half of a GEMM trial (no Ray, no tracking): given configs and the
libraries that hold them, it produces one `Trial` per config plus the torch op's own; the GEMM family's trial
(realize/gemm_family.py) runs it on one config, in `fact-ray tune`'s process or on a farm worker.

Each config ends in exactly one status: compile_error (its library failed to build or load), cannot_implement
(operand checks or CUTLASS's can_implement refuse the real shapes), wrong (verify failed), crashed (its launch
failed or faulted), ok (verified and faster than the torch op beyond noise) or slower (verified, not faster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from fact_ray.errors import CandidateError, first_line
from fact_ray.realize import dispatch
from fact_ray.realize.bench import Timer, clearly_faster, time_interleaved
from fact_ray.realize.kernel import GemmKernel, torch_op
from fact_ray.realize.select import TORCH, select
from fact_ray.realize.verify import as_candidate, make_inputs, policy_dtype, precision_mode, verify
from fact_ray.types import GemmProblem, KernelConfig, Library, Precision, TimeStats, Trial, TrialStatus

# CUDA faults surface as torch.AcceleratorError (a RuntimeError) at the next synchronisation.
_CUDA_FAULTS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch, "AcceleratorError", None),) if isinstance(e, type))

# Aim for about this much timed work per candidate; reps stay within [MIN_REPS, MAX_REPS].
TARGET_MS_PER_CANDIDATE = 300.0
MIN_REPS, MAX_REPS, WARMUP = 10, 100, 5


@dataclass(frozen=True)
class TuneProgress:
    """A progress report: `stage` is space | compile | verify | time | done."""

    stage: str
    done: int
    total: int
    detail: str = ""


@dataclass(frozen=True)
class Choice:
    """What tune_problem selected: a verified kernel (config set) or the torch op (config None)."""

    trial: Trial
    config: Optional[KernelConfig]
    library_key: str = ""


Progress = Callable[[TuneProgress], None]
KernelFactory = Callable[[Library, KernelConfig, GemmProblem], GemmKernel]


def one_line(e: BaseException) -> str:
    return first_line(e, named=False)


def _tflops(problem: GemmProblem, t: Optional[TimeStats]) -> float:
    if t is None or not t.median_ms > 0:
        return 0.0
    return problem.flops / (t.median_ms * 1e-3) / 1e12


def context_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def _check_and_verify(cfg: KernelConfig, library: Optional[Library], problem: GemmProblem, policy: Precision,
                      device: torch.device, seeds: Sequence[int], inputs: tuple,
                      factory: KernelFactory) -> tuple[Trial, Optional[GemmKernel]]:
    if library is None:
        return Trial(cfg.name, TrialStatus.COMPILE_ERROR, error="no library holds this config"), None
    if not library.ok:
        return Trial(cfg.name, TrialStatus.COMPILE_ERROR, error=first_line(library.log)), None
    try:
        kernel = factory(library, cfg, problem)
        kernel.check(*inputs)
        res = verify(lambda a, b, bias, residual, out: kernel(a, b, bias, residual, out=out),
                     problem, policy, device, seeds)
    except CandidateError as e:
        return Trial(cfg.name, e.status, error=one_line(e)), None
    except _CUDA_FAULTS as e:
        return Trial(cfg.name, TrialStatus.CRASHED, error=one_line(e)), None
    if not res.ok:
        return Trial(cfg.name, TrialStatus.WRONG, error=res.reason, rel_err=res.rel_err, max_abs_err=res.max_abs_err), None
    return Trial(cfg.name, TrialStatus.OK, rel_err=res.rel_err, max_abs_err=res.max_abs_err), kernel


def _choose_reps(base: Callable[[], None], timer: Optional[Timer]) -> int:
    pilot = time_interleaved({TORCH: base}, warmup=2, reps=3, timer=timer)[TORCH].median_ms
    if not pilot > 0 or math.isinf(pilot):
        return MIN_REPS
    return int(min(MAX_REPS, max(MIN_REPS, round(TARGET_MS_PER_CANDIDATE / pilot))))


def tune_problem(problem: GemmProblem, configs: Sequence[KernelConfig], libraries: Sequence[Library],
                 policy: Precision, device: torch.device | str, *, timer: Optional[Timer] = None,
                 progress: Optional[Progress] = None, kernel_factory: KernelFactory = GemmKernel,
                 seeds: Sequence[int] = (0, 1, 2), reps: Optional[int] = None,
                 min_speedup: float = 1.0) -> tuple[Choice, list[Trial]]:
    """Check, verify and time every config; return the selection and all trials (the torch op's first).

    `timer` replaces CUDA-event timing (tests); `kernel_factory` builds the callable of a config (a
    `GemmKernel` unless a test plants another); `reps` overrides the timed rounds chosen from a pilot run.
    """
    policy = Precision(policy)
    device = torch.device(device)
    report = progress or (lambda _ev: None)
    lib_of = {cfg.name: lib for lib in libraries for cfg in lib.source.configs}
    base_op = torch_op(problem)
    with precision_mode(policy):
        inputs = make_inputs(problem, policy_dtype(policy), device, seeds[0] if seeds else 0)
        base_check = verify(as_candidate(base_op), problem, policy, device, seeds)
        torch_error = "" if base_check.ok else f"the PyTorch op itself misses the {policy.value} policy: " \
                                                f"{base_check.reason}"
        checked: dict[str, Trial] = {}
        kernels: dict[str, GemmKernel] = {}
        lost = ""  # name of the candidate after which the CUDA context died
        for i, cfg in enumerate(configs):
            if lost:
                checked[cfg.name] = Trial(cfg.name, TrialStatus.CRASHED, error=f"not run: CUDA context lost after {lost}")
                continue
            trial, kernel = _check_and_verify(cfg, lib_of.get(cfg.name), problem, policy, device, seeds, inputs,
                                              kernel_factory)
            checked[cfg.name] = trial
            if kernel is not None:
                kernels[cfg.name] = kernel
            if trial.status == TrialStatus.CRASHED and not context_alive(device):
                lost = cfg.name
            report(TuneProgress("verify", i + 1, len(configs), f"{cfg.name}: {trial.status.value}"))

        times: dict[str, TimeStats] = {}
        if not lost:
            times, crashed, lost = _time_all(base_op, kernels, inputs, device, timer, reps, report)
            for name, err in crashed.items():
                checked[name] = Trial(name, TrialStatus.CRASHED, error=err, rel_err=checked[name].rel_err,
                                      max_abs_err=checked[name].max_abs_err)

    base_time = times.get(TORCH)
    trials = [Trial(TORCH, TrialStatus.OK, error=torch_error, rel_err=base_check.rel_err, max_abs_err=base_check.max_abs_err,
                    time=base_time, baseline=base_time, tflops=_tflops(problem, base_time))]
    for cfg in configs:
        t = checked[cfg.name]
        if t.status == TrialStatus.OK:
            own = times.get(cfg.name)
            if own is None or base_time is None:
                t = Trial(cfg.name, TrialStatus.CRASHED, error=f"not timed: CUDA context lost after {lost}",
                          rel_err=t.rel_err, max_abs_err=t.max_abs_err)
            else:
                t = Trial(cfg.name, TrialStatus.OK if clearly_faster(own, base_time) else TrialStatus.SLOWER, rel_err=t.rel_err,
                          max_abs_err=t.max_abs_err, time=own, baseline=base_time, tflops=_tflops(problem, own))
        trials.append(t)
    chosen = select(trials, min_speedup)
    config = next((c for c in configs if c.name == chosen.candidate_name), None)
    library_key = lib_of[config.name].key if config is not None else ""
    report(TuneProgress("done", len(configs), len(configs), f"best: {chosen.candidate_name}"))
    return Choice(chosen, config, library_key), trials


def _time_all(base_op, kernels: dict[str, GemmKernel], inputs: tuple, device: torch.device,
              timer: Optional[Timer], reps: Optional[int],
              report: Progress) -> tuple[dict[str, TimeStats], dict[str, str], str]:
    """Time the torch op and every verified kernel interleaved. A kernel that fails here is dropped and the
    rest timed again; returns (times, crashed name -> error, name after which the context died or "")."""
    a, b, bias, residual = inputs
    # Timed through the call a composed module makes (the native op where the dispatcher runs here); verified
    # above through the same kernel's ctypes wrapper, which can write into a poisoned output.
    runners = {n: dispatch.composed_gemm(k, device) for n, k in kernels.items()}
    pending = dict(kernels)
    crashed: dict[str, str] = {}
    base = lambda: base_op(a, b, bias, residual)  # noqa: E731
    while True:
        failed: list[str] = []

        def guarded(name: str, k: Callable[..., Any]) -> Callable[[], None]:
            def call() -> None:
                try:
                    k(a, b, bias, residual)
                except BaseException:
                    failed.append(name)
                    raise
            return call

        fns: dict[str, Callable[[], None]] = {TORCH: base}
        fns.update({n: guarded(n, runners[n]) for n in pending})
        report(TuneProgress("time", 0, len(fns), f"{len(fns)} candidates interleaved"))
        try:
            n_reps = reps if reps is not None else _choose_reps(base, timer)
            times = time_interleaved(fns, warmup=WARMUP, reps=n_reps, timer=timer)
            report(TuneProgress("time", len(fns), len(fns), ""))
            return times, crashed, ""
        except (CandidateError, *_CUDA_FAULTS) as e:
            # An asynchronous fault may surface in a later call than the one that caused it; blame the one
            # that raised, which is the best evidence there is.
            culprit = failed[0] if failed else ""
            if not culprit:
                if isinstance(e, CandidateError) or context_alive(device):
                    raise  # not a kernel's fault we can name: a bug, let it show
                # A fault that surfaced at a synchronisation: no single kernel can be blamed, and none can
                # run again in this process.
                crashed.update({n: f"timing faulted, culprit unknown: {one_line(e)}" for n in pending})
                return {}, crashed, "a fault while timing"
            crashed[culprit] = f"while timing: {one_line(e)}"
            pending.pop(culprit, None)
            if not context_alive(device):
                return {}, crashed, culprit
