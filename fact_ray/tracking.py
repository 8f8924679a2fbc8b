"""MLflow tracking as a listener of farm events.

Layout of one `fact-ray run` in MLflow (experiment "fact-ray" by default):

    parent run  "<model> <policy> <arch>"     tags fact_ray.kind=run, fact_ray.run_id
        params   model_name, model_hash, model_ref, policy, arch, gpu, budget, version.<name>, setting.<name>
        metrics  run_seconds, patterns
        artifacts report.json, report.txt, summary.csv, <kind>/... (ArtifactProduced)
        with the LLM agent (AgentReport): params llm.mode, llm.model; metrics llm_tokens, llm_prompt_tokens,
                 llm_completion_tokens, llm_latency_s, llm_requests, llm_moves, llm_accepted, llm_rejected;
                 artifact agent.json
      child run "<index> <rule>"               tags fact_ray.kind=pattern, fact_ray.match_key, mlflow.parentRunId
        params   rule, family, match_key, shapes, dtype, anchor, index, policy, arch, match_params, winner
        metrics  per trial step: time_ms, trial_baseline_ms, trial_speedup, best_so_far_ms, gpu_slot (the trial
                 worker, one per GPU, that ran it);
                 per compile step: compile_s;
                 final (own names, so a per-step value never shadows them): best_ms, baseline_ms, speedup,
                 trials, failures, compiles, compile_failures
        artifacts sources/<name>.cu, trials.csv, compiles.csv, compile_logs/<source>.log, winner.json

Only `MlflowClient` with explicit run ids is used: the fluent API keeps a process-global active run, which
would tangle with anything else in the process that uses MLflow.

Failure modes handled here: a fresh sqlite store is set up (schema migrations, the experiment) under a file lock
beside it, so several first runs at once do not race; a store that cannot be opened (a corrupt mlflow.db) is one
ServiceUnreachable line; every run carries the host and pid that logged it (`fact_ray.host`, `fact_ray.pid`), and
a new run first closes as KILLED the RUNNING runs of this tool whose process on this host is gone (a SIGKILLed
driver cannot close its own). URIs and settings are redacted (`fact_ray.redact`) before they are logged.

mlflow is imported lazily (it takes over a second to import), so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from fact_ray.errors import RunNotFound, ServiceUnreachable
from fact_ray.events import (
    AgentReport,
    ArtifactProduced,
    CompileFinished,
    Event,
    PatternFinished,
    PatternStarted,
    RunFinished,
    RunStarted,
    TrialFinished,
)
from fact_ray.types import Match, Trial, to_jsonable

DEFAULT_EXPERIMENT = "fact-ray"
TAG_KIND = "fact_ray.kind"
TAG_RUN_ID = "fact_ray.run_id"
TAG_MATCH_KEY = "fact_ray.match_key"
TAG_HOST = "fact_ray.host"
TAG_PID = "fact_ray.pid"

# MLflow's HTTP client retries 7 times with exponential backoff and waits 120 s per request by default: minutes
# of silence when a server dies mid-run. We shorten both unless the user chose values.
_HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

_RUN_STATUS = {"ok": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}



# --------------------------------------------------------------------------------------------- reachability


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _probe_http(uri: str, timeout_s: float) -> str:
    """"" when the server answers, else the reason it does not (one line)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return ""
    except urllib.error.HTTPError as e:
        # Any answer means a server is there (401/403: auth, 404: no /health behind a proxy), except a 5xx,
        # which a reverse proxy gives when the server behind it is down.
        return f"HTTP {e.code}" if e.code >= 500 else ""
    except urllib.error.URLError as e:
        return str(e.reason)
    except (TimeoutError, OSError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line naming the URI, when the tracking store cannot be used.

    http(s): GET <uri>/health must answer within timeout_s (one try, no retries).
    sqlite:///path and file:/plain paths: the folder is created if needed and must be writable.
    Other schemes (postgresql://, databricks, ...) are left to MLflow itself.
    """
    if _is_http(tracking_uri):
        reason = _probe_http(tracking_uri, timeout_s)
        if reason:
            raise ServiceUnreachable(f"tracking server {tracking_uri} is not reachable ({reason})")
        return
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]
        if path in ("", ":memory:"):
            return
        folder = Path(path).parent
    elif tracking_uri.startswith("file:"):
        folder = Path(tracking_uri[len("file:"):].removeprefix("//"))
    elif "://" in tracking_uri:
        return
    else:
        folder = Path(tracking_uri)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ServiceUnreachable(f"tracking store {tracking_uri}: cannot create {folder} ({e.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ServiceUnreachable(f"tracking store {tracking_uri}: {folder} is not writable")


def _client(tracking_uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    # the sqlite store announces its schema migrations at INFO on every new database: noise in a CLI
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri)


def _sqlite_path(tracking_uri: str) -> str | None:
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):]
    return None if path in ("", ":memory:") else path


def open_store(tracking_uri: str, experiment: str):
    """(client, experiment id): the store opened, its schema set up and the experiment made, under a file lock
    for sqlite (first runs at once race on the migrations otherwise). One ServiceUnreachable line when the store
    cannot be opened or set up (a corrupt database, a server error)."""
    from fact_ray.fsutil import file_lock

    db = _sqlite_path(tracking_uri)
    lock = file_lock(db + ".lock") if db else contextlib.nullcontext()
    with _store_errors(tracking_uri), lock:
        client = _client(tracking_uri)
        return client, _experiment_id(client, experiment, create=True)


@contextlib.contextmanager
def _store_errors(tracking_uri: str):
    """A store that cannot be opened or read (a corrupt database, a server error) becomes one line."""
    from fact_ray.redact import redact

    try:
        yield
    except Exception as e:  # noqa: BLE001 -- sorted here: a store problem is one line, anything else propagates
        if not _is_store_error(e):
            raise
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise ServiceUnreachable(f"tracking store {redact(tracking_uri)} cannot be opened ({redact(first)})") from e


def _is_store_error(e: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # a server-only MLflow client
        SQLAlchemyError = MlflowException  # noqa: N806
    return isinstance(e, (MlflowException, SQLAlchemyError, OSError))


def _process_alive(host: str, pid: str) -> bool:
    import socket

    if host != socket.gethostname():
        return True  # another machine's: nothing here says it is gone
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except OSError:
        return True
    return True


def sweep_stale_runs(client, exp_id: str) -> list[str]:
    """Close as KILLED this tool's RUNNING runs whose logging process on this host is gone; returns their ids."""
    runs = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    closed = []
    for r in runs:
        tags = r.data.tags
        if TAG_KIND not in tags or TAG_PID not in tags:
            continue  # not ours, or from a fact-ray that did not record its process
        if not _process_alive(tags.get(TAG_HOST, ""), tags[TAG_PID]):
            client.set_terminated(r.info.run_id, "KILLED")
            closed.append(r.info.run_id)
    return closed


def _experiment_id(client, name: str, create: bool) -> str | None:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name)
    except MlflowException:
        # Another process created it between our two calls.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------------------------- listener


@dataclass
class _Pattern:
    """What the listener keeps about one open child run."""

    run_id: str
    match: Match
    trials: list[tuple[int, Trial]] = field(default_factory=list)
    compiles: list[CompileFinished] = field(default_factory=list)
    best_ms: float = math.inf


class MlflowListener:
    """Logs one farm run to MLflow. One instance per run: events after RunFinished are an error.

    Events that break the expected order (a pattern event before RunStarted, a pattern started twice) raise
    RuntimeError: they are farm bugs, and the Broadcaster reports and detaches us.
    """

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, *, check: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        if _is_http(tracking_uri):
            for k, v in _HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        if check:
            check_reachable(tracking_uri)
        if _sqlite_path(tracking_uri):  # opened now (the farm does it in a thread), under the set-up lock
            self._client, self._experiment_id = open_store(tracking_uri, experiment)
        else:  # a server: nothing is asked of it before RunStarted
            self._client, self._experiment_id = _client(tracking_uri), ""
        self._parent: str | None = None
        self._policy_arch: dict[str, str] = {}
        self._run_tags: dict[str, str] = {}
        self._patterns: dict[str, _Pattern] = {}
        self._finished = False

    @property
    def parent_run_id(self) -> str | None:
        """MLflow's id of the parent run, once RunStarted was seen."""
        return self._parent

    # ------------------------------------------------------------------ dispatch

    def on_event(self, event: Event) -> None:
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"MlflowListener: unknown event type {type(event).__name__}")
        if self._finished:
            raise RuntimeError(f"MlflowListener: {type(event).__name__} after RunFinished")
        if not isinstance(event, RunStarted) and self._parent is None:
            raise RuntimeError(f"MlflowListener: {type(event).__name__} before RunStarted")
        try:
            handler(self, event)
        except Exception as e:
            # A server that went away mid-run is a user-side condition (one line), not a bug in this code.
            if _is_http(self.tracking_uri):
                reason = _probe_http(self.tracking_uri, 5.0)
                if reason:
                    raise ServiceUnreachable(
                        f"tracking server {self.tracking_uri} is not reachable ({reason})") from e
            raise

    # ------------------------------------------------------------------ handlers

    def _run_started(self, ev: RunStarted) -> None:
        if self._parent is not None:
            raise RuntimeError("MlflowListener: a second RunStarted; use one listener per run")
        import socket

        from fact_ray.redact import redact

        if not self._experiment_id:
            self._experiment_id = _experiment_id(self._client, self.experiment, create=True)
        exp_id = self._experiment_id
        sweep_stale_runs(self._client, exp_id)
        self._run_tags = {TAG_RUN_ID: ev.run_id, TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
        run = self._client.create_run(
            exp_id, run_name=f"{ev.model_name} {ev.policy.value} {ev.arch.value}",
            # The tag vocabulary every fact-ray run shares (night_tracking), for search_runs and the compare view.
            tags={TAG_KIND: "run", **self._run_tags, "fact_ray.model": ev.model_name,
                  "fact_ray.policy": ev.policy.value, "fact_ray.arch": ev.arch.value,
                  "fact_ray.gpu": ev.gpu or "none"})
        self._parent = run.info.run_id
        params = {
            "model_name": ev.model_name, "model_hash": ev.model_hash, "model_ref": redact(ev.model_ref),
            "policy": ev.policy.value, "arch": ev.arch.value, "gpu": ev.gpu or "none", "budget": ev.budget,
        }
        params.update({f"version.{k}": v for k, v in ev.versions})
        params.update({f"setting.{k}": redact(str(v)) for k, v in ev.extra})
        self._batch(self._parent, params=params)
        self._policy_arch = {"policy": ev.policy.value, "arch": ev.arch.value}

    def _agent_report(self, ev: AgentReport) -> None:
        assert self._parent is not None
        self._batch(self._parent, params={"llm.mode": ev.mode, "llm.model": ev.model},
                    metrics={"llm_tokens": ev.prompt_tokens + ev.completion_tokens,
                             "llm_prompt_tokens": ev.prompt_tokens, "llm_completion_tokens": ev.completion_tokens,
                             "llm_latency_s": ev.latency_s, "llm_requests": ev.requests, "llm_moves": ev.moves,
                             "llm_accepted": ev.accepted, "llm_rejected": ev.rejected},
                    tags={"fact_ray.llm_used": str(ev.used).lower()})
        from fact_ray.redact import redact_any

        self._client.log_text(self._parent, json.dumps(redact_any(ev.detail), indent=1, sort_keys=True),
                              "agent.json")

    def _pattern_started(self, ev: PatternStarted) -> None:
        m = ev.match
        if m.key in self._patterns:
            raise RuntimeError(f"MlflowListener: pattern {m.key} started twice")
        run = self._client.create_run(
            self._experiment_id,
            run_name=f"{ev.index:02d} {m.rule}",
            tags={"mlflow.parentRunId": self._parent, TAG_KIND: "pattern", TAG_MATCH_KEY: m.key,
                  **self._run_tags})
        self._patterns[m.key] = _Pattern(run.info.run_id, m)
        params = {
            "rule": m.rule, "family": m.family, "match_key": m.key, "shapes": m.shape_signature,
            "dtype": m.dtype, "anchor": m.anchor, "index": ev.index, **self._policy_arch,
            "match_params": ",".join(f"{k}={v}" for k, v in m.params),
        }
        metrics = {"est_ms": m.est_time_s * 1e3, "share": m.share, "flops": float(m.flops)}
        self._batch(run.info.run_id, params=params, metrics=metrics)

    def _compile_finished(self, ev: CompileFinished) -> None:
        p = self._pattern(ev.match_key)
        p.compiles.append(ev)
        self._batch(p.run_id, metrics={"compile_s": ev.seconds}, step=len(p.compiles) - 1)

    def _trial_finished(self, ev: TrialFinished) -> None:
        p = self._pattern(ev.match_key)
        t = ev.trial
        p.trials.append((ev.step, t))
        metrics: dict[str, float] = {}
        if t.time is not None:
            metrics["time_ms"] = t.time.median_ms
            if t.status.correct:  # a correct, timed kernel
                p.best_ms = min(p.best_ms, t.time.median_ms)
        if t.baseline is not None:
            metrics["trial_baseline_ms"] = t.baseline.median_ms
        metrics["trial_speedup"] = t.speedup
        if ev.gpu_slot >= 0:
            metrics["gpu_slot"] = ev.gpu_slot  # which trial worker (one per GPU) ran this step
        if p.best_ms < math.inf:
            metrics["best_so_far_ms"] = p.best_ms
        self._batch(p.run_id, metrics=metrics, step=ev.step)

    def _pattern_finished(self, ev: PatternFinished) -> None:
        p = self._pattern(ev.match_key)
        # Trials as they streamed in keep the farm's step numbers; a pattern served from the table (or a farm
        # that reports only at the end) gives them here.
        trials = p.trials or list(enumerate(ev.trials))
        w = ev.winner
        metrics: dict[str, float] = {
            "trials": len(trials), "failures": ev.failures,
            "compiles": len(p.compiles), "compile_failures": sum(not c.ok for c in p.compiles),
        }
        params: dict[str, Any] = {}
        tags = {"fact_ray.from_table": str(ev.from_table).lower()}
        if w is not None:
            params["winner"] = w.config.name if w.config is not None else "torch"
            if w.trial.time is not None:
                metrics["best_ms"] = w.trial.time.median_ms
            if w.trial.baseline is not None:
                metrics["baseline_ms"] = w.trial.baseline.median_ms
            metrics["speedup"] = w.trial.speedup
            self._client.log_text(p.run_id, json.dumps(to_jsonable(_without_trials(w)), indent=1, sort_keys=True),
                                  "winner.json")
        else:
            tags["fact_ray.reason"] = ev.reason or "no winner"
        self._batch(p.run_id, params=params, metrics=metrics, tags=tags)
        for name, code in ev.sources:
            self._client.log_text(p.run_id, code, f"sources/{_safe(name)}.cu")
        if trials:
            self._client.log_text(p.run_id, _trials_csv(trials), "trials.csv")
        if p.compiles:
            self._client.log_text(p.run_id, _compiles_csv(p.compiles), "compiles.csv")
            for c in p.compiles:
                if not c.ok and c.log_excerpt:
                    self._client.log_text(p.run_id, c.log_excerpt, f"compile_logs/{_safe(c.source_name)}.log")
        self._client.set_terminated(p.run_id, "FINISHED")
        del self._patterns[ev.match_key]

    def _artifact_produced(self, ev: ArtifactProduced) -> None:
        run_id = self._patterns[ev.match_key].run_id if ev.match_key in self._patterns else self._parent
        path = Path(ev.path)
        if path.is_dir():
            self._client.log_artifacts(run_id, str(path), artifact_path=ev.kind)
        elif path.is_file():
            self._client.log_artifact(run_id, str(path), artifact_path=ev.kind)
        else:
            raise FileNotFoundError(f"artifact {ev.path} ({ev.kind}) does not exist")

    def _run_finished(self, ev: RunFinished) -> None:
        assert self._parent is not None
        from fact_ray.redact import redact, redact_any

        self._client.log_text(self._parent, json.dumps(redact_any(json.loads(ev.report_json)), indent=1,
                                                       sort_keys=True), "report.json")
        if ev.report_text:
            self._client.log_text(self._parent, redact(ev.report_text), "report.txt")
        rows = ev.row_dicts
        if rows:
            self._client.log_text(self._parent, _rows_csv(rows), "summary.csv")
        tags = {"fact_ray.status": ev.status}
        if ev.error:
            tags["fact_ray.error"] = redact(ev.error)
        self._batch(self._parent, metrics={"run_seconds": ev.seconds, "patterns": len(rows)}, tags=tags)
        # Patterns the farm never finished (interrupted, failed) are closed as killed, not left "running".
        for p in self._patterns.values():
            self._client.set_terminated(p.run_id, "KILLED")
        self._patterns.clear()
        self._client.set_terminated(self._parent, _RUN_STATUS[ev.status])
        self._finished = True

    _HANDLERS = {
        RunStarted: _run_started, AgentReport: _agent_report, PatternStarted: _pattern_started,
        CompileFinished: _compile_finished,
        TrialFinished: _trial_finished, PatternFinished: _pattern_finished, ArtifactProduced: _artifact_produced,
        RunFinished: _run_finished,
    }

    # ------------------------------------------------------------------ helpers

    def _pattern(self, key: str) -> _Pattern:
        try:
            return self._patterns[key]
        except KeyError:
            raise RuntimeError(f"MlflowListener: event for pattern {key} which is not open") from None

    def _batch(self, run_id: str, *, params: dict[str, Any] | None = None,
               metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None, step: int = 0) -> None:
        """One request for everything; NaN metrics are left out (a failed trial has no time, not a NaN time)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()
              if v is not None and math.isfinite(float(v))]
        ps = [Param(k, str(v)) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if ms or ps or ts:
            self._client.log_batch(run_id, metrics=ms, params=ps, tags=ts)


def _without_trials(w):
    from dataclasses import replace

    return replace(w, trials=())


def _safe(name: str) -> str:
    """A source name as one path component."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "source"


def _csv(header: list[str], rows: Iterable[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _trials_csv(trials: list[tuple[int, Trial]]) -> str:
    header = ["step", "candidate", "status", "error", "rel_err", "max_abs_err", "median_ms", "p10_ms", "p90_ms",
              "reps", "baseline_ms", "speedup", "tflops"]
    rows = []
    for step, t in trials:
        tm, bl = t.time, t.baseline
        rows.append([step, t.candidate_name, t.status, t.error, t.rel_err, t.max_abs_err,
                     tm.median_ms if tm else "", tm.p10_ms if tm else "", tm.p90_ms if tm else "",
                     tm.reps if tm else "", bl.median_ms if bl else "", t.speedup, t.tflops])
    return _csv(header, rows)


def _compiles_csv(compiles: list[CompileFinished]) -> str:
    return _csv(["source", "ok", "seconds", "n_configs", "cached"],
                [[c.source_name, c.ok, c.seconds, c.n_configs, c.cached] for c in compiles])


def _rows_csv(rows: list[dict[str, Any]]) -> str:
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    return _csv(header, [[r.get(k, "") for k in header] for r in rows])


# --------------------------------------------------------------------------------------------- compare


def compare_runs(tracking_uri: str, run_ids: Iterable[str] = (), last: int = 5,
                 experiment: str = DEFAULT_EXPERIMENT) -> list[dict[str, Any]]:
    """One row per (run, pattern) for the given runs, or for the `last` runs of the experiment.

    run_ids may be MLflow run ids or fact-ray run ids. Each row also carries the best time for the same
    (match_key, policy, arch, gpu) across the compared runs (`best_across_ms`) and whether this row holds it
    (`is_best`): timings of different policies or GPUs are never compared with each other. Rows are sorted by
    pattern, then by run start. No runs: an empty list. An unknown run id: RunNotFound.
    """
    check_reachable(tracking_uri)
    with _store_errors(tracking_uri):
        client = _client(tracking_uri)
        exp_id = _experiment_id(client, experiment, create=False)
    ids = list(run_ids)
    if exp_id is None:
        if ids:
            raise RunNotFound(f"no experiment {experiment!r} in {tracking_uri}, so no run {ids[0]}")
        return []
    parents = [_find_parent(client, exp_id, i, tracking_uri) for i in ids] if ids else list(
        client.search_runs([exp_id], f"tags.`{TAG_KIND}` = 'run'", order_by=["attributes.start_time DESC"],
                           max_results=last))
    rows: list[dict[str, Any]] = []
    for parent in parents:
        pp = parent.data.params
        base = {
            "run": parent.info.run_id, "fact_ray_run_id": parent.data.tags.get(TAG_RUN_ID, ""),
            "started": datetime.fromtimestamp(parent.info.start_time / 1000, timezone.utc).isoformat(
                timespec="milliseconds"),
            "model": pp.get("model_name", ""), "policy": pp.get("policy", ""), "arch": pp.get("arch", ""),
            "gpu": pp.get("gpu", ""), "run_status": parent.info.status,
        }
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=10000)
        for child in children:
            cp, cm = child.data.params, child.data.metrics
            rows.append({
                **base,
                "match_key": cp.get("match_key", child.data.tags.get(TAG_MATCH_KEY, "")),
                "rule": cp.get("rule", ""), "winner": cp.get("winner", ""),
                "best_ms": cm.get("best_ms", math.nan), "baseline_ms": cm.get("baseline_ms", math.nan),
                "speedup": cm.get("speedup", math.nan), "trials": int(cm.get("trials", 0)),
                "failures": int(cm.get("failures", 0)),
                "from_table": child.data.tags.get("fact_ray.from_table", "") == "true",
            })
    best: dict[tuple, float] = {}
    for r in rows:
        k = (r["match_key"], r["policy"], r["arch"], r["gpu"])
        if not math.isnan(r["best_ms"]):
            best[k] = min(best.get(k, math.inf), r["best_ms"])
    for r in rows:
        b = best.get((r["match_key"], r["policy"], r["arch"], r["gpu"]), math.nan)
        r["best_across_ms"] = b
        r["is_best"] = not math.isnan(b) and r["best_ms"] == b
    rows.sort(key=lambda r: (r["match_key"], r["policy"], r["arch"], r["gpu"], r["started"], r["run"]))
    return rows


def _find_parent(client, exp_id: str, run_id: str, tracking_uri: str):
    from mlflow.exceptions import MlflowException

    if "'" in run_id or '"' in run_id:
        raise RunNotFound(f"no fact-ray run {run_id!r} in {tracking_uri}")
    try:
        run = client.get_run(run_id)
        if run.data.tags.get(TAG_KIND) == "run":
            return run
    except MlflowException:
        pass  # not an MLflow run id: try it as a fact-ray run id below
    found = client.search_runs([exp_id], f"tags.`{TAG_KIND}` = 'run' and tags.`{TAG_RUN_ID}` = '{run_id}'",
                               max_results=1)
    if not found:
        raise RunNotFound(f"no fact-ray run {run_id!r} in {tracking_uri}")
    return found[0]
