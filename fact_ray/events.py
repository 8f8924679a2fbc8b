"""Farm events and the listeners that consume them.

The farm reports what happens through these frozen events instead of printing or logging to MLflow itself;
MLflow tracking, the console progress view and tests are listeners. An event is emitted once, on the driver,
in this order for one run:

    RunStarted
      AgentReport?      (only when the LLM discovery agent was asked: --llm rank | propose)
      (PatternStarted  CompileFinished*  TrialFinished*  ArtifactProduced*  PatternFinished)*
      ArtifactProduced*
    RunFinished

Patterns may interleave (the farm tunes several at once), so every per-pattern event carries its match key.

A listener that raises must not take the run down with it, nor fail unnoticed. `Broadcaster` therefore:
  * still delivers the event to every other listener;
  * detaches the failing listener (its own state is now suspect, e.g. an MLflow run half-written), so it
    receives no further events;
  * logs one warning naming the listener, the event and the error (a traceback only for errors that are not
    `UserError`s, i.e. bugs), and records it in `Broadcaster.failures`, which the farm reports at the end;
  * with `strict=True` (tests, or a user who wants tracking to be mandatory) re-raises the first error once
    all listeners have seen the event.

Nothing here imports anything beyond fact_ray.types and fact_ray.errors.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

from fact_ray.errors import UserError
from fact_ray.types import Arch, Match, Precision, Trial, Winner, freeze

log = logging.getLogger("fact_ray.events")

Frozen = tuple[tuple[str, Any], ...]  # a mapping frozen with types.freeze


# --------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class RunStarted:
    """One `fact-ray run` begins."""

    run_id: str  # the farm's own id of this run (not MLflow's)
    model_name: str
    model_hash: str
    policy: Precision
    arch: Arch
    gpu: str  # device name, "" when the run has no GPU
    budget: int  # candidates per pattern
    versions: Frozen = ()  # freeze({"torch": ..., "cutlass": ..., "nvcc": ..., "fact_ray": ...})
    model_ref: str = ""  # the path or pkg.mod:factory the user gave
    extra: Frozen = ()  # further settings worth recording (ray address, llm mode, ...)

    @staticmethod
    def make(*, versions: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
             **fields: Any) -> "RunStarted":
        """Build from plain mappings (they are frozen here)."""
        return RunStarted(versions=freeze(versions or {}), extra=freeze(extra or {}), **fields)


@dataclass(frozen=True)
class AgentReport:
    """What the LLM discovery agent did in this run: tokens, latency, what it changed, its proposals.

    `detail_json` holds the whole record (moves, proposals with verdicts, hints, notes) as JSON text: the
    artifact agent.json. Plain values only, so listeners need nothing of the actors.
    """

    mode: str  # rank | propose
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    requests: int = 0
    moves: int = 0  # matches placed differently from the rules
    accepted: int = 0  # proposals accepted
    rejected: int = 0  # proposals rejected
    used: bool = False  # the agent's answer was used (False: the rules' ranking stands)
    notes: tuple[str, ...] = ()
    detail_json: str = "{}"

    @property
    def detail(self) -> dict[str, Any]:
        return json.loads(self.detail_json)


@dataclass(frozen=True)
class PatternStarted:
    """The farm starts tuning one match (or looking it up in the table)."""

    match: Match
    index: int  # 0-based position in the ranked list
    total: int = 0  # number of patterns this run tunes


@dataclass(frozen=True)
class CompileFinished:
    """One translation unit compiled (or failed to)."""

    match_key: str
    source_name: str
    ok: bool
    seconds: float
    n_configs: int  # configurations behind this source
    log_excerpt: str = ""  # the interesting part of the compiler output (all of it when short)
    cached: bool = False  # served from the build cache


@dataclass(frozen=True)
class TrialFinished:
    """One candidate (or the PyTorch op, candidate_name "torch") verified and timed, or the reason why not."""

    match_key: str
    trial: Trial
    step: int  # 0-based trial index within the pattern: the x axis of per-trial metrics
    gpu_slot: int = -1  # the trial worker that ran it (one per GPU of the cluster); -1: none ran it
    host: str = ""  # the node of that worker


@dataclass(frozen=True)
class PatternFinished:
    """A pattern's outcome. `winner` None: no selection could be made (e.g. no GPU); `reason` says why."""

    match_key: str
    winner: Winner | None
    trials: tuple[Trial, ...] = ()  # all trials of the pattern, the PyTorch op included
    failures: int = 0  # trials and compiles that failed
    from_table: bool = False  # the winner came from the pattern table, nothing was tuned
    sources: Frozen = ()  # freeze({source name: C++ text}) of the winner's translation unit(s)
    reason: str = ""

    @property
    def source_texts(self) -> dict[str, str]:
        return dict(self.sources)


