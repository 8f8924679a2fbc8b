"""Faults of the MLflow store (issue 14, items 7 and 8): first runs at once on a fresh sqlite store, a corrupt
mlflow.db, a driver killed with SIGKILL mid-run, credentials in what is logged. Real sqlite MLflow throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fact_ray.errors import ServiceUnreachable
from fact_ray.events import RunFinished, RunStarted
from fact_ray.tracking import MlflowListener, _client, compare_runs
from fact_ray.types import Arch, Precision

pytestmark = pytest.mark.faults

CHILD = textwrap.dedent("""
    import os, sys, time
    from fact_ray.events import RunFinished, RunStarted
    from fact_ray.types import Arch, Precision
    go = sys.argv[2]
    while not os.path.exists(go):  # all three start the store's set-up together
        time.sleep(0.001)
    from fact_ray.tracking import MlflowListener
    listener = MlflowListener(sys.argv[1])
    listener.on_event(RunStarted.make(run_id=sys.argv[3], model_name="m", model_hash="h", policy=Precision.FP32,
                                      arch=Arch.SM80, gpu="", budget=1))
    if len(sys.argv) > 4:  # stay RUNNING until killed
        print("started", flush=True)
        time.sleep(600)
    listener.on_event(RunFinished.make(status="ok", seconds=1.0))
""")


def _start(uri, go, run_id, *extra):
    return subprocess.Popen([sys.executable, "-c", CHILD, uri, str(go), run_id, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _runs(uri):
    client = _client(uri)
    exp = client.get_experiment_by_name("fact-ray")
    return {r.data.tags["fact_ray.run_id"]: r.info.status for r in client.search_runs([exp.experiment_id])}


@pytest.mark.recovers
@pytest.mark.slow
def test_concurrent_first_runs_on_a_fresh_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [_start(uri, go, f"run-{i}") for i in range(3)]
    time.sleep(0.5)  # let all three import and wait at the line
    go.write_text("")
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [err[-1500:] for _, err in results]
    assert _runs(uri) == {f"run-{i}": "FINISHED" for i in range(3)}


def test_corrupt_store_is_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an sqlite database" * 100)
    uri = f"sqlite:///{db}"
    with pytest.raises(ServiceUnreachable, match="cannot be opened") as e:
        MlflowListener(uri)
    assert "\n" not in str(e.value)
    with pytest.raises(ServiceUnreachable, match="cannot be opened"):
        compare_runs(uri)
    out = subprocess.run([sys.executable, "-m", "fact_ray.cli", "compare", "--tracking-uri", uri],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0


@pytest.mark.recovers
def test_a_sigkilled_run_is_closed_as_killed_by_the_next_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    go.write_text("")
    victim = _start(uri, go, "victim", "hang")
    assert victim.stdout.readline().strip() == "started", victim.stderr.read()[-1500:]
    assert _runs(uri) == {"victim": "RUNNING"}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    next_run = _start(uri, go, "next")
    assert next_run.wait(timeout=300) == 0, next_run.stderr.read()[-1500:]
    assert _runs(uri) == {"victim": "KILLED", "next": "FINISHED"}


def test_a_live_run_is_not_swept(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    go.write_text("")
    live = _start(uri, go, "live", "hang")
    try:
        assert live.stdout.readline().strip() == "started"
        nxt = _start(uri, go, "next")
        assert nxt.wait(timeout=300) == 0
        assert _runs(uri)["live"] == "RUNNING", "a run whose process is alive is left alone"
    finally:
        live.kill()
        live.wait()


def test_credentials_are_not_logged_as_parameters(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    listener = MlflowListener(uri)
    listener.on_event(RunStarted.make(
        run_id="r", model_name="m", model_hash="h", policy=Precision.FP32, arch=Arch.SM80, gpu="", budget=1,
        model_ref="https://user:pw1@host/m.py",
        extra={"table": "s3://AKIAKEY:SECRETVALUE@bucket/t",
               "address": "https://h/x?X-Amz-Signature=abcdef&X-Amz-Credential=cred&keep=1"}))
    listener.on_event(RunFinished.make(status="failed", seconds=1.0,
                                       error="cannot write s3://AKIAKEY:SECRETVALUE@bucket/t",
                                       report={"table": "s3://AKIAKEY:SECRETVALUE@bucket/t"}))
    client = _client(uri)
    run = client.get_run(listener.parent_run_id)
    logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
    for secret in ("SECRETVALUE", "AKIAKEY", "pw1", "abcdef", "=cred"):
        assert secret not in logged, secret
    assert "keep=1" in logged and "bucket/t" in logged, "the rest of the URI is still there"
    local = client.download_artifacts(listener.parent_run_id, "report.json", str(tmp_path))
    assert "SECRETVALUE" not in open(local).read()
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_sigterm_ends_a_real_run_as_killed_not_running(tmp_path):
    """`fact-ray run` on a real local Ray, sent SIGTERM once the run is under way: the run is closed at once (not
    left RUNNING for the next run's sweep), with no Python traceback. Once Ray is up, Ray's own driver handler
    (sys.exit(15)) takes over from fact-ray's and the farm closes the run FAILED (fact-ray's handler, before Ray,
    would make it KILLED).

    The signal goes only after the store shows every pattern's child run with its parameters: the listener has
    written all that RunStarted and the PatternStarted events ask, and the farm is compiling, with nothing to log
    until a unit is built (seconds). Sent as soon as the parent row read RUNNING, it could land inside the
    listener's next writes (the run's parameters, right after create_run): the race that made this test flaky."""
    import sqlite3

    from fact_ray.capture import capture, load_model
    from fact_ray.discover import discover

    db = tmp_path / "mlflow.db"
    model = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "farm_tiny.py")
    patterns = len(discover(capture(load_model(model)).graph, Arch.SM80, Precision.FP32))  # what the run starts
    assert patterns >= 1
    proc = subprocess.Popen([sys.executable, "-m", "fact_ray.cli", "run", model, "--arch", "sm80", "--budget", "2",
                             "--tracking-uri", f"sqlite:///{db}", "--table", str(tmp_path / "table")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, FACT_RAY_HOME=str(tmp_path / "home")))

    def query(sql: str) -> tuple | None:
        if not db.exists():
            return None
        try:
            with sqlite3.connect(db) as con:
                return con.execute(sql).fetchone()
        except sqlite3.Error:
            return None  # the schema is still being set up

    def parent_status():
        row = query("select r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                    "where t.key = 'fact_ray.kind' and t.value = 'run'")
        return row[0] if row else None

    def patterns_logged() -> int:
        # A child run's parameters are the last write of the listener's PatternStarted handler.
        row = query("select count(*) from tags t join params p on p.run_uuid = t.run_uuid "
                    "where t.key = 'fact_ray.kind' and t.value = 'pattern' and p.key = 'rule'")
        return row[0] if row else 0

    try:
        while patterns_logged() < patterns:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        assert parent_status() == "RUNNING"
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert parent_status() in ("KILLED", "FAILED")
