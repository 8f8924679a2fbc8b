"""MLflow tracking as a farm listener: a real sqlite store, a real `mlflow server` over HTTP, a closed port."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fact_ray.errors import RunNotFound, ServiceUnreachable
from fact_ray.events import (
    ArtifactProduced,
    Broadcaster,
    CompileFinished,
    PatternFinished,
    PatternStarted,
    RunFinished,
    RunStarted,
    TrialFinished,
)
from fact_ray.tracking import MlflowListener, check_reachable, compare_runs
from fact_ray.types import Arch, KernelConfig, Match, Precision, TimeStats, Trial, Winner, freeze

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


# --------------------------------------------------------------------------------------------- a run's events


def _match(n: int) -> Match:
    return Match(rule="linear_bias_act", family="gemm_bias_act", nodes=("linear", "relu"), anchor="relu",
                 params=(("K", 256), ("M", 128), ("N", n), ("activation", "relu")), dtype="float32",
                 shapes=((128, 256), (n, 256), (n,)), flops=2 * 128 * n * 256, est_time_s=2e-5, share=0.4)


def _config(name: str) -> KernelConfig:
    return KernelConfig(template="sm90_gemm", name=name, arch=Arch.SM90, precision=Precision.FP32,
                        element="float", opclass="simt", math_op="multiply_add", instruction=(1, 1, 1),
                        tile=(128, 128, 8))


def _ts(ms: float) -> TimeStats:
    return TimeStats(median_ms=ms, p10_ms=ms * 0.95, p90_ms=ms * 1.05, reps=50)


def _trials(base_ms: float, times: list[float | None]) -> list[Trial]:
    """The torch op first, then kernels; None: a wrong answer."""
    out = [Trial("torch", "ok", time=_ts(base_ms), baseline=_ts(base_ms), rel_err=0.0)]
    for i, t in enumerate(times):
        if t is None:
            out.append(Trial(f"k{i}", "wrong", error="rel_err 3e-2 > 1e-5", rel_err=3e-2))
        else:
            out.append(Trial(f"k{i}", "ok" if t < base_ms else "slower", time=_ts(t), baseline=_ts(base_ms),
                             rel_err=1e-7))
    return out


def _emit_run(sink, tmp: Path, run_id: str, base_ms: float, times: list[float | None], status: str = "ok"):
    """A full event sequence: one tuned pattern, one served from the table; returns what a test checks."""
    sink.emit(RunStarted.make(run_id=run_id, model_name="mlp", model_hash="abc123", policy=Precision.FP32,
                              arch=Arch.SM90, gpu="NVIDIA H100", budget=4,
                              versions={"torch": "2.13.0", "cutlass": "4.2.0"}, extra={"llm": "off"}))
    m1, m2 = _match(512), _match(1024)
    sink.emit(PatternStarted(m1, 0, 2))
    sink.emit(CompileFinished(m1.key, "src_a", True, 12.5, 2))
    sink.emit(CompileFinished(m1.key, "src_b", False, 3.0, 2, log_excerpt="error: no instance of ..."))
    prof = tmp / f"profile-{run_id}.json"
    prof.write_text('{"kernel": "k0"}')
    sink.emit(ArtifactProduced(str(prof), "profile", match_key=m1.key))  # belongs to the pattern's child run
    trials = _trials(base_ms, times)
    for step, t in enumerate(trials):
        sink.emit(TrialFinished(m1.key, t, step, gpu_slot=step % 2, host="node-1"))  # two GPUs took turns
    ok = [t for t in trials[1:] if t.status == "ok"]
    best = min(ok, key=lambda t: t.time.median_ms) if ok else trials[0]
    code = f"// winner of {run_id}\nextern \"C\" int k_run() {{ return 0; }}\n"
    w1 = Winner(m1.key, m1.rule, Precision.FP32, Arch.SM90,
                _config(best.candidate_name) if best.candidate_name != "torch" else None, best, "libkey")
    sink.emit(PatternFinished(m1.key, w1, tuple(trials), failures=2, sources=freeze({"src_a": code})))
    sink.emit(PatternStarted(m2, 1, 2))
    table_trial = Trial("k_table", "ok", time=_ts(0.5), baseline=_ts(1.0))
    w2 = Winner(m2.key, m2.rule, Precision.FP32, Arch.SM90, _config("k_table"), table_trial)
    sink.emit(PatternFinished(m2.key, w2, (table_trial,), from_table=True))
    art = tmp / f"module-{run_id}.txt"
    art.write_text(f"composed module of {run_id}")
    sink.emit(ArtifactProduced(str(art), "module"))
    report = {"run_id": run_id, "patterns": 2, "speedup": base_ms / best.time.median_ms}
    sink.emit(RunFinished.make(status=status, seconds=42.0, report=report, report_text=f"report of {run_id}",
                               rows=[{"pattern": m1.key, "speedup": 1.5}, {"pattern": m2.key, "speedup": 2.0}]))
    return {"m1": m1, "m2": m2, "trials": trials, "best": best, "code": code, "report": report}


def _children(client, parent):
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.params["match_key"]: r for r in runs}


def _check_logged(client, parent_id: str, facts: dict, tmp: Path) -> None:
    """Everything a run logs, read back through MlflowClient (shared by the sqlite and the HTTP test)."""
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    p = parent.data.params
    assert (p["model_hash"], p["policy"], p["arch"], p["gpu"], p["budget"]) == (
        "abc123", "fp32", "sm90", "NVIDIA H100", "4")
    assert p["version.torch"] == "2.13.0" and p["setting.llm"] == "off"
    assert parent.data.metrics["run_seconds"] == 42.0

    kids = _children(client, parent)
    assert set(kids) == {facts["m1"].key, facts["m2"].key}
    c1, c2 = kids[facts["m1"].key], kids[facts["m2"].key]
    assert c1.info.status == c2.info.status == "FINISHED"
    assert (c1.data.params["rule"], c1.data.params["shapes"], c1.data.params["dtype"]) == (
        "linear_bias_act", "128x256;512x256;512", "float32")
    best, base = facts["best"], facts["trials"][0].time.median_ms
    m = c1.data.metrics
    assert m["best_ms"] == pytest.approx(best.time.median_ms)
    assert m["baseline_ms"] == pytest.approx(base)
    assert m["speedup"] == pytest.approx(base / best.time.median_ms)
    assert (m["trials"], m["failures"], m["compiles"], m["compile_failures"]) == (len(facts["trials"]), 2, 2, 1)
    assert c1.data.params["winner"] == best.candidate_name
    slots = [(h.step, h.value) for h in client.get_metric_history(c1.info.run_id, "gpu_slot")]
    assert sorted(slots) == [(i, float(i % 2)) for i in range(len(facts["trials"]))]  # which GPU ran what
    assert c2.data.tags["fact_ray.from_table"] == "true" and c2.data.metrics["speedup"] == pytest.approx(2.0)

    # Per-trial steps: one time_ms point per timed trial at its step; the wrong one has none.
    hist = {x.step: x.value for x in client.get_metric_history(c1.info.run_id, "time_ms")}
    timed = {i: t.time.median_ms for i, t in enumerate(facts["trials"]) if t.time is not None}
    assert hist == pytest.approx(timed)
    speedups = {x.step: x.value for x in client.get_metric_history(c1.info.run_id, "trial_speedup")}
    assert speedups == pytest.approx({i: t.speedup for i, t in enumerate(facts["trials"]) if t.time is not None})
    best_so_far = sorted((x.step, x.value) for x in client.get_metric_history(c1.info.run_id, "best_so_far_ms"))
    assert [v for _, v in best_so_far] == sorted((v for _, v in best_so_far), reverse=True)  # never worsens
    assert best_so_far[-1][1] == pytest.approx(best.time.median_ms)

    # Artifacts, downloaded and compared.
    d1 = Path(client.download_artifacts(c1.info.run_id, "", str(tmp / "dl1")))
    assert (d1 / "sources" / "src_a.cu").read_text() == facts["code"]
    rows = list(csv.DictReader(io.StringIO((d1 / "trials.csv").read_text())))
    assert [r["candidate"] for r in rows] == [t.candidate_name for t in facts["trials"]]
    assert [r["status"] for r in rows] == [t.status for t in facts["trials"]]
    assert "no instance" in (d1 / "compile_logs" / "src_b.log").read_text()
    assert json.loads((d1 / "winner.json").read_text())["config"]["name"] == best.candidate_name
    assert json.loads(next((d1 / "profile").iterdir()).read_text()) == {"kernel": "k0"}
    dp = Path(client.download_artifacts(parent_id, "", str(tmp / "dlp")))
    assert json.loads((dp / "report.json").read_text()) == facts["report"]
    assert (dp / "report.txt").read_text().startswith("report of")
    assert "composed module" in next((dp / "module").iterdir()).read_text()
    assert len(list(csv.DictReader(io.StringIO((dp / "summary.csv").read_text())))) == 2


# --------------------------------------------------------------------------------------------- sqlite store


def test_full_run_logged_to_sqlite(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"  # the folder does not exist yet: created as needed
    listener = MlflowListener(uri, experiment="t")
    facts = _emit_run(Broadcaster([listener], strict=True), tmp_path, "r1", 1.0, [0.6, None, 1.2, 0.8])  # best not last
    _check_logged(MlflowClient(uri), listener.parent_run_id, facts, tmp_path)


def test_interrupted_run_closes_open_patterns_and_rejects_late_events(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    listener = MlflowListener(uri, experiment="t")
    b = Broadcaster([listener], strict=True)
    with pytest.raises(RuntimeError, match="before RunStarted"):
        listener.on_event(PatternStarted(_match(64), 0))
    b.emit(RunStarted.make(run_id="r9", model_name="m", model_hash="h", policy=Precision.BF16, arch=Arch.SM80,
                           gpu="", budget=1))
    b.emit(PatternStarted(_match(64), 0, 1))
    b.emit(RunFinished.make(status="interrupted", seconds=1.0, error="interrupted by the user"))
    client = MlflowClient(uri)
    parent = client.get_run(listener.parent_run_id)
    assert parent.info.status == "KILLED" and parent.data.params["gpu"] == "none"
    assert parent.data.tags["fact_ray.error"] == "interrupted by the user"
    (child,) = _children(client, parent).values()
    assert child.info.status == "KILLED"
    with pytest.raises(RuntimeError, match="after RunFinished"):
        listener.on_event(RunFinished.make(status="ok", seconds=1.0))


def test_compare_runs_best_across_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for rid, base, times in (("ra", 1.0, [0.9]), ("rb", 1.0, [0.5]), ("rc", 1.0, [0.7])):
        _emit_run(Broadcaster([MlflowListener(uri, experiment="t")], strict=True), tmp_path, rid, base, times)
    rows = compare_runs(uri, last=2, experiment="t")
    assert {r["fact_ray_run_id"] for r in rows} == {"rb", "rc"}  # the last two runs
    key = _match(512).key
    tuned = [r for r in rows if r["match_key"] == key]
    assert [r["best_ms"] for r in tuned] == pytest.approx([0.5, 0.7])  # sorted by start time
    assert [r["is_best"] for r in tuned] == [True, False]
    assert all(r["best_across_ms"] == pytest.approx(0.5) for r in tuned)
    assert all(r["policy"] == "fp32" and r["arch"] == "sm90" for r in rows)

    # By fact-ray id and by MLflow id; unknown ids are a clear error.
    by_id = compare_runs(uri, ["ra", tuned[1]["run"]], experiment="t")
    assert {r["fact_ray_run_id"] for r in by_id} == {"ra", "rc"}
    assert [r["is_best"] for r in by_id if r["match_key"] == key] == [False, True]
    with pytest.raises(RunNotFound, match="nope"):
        compare_runs(uri, ["nope"], experiment="t")
    assert compare_runs(uri, experiment="absent") == []


# --------------------------------------------------------------------------------------------- broadcaster


class _Recorder:
    def __init__(self):
        self.seen = []

    def on_event(self, event):
        self.seen.append(type(event).__name__)


class _Breaks:
    name = "breaks"

    def __init__(self, on: str):
        self.on, self.seen = on, []

    def on_event(self, event):
        self.seen.append(type(event).__name__)
        if type(event).__name__ == self.on:
            raise ServiceUnreachable("tracking server http://x is not reachable")


def test_failing_listener_is_detached_and_reported(caplog):
    before, bad, after = _Recorder(), _Breaks("PatternStarted"), _Recorder()
    b = Broadcaster([before, bad, after])
    events = [RunStarted.make(run_id="r", model_name="m", model_hash="h", policy=Precision.FP32, arch=Arch.SM90,
                              gpu="", budget=1), PatternStarted(_match(64), 0), RunFinished.make(status="ok",
                                                                                                   seconds=0.0)]
    for e in events:
        b.emit(e)
    names = ["RunStarted", "PatternStarted", "RunFinished"]
    assert before.seen == after.seen == names  # the others still got every event
    assert bad.seen == names[:2]  # detached after its failure
    (f,) = b.failures
    assert (f.listener, f.event) == ("breaks", "PatternStarted") and "not reachable" in f.error
    assert "breaks failed on PatternStarted" in caplog.text


def test_strict_broadcaster_reraises_after_notifying_all():
    bad, after = _Breaks("RunFinished"), _Recorder()
    b = Broadcaster([bad, after], strict=True)
    with pytest.raises(ServiceUnreachable):
        b.emit(RunFinished.make(status="ok", seconds=0.0))
    assert after.seen == ["RunFinished"]
    with pytest.raises(ValueError, match="status"):
        RunFinished(status="done", seconds=0.0)


# --------------------------------------------------------------------------------------------- reachability


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)  # a hang guard, not a speed claim
def test_closed_port_fails_fast(monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ServiceUnreachable, match=f"tracking server {uri} is not reachable"):
        check_reachable(uri)
    with pytest.raises(ServiceUnreachable):
        MlflowListener(uri)
    # A server gone mid-run: the listener's MLflow error becomes the same one line.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    listener = MlflowListener(uri, check=False)
    with pytest.raises(ServiceUnreachable, match="not reachable"):
        listener.on_event(RunStarted.make(run_id="r", model_name="m", model_hash="h", policy=Precision.FP32,
                                          arch=Arch.SM90, gpu="", budget=1))


def test_sqlite_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "blocker").write_text("a file where the store's folder should go")
    with pytest.raises(ServiceUnreachable, match="cannot create"):
        check_reachable(f"sqlite:///{tmp_path}/blocker/sub/mlflow.db")
    check_reachable(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    assert (tmp_path / "a" / "b").is_dir()


# --------------------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp}/db.sqlite", "--artifacts-destination", str(tmp / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # own group: stopped with its workers
    try:
        deadline = time.monotonic() + 90  # generous: first start migrates the database on a 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not up in 90 s: {(tmp / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_full_run_logged_over_http(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    check_reachable(mlflow_server)
    listener = MlflowListener(mlflow_server)
    facts = _emit_run(Broadcaster([listener], strict=True), tmp_path, "http1", 2.0, [1.0, None, 1.5])
    _check_logged(MlflowClient(mlflow_server), listener.parent_run_id, facts, tmp_path)
    rows = compare_runs(mlflow_server, ["http1"])
    assert {r["match_key"] for r in rows} == {facts["m1"].key, facts["m2"].key}


def test_cli_compare_prints_the_runs_side_by_side(tmp_path):
    import os
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for rid, times in (("ra", [0.9]), ("rb", [0.5])):
        _emit_run(Broadcaster([MlflowListener(uri)], strict=True), tmp_path, rid, 1.0, times)
    fr = str(Path(sys.executable).parent / "fact-ray")
    env = {**os.environ, "COLUMNS": "250"}
    r = subprocess.run([fr, "compare", "--last", "2", "--tracking-uri", uri], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "2 runs" in r.stdout and "2.00x" in r.stdout and "1.11x" in r.stdout  # 1.0/0.5 and 1.0/0.9
    r = subprocess.run([fr, "compare", "nope", "--tracking-uri", uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "nope" in r.stderr
