"""GPU trial workers: one killable Ray actor per GPU, and the driver-side pool that keeps them honest.

A worker runs one trial at a time: the trial function it was built with, on the arguments of one call. What a
trial costs when it goes wrong is bounded here, not in the trial function:

* hangs: the driver waits at most `timeout_s` for it (`ray.wait`), then kills the worker process
  (`ray.kill(no_restart=False)`): the trial is recorded as "timeout" and Ray restarts the actor;
* crashes (segfault, `os._exit`, illegal instruction): the actor dies, the in-flight call fails with a
  `RayActorError`: the trial is recorded as "crashed", and Ray restarts the actor (`max_restarts=-1`);
* raises: a `CandidateError` is that candidate's verdict (wrong, cannot_implement, ...): recorded with its status,
  the worker stays. Any other exception leaves the process in an unknown state (a sticky CUDA error poisons every
  later launch in the same context), so it is recorded ("crashed" for a CUDA error, else "failed") and the
  worker is restarted before it runs another trial. A result with a true `restart_worker` attribute (a kernel
  faulted, and the trial function caught it) gets the same restart.

A restarted worker is pinged before it gets the next trial, so its start-up (torch import, CUDA context) never
eats into a trial's time limit. `max_task_retries=0`: a trial is never silently run twice.

The worker takes its trial function as a constructor argument (it is re-run by every restart), so the same pool
runs the real GPU trials (`fact_ray.actors.gpu_trial.run_trial`) and, in tests, functions that hang, exit or
raise on a machine without a GPU (`num_gpus=0`).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray

from fact_ray.errors import CandidateError, first_line
from fact_ray.toolchain import Host, detect
from fact_ray.types import TrialStatus


@dataclass(frozen=True)
class WorkerContext:
    """What a trial function may use on its worker: a private scratch folder (libraries are written there) and
    the device to run on."""

    workdir: str
    device: str  # "cuda" when the worker holds a GPU, else "cpu"


@dataclass(frozen=True)
class WorkerInfo:
    node_id: str
    host: str
    pid: int
    device: str
    toolchain: Host = Host()  # what the worker's node runs kernels with (no nvcc asked); empty on a CPU worker

    @property
    def gpu_name(self) -> str:
        return self.toolchain.gpu_name  # "" without a GPU


@dataclass(frozen=True)
class CallResult:
    """What a worker sends back for one call (a crash or a timeout sends nothing: the driver records those)."""

    ok: bool
    value: Any = None
    status: str = ""  # when not ok: a Trial status ("wrong", "cannot_implement", "crashed", "failed", ...)
    error: str = ""  # one line
    detail: str = ""  # traceback of an unexpected exception (a bug, or a CUDA fault)
    restart: bool = False  # the worker's state is suspect: restart it before the next trial
    seconds: float = 0.0


def _is_cuda_error(e: BaseException) -> bool:
    # torch raises torch.AcceleratorError (2.8+) or a RuntimeError whose text starts with "CUDA error".
    return type(e).__name__ == "AcceleratorError" or "CUDA error" in str(e) or "cudaError" in str(e)


@ray.remote(num_gpus=1, max_restarts=-1, max_task_retries=0)
class TrialWorker:
    """One trial at a time on one GPU. `TrialWorker.options(num_gpus=0)` is the CPU variant tests use."""

    def __init__(self, trial_fn: Callable[..., Any]) -> None:
        self._fn = trial_fn
        self._device = "cuda" if ray.get_gpu_ids() else "cpu"
        # One folder per actor, emptied by every (re)start: a restarted worker never trusts files that the
        # process before it may have half written, and a killed worker's files do not pile up.
        actor = ray.get_runtime_context().get_actor_id() or "local"
        self._workdir = os.path.join(tempfile.gettempdir(), "fact-ray-trials", actor)
        shutil.rmtree(self._workdir, ignore_errors=True)
        os.makedirs(self._workdir)
        self._ctx = WorkerContext(self._workdir, self._device)

    def info(self) -> WorkerInfo:
        # Only GPU workers pay for asking (torch's import, nvidia-smi); a trial needs no nvcc, so none is asked.
        facts = detect(nvcc=None) if self._device == "cuda" else Host()
        return WorkerInfo(ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid(),
                          self._device, facts)

    def run(self, *args: Any) -> CallResult:
        t0 = time.perf_counter()
        try:
            value = self._fn(self._ctx, *args)
        except CandidateError as e:
            return CallResult(False, status=e.status, error=first_line(e), seconds=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - anything else is recorded, and the process is not trusted again
            cuda = _is_cuda_error(e)
            return CallResult(False, status=TrialStatus.CRASHED if cuda else TrialStatus.FAILED, error=first_line(e),
                              detail=traceback.format_exc(), restart=True, seconds=time.perf_counter() - t0)
        # A function that returned but knows its process is suspect (a kernel faulted and the CUDA context may be
        # poisoned) says so on its result; the worker is then replaced before its next trial.
        return CallResult(True, value=value, restart=bool(getattr(value, "restart_worker", False)),
                          seconds=time.perf_counter() - t0)

    def close(self) -> None:
        shutil.rmtree(self._workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- the pool


@dataclass(frozen=True)
class TrialOutcome:
    """One call's fate as the driver saw it. status: "done" (the function returned: see value) or a Trial status
    for a call that did not (timeout, crashed, failed, or a CandidateError's status)."""

    index: int  # position of the call in the submitted sequence
    status: str
    value: Any = None
    error: str = ""
    detail: str = ""
    seconds: float = 0.0
    worker: int = -1  # slot that ran it
    host: str = ""

    @property
    def done(self) -> bool:
        return self.status == "done"


class PoolBroken(RuntimeError):
    """No worker of the pool could be (re)started within the start-up time limit."""


@dataclass
class _Slot:
    index: int
    handle: Any
    info: WorkerInfo | None = None
    busy: Any = None  # ObjectRef of the call in flight
    job: int = -1
    started: float = 0.0
    pinging: Any = None  # ObjectRef of an info() call while (re)starting
    ping_since: float = 0.0
    restarts: int = 0
    dead: bool = False
    old_pid: int = 0  # pid of the process being replaced: a ping it answers does not count
    why: str = ""  # why the slot is dead


class TrialPool:
    """`n` trial workers and a queue. `run(calls)` runs each call (a tuple of arguments for the trial function;
    ObjectRefs among them are resolved by Ray on the worker's node) on the first free worker, enforcing the time
    limit, and reports each outcome through `on_outcome` as it arrives (on the calling thread)."""

    def __init__(self, trial_fn: Callable[..., Any], n: int, *, timeout_s: float, num_gpus: float = 1,
                 start_timeout_s: float = 300.0, max_restarts_per_worker: int = 50) -> None:
        if n < 1:
            raise ValueError("a trial pool needs at least one worker")
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts_per_worker
        cls = TrialWorker.options(num_gpus=num_gpus)
        self._slots = [_Slot(i, cls.remote(trial_fn)) for i in range(n)]
        now = time.monotonic()
        for s in self._slots:
            s.pinging, s.ping_since = s.handle.info.remote(), now

    # ------------------------------------------------------------------ start-up

    def infos(self) -> list[WorkerInfo]:
        """Wait until every worker answers (bounded by start_timeout_s) and return what they report."""
        while any(s.pinging is not None for s in self._slots if not s.dead):
            self._poll(timeout=1.0, submit=False)
        live = [s.info for s in self._slots if not s.dead and s.info is not None]
        if not live:
            raise PoolBroken(self._slots[0].why or "no trial worker started")
        return live

    # ------------------------------------------------------------------ running

    def run(self, calls: Sequence[tuple], on_outcome: Callable[[TrialOutcome], None] | None = None
            ) -> list[TrialOutcome]:
        self._queue: deque[int] = deque(range(len(calls)))
        self._calls = calls
        self._out: dict[int, TrialOutcome] = {}
        self._on_outcome = on_outcome
        while len(self._out) < len(calls):
            if all(s.dead for s in self._slots):
                # Nothing can run what is left: each remaining call is accounted for, not dropped.
                why = self._slots[0].why or "all failed to restart"
                for i in list(self._queue):
                    self._finish(TrialOutcome(i, TrialStatus.CRASHED, error=f"no trial worker left ({why})"))
                self._queue.clear()
                break
            self._poll(timeout=None, submit=True)
        return [self._out[i] for i in range(len(calls))]

    def _finish(self, outcome: TrialOutcome) -> None:
        self._out[outcome.index] = outcome
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def _submit_free(self) -> None:
        for s in self._slots:
            if s.dead or s.busy is not None or s.pinging is not None or not self._queue:
                continue
            i = self._queue.popleft()
            s.job, s.started = i, time.monotonic()
            s.busy = s.handle.run.remote(*self._calls[i])

    def _restart(self, s: _Slot, kill: bool) -> None:
        """Replace the worker process behind slot `s` (same actor handle: Ray restarts it) and ping it."""
        s.restarts += 1
        s.old_pid = s.info.pid if s.info else 0
        if kill:
            ray.kill(s.handle, no_restart=False)
        if s.restarts > self.max_restarts:
            s.dead, s.why = True, f"restarted {self.max_restarts} times"
            return
        s.pinging, s.ping_since = s.handle.info.remote(), time.monotonic()

    def _next_deadline(self) -> float | None:
        ds = []
        for s in self._slots:
            if s.busy is not None:
                ds.append(s.started + self.timeout_s)
            if s.pinging is not None:
                ds.append(s.ping_since + self.start_timeout_s)
        return min(ds) if ds else None

    def _poll(self, timeout: float | None, submit: bool) -> None:
        if submit:
            self._submit_free()
        refs = {}
        for s in self._slots:
            if s.busy is not None:
                refs[s.busy] = ("run", s)
            if s.pinging is not None:
                refs[s.pinging] = ("ping", s)
        if not refs:
            return
        deadline = self._next_deadline()
        wait = max(0.0, deadline - time.monotonic()) if deadline is not None else None
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=wait)
        for ref in ready:
            kind, s = refs[ref]
            if kind == "ping":
                self._pinged(s, ref)
            else:
                self._returned(s, ref)
        self._expire()

    def _pinged(self, s: _Slot, ref: Any) -> None:
        try:
            info: WorkerInfo = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            if getattr(e, "actor_init_failed", False):
                # The constructor itself fails (e.g. the trial function cannot be unpickled there): every
                # restart would fail the same way, so this slot is done.
                s.pinging, s.dead, s.why = None, True, f"trial worker cannot start: {_short(e)}"
                return
            # The old process died under the ping, or the new one died starting (e.g. its node went away):
            # Ray restarts it; ask again, within the same start-up time limit.
            s.pinging = s.handle.info.remote()
            return
        if info.pid == s.old_pid:
            # ray.kill is asynchronous: the process being replaced can still answer. Ask again shortly.
            time.sleep(0.05)
            s.pinging = s.handle.info.remote()
            return
        s.pinging, s.info = None, info

    def _returned(self, s: _Slot, ref: Any) -> None:
        i, elapsed = s.job, time.monotonic() - s.started
        s.busy, s.job = None, -1
        host = s.info.host if s.info else ""
        try:
            r: CallResult = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._finish(TrialOutcome(i, TrialStatus.CRASHED, error=f"worker died during the trial ({_short(e)})",
                                      seconds=elapsed, worker=s.index, host=host))
            self._restart(s, kill=False)
            return
        if r.ok:
            self._finish(TrialOutcome(i, "done", value=r.value, seconds=r.seconds, worker=s.index, host=host))
        else:
            self._finish(TrialOutcome(i, r.status, error=r.error, detail=r.detail, seconds=r.seconds,
                                      worker=s.index, host=host))
        if r.restart:
            self._restart(s, kill=True)

    def _expire(self) -> None:
        now = time.monotonic()
        for s in self._slots:
            if s.busy is not None and now - s.started >= self.timeout_s:
                i = s.job
                s.busy, s.job = None, -1
                self._finish(TrialOutcome(i, TrialStatus.TIMEOUT, error=f"no result within {self.timeout_s:g} s; worker killed",
                                          seconds=now - s.started, worker=s.index,
                                          host=s.info.host if s.info else ""))
                self._restart(s, kill=True)
            elif s.pinging is not None and now - s.ping_since >= self.start_timeout_s:
                s.pinging, s.dead = None, True
                s.why = f"trial worker did not start within {self.start_timeout_s:g} s"

    # ------------------------------------------------------------------ end

    def close(self) -> None:
        # Let live workers remove their scratch folders, briefly; then end them all for good.
        pending = [s.handle.close.remote() for s in self._slots if not s.dead and s.busy is None]
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=5.0)
        for s in self._slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone: nothing to release
                pass

    def __enter__(self) -> "TrialPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _short(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