@dataclass(frozen=True)
class ArtifactProduced:
    """A file or folder worth keeping with the run (composed module, profile, ...)."""

    path: str
    kind: str  # short word used as the artifact folder, e.g. "module", "profile"
    match_key: str = ""  # "" : belongs to the whole run; else to that pattern


@dataclass(frozen=True)
class RunFinished:
    """The run ends. status: ok | failed | interrupted."""

    status: str
    seconds: float
    rows: tuple[Frozen, ...] = ()  # the summary table, one frozen row per pattern
    report_json: str = "{}"  # the report as JSON text (exact, immutable)
    report_text: str = ""  # the report as a person reads it
    error: str = ""  # one line, when status is not ok

    STATUSES = ("ok", "failed", "interrupted")

    def __post_init__(self) -> None:
        if self.status not in self.STATUSES:
            raise ValueError(f"RunFinished.status must be one of {self.STATUSES}, got {self.status!r}")

    @staticmethod
    def make(*, rows: Iterable[Mapping[str, Any]] = (), report: Mapping[str, Any] | None = None,
             **fields: Any) -> "RunFinished":
        """Build from plain rows and a report dict."""
        report_json = json.dumps(report or {}, sort_keys=True, default=str)
        return RunFinished(rows=tuple(freeze(r) for r in rows), report_json=report_json, **fields)

    @property
    def row_dicts(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    @property
    def report(self) -> dict[str, Any]:
        return json.loads(self.report_json)


Event = (RunStarted | AgentReport | PatternStarted | CompileFinished | TrialFinished | PatternFinished
         | ArtifactProduced | RunFinished)


# --------------------------------------------------------------------------------------------- listeners


@runtime_checkable
class Listener(Protocol):
    def on_event(self, event: Event) -> None: ...


@dataclass(frozen=True)
class ListenerFailure:
    listener: str
    event: str
    error: str  # "ExceptionType: message"


class Broadcaster:
    """Forwards each event to every listener, in order. Itself a Listener, so broadcasters nest.

    Thread-safe: events from several farm threads are delivered one at a time, so listeners need no locks.
    """

    def __init__(self, listeners: Iterable[Listener] = (), *, strict: bool = False) -> None:
        self._listeners: list[Listener] = list(listeners)
        self._strict = strict
        self._failures: list[ListenerFailure] = []
        self._lock = threading.Lock()

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return tuple(self._listeners)

    @property
    def failures(self) -> tuple[ListenerFailure, ...]:
        return tuple(self._failures)

    def add(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def emit(self, event: Event) -> None:
        first: BaseException | None = None
        with self._lock:
            for listener in list(self._listeners):
                try:
                    listener.on_event(event)
                except Exception as e:  # noqa: BLE001 - the policy of this class, see the module docstring
                    self._listeners.remove(listener)
                    name = _name(listener)
                    failure = ListenerFailure(name, type(event).__name__, f"{type(e).__name__}: {e}")
                    self._failures.append(failure)
                    log.warning("listener %s failed on %s and is detached: %s", name, failure.event,
                                failure.error, exc_info=not isinstance(e, UserError))
                    first = first or e
        if first is not None and self._strict:
            raise first

    on_event = emit


def _name(listener: Any) -> str:
    return getattr(listener, "name", None) or type(listener).__name__
