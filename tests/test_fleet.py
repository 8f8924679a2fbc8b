"""The fleet file, and a whole night submitted with `ray job submit` to a local Ray cluster the test starts with
`ray start --head` (token authentication on, as on a real cluster): the job runs `fact-ray retune --fleet`, which
on this GPU-less machine captures, discovers, plans and compiles, reports what it could not measure (JSON, HTML,
PNG), logs the night to a real sqlite MLflow store and POSTs the summary to a webhook served by the test."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from fact_ray.errors import ConfigError
from fact_ray.fleet import load_fleet
from fact_ray.types import Precision

TINY = str(Path(__file__).parent / "models" / "farm_tiny.py")
FACT_RAY = str(Path(sys.executable).parent / "fact-ray")
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _fleet(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "fleet.toml"
    p.write_text(body)
    return p


def test_fleet_file_parses_and_orders_jobs_by_policy(tmp_path):
    shutil.copy(TINY, tmp_path / "tiny.py")
    f = load_fleet(_fleet(tmp_path, """
name = "prod"
budget = 4
policies = ["fp32"]
[[models]]
name = "a"
ref = "tiny.py"
policies = ["bf16", "fp32"]
[[models]]
name = "b"
ref = "examples_pkg.mod:factory"
"""))
    assert f.name == "prod" and f.budget == 4 and f.models[0].ref == str(tmp_path / "tiny.py")
    assert f.models[1].policies == (Precision.FP32,)
    # Runs of one policy are adjacent, so models sharing a pattern under it tune it once.
    assert [(m.name, p.value) for m, p in f.jobs()] == [("a", "bf16"), ("a", "fp32"), ("b", "fp32")]


@pytest.mark.parametrize("body,msg", [
    ("[[models]]\nref = 'missing.py'\n", "not found"),
    ("budgets = 3\n[[models]]\nref = 'a:b'\n", "unknown field 'budgets'"),
    ("[[models]]\nref = 'a:b'\npolicies = ['fp64']\n", "unknown policy 'fp64'"),
    ("name = 'x'\n", "no [[models]]"),
    ("[[models]]\nref = 'a:b'\n[[models]]\nref = 'a:b'\n", "names must differ"),
    ("[[models\n", "not valid TOML"),
])
def test_fleet_file_mistakes_are_one_line(tmp_path, body, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[")) as info:
        load_fleet(_fleet(tmp_path, body))
    assert "\n" not in str(info.value)
    r = subprocess.run([FACT_RAY, "retune", "--fleet", str(tmp_path / "fleet.toml")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- the night as a job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hook(BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):  # noqa: N802 -- http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.got.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.got = []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.got
    server.shutdown()


def _our_ray_pids(temp_dir: str) -> list[int]:
    """The processes of the cluster this test started: those whose command line names its temp folder."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if temp_dir.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue  # gone meanwhile
    return pids


@pytest.fixture
def ray_head():
    """A one-node Ray cluster with the Jobs API, started like a real head (`ray start --head`) and stopped by the
    ids of its own processes (`ray stop` would also stop other Ray clusters on this machine). Its temp folder is
    its own (its address file too, so no other ray.init() on this machine joins it) and short: the sockets inside
    must fit AF_UNIX's 107 bytes, which a pytest tmp path under an xdist worker's folder does not. Its dashboard
    agent's HTTP port, which serves job submissions, is a free one too: at Ray's default (52365) the agent of any
    other Ray up on this machine at that moment (another xdist worker's) holds it, and then every submission is
    refused with "No available agent"."""
    temp_dir = tempfile.mkdtemp(prefix="fr-ray-head-")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    gcs, dash, client, agent = _free_port(), _free_port(), _free_port(), _free_port()
    r = subprocess.run([*RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
                        f"--dashboard-agent-listen-port={agent}",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
                        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        pids = _our_ray_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(3)
        for pid in _our_ray_pids(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.nvcc
@pytest.mark.slow
def test_the_fleet_night_runs_as_a_ray_job_on_a_running_cluster(tmp_path, ray_head, webhook, session_build_cache):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    hook_url, got = webhook
    fleet = _fleet(tmp_path, f"""
name = "jobtest"
budget = 1
policies = ["fp32"]
webhook = "{hook_url}"
[[models]]
name = "tiny"
ref = "{TINY}"
""")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The session's build cache: the night compiles the unit that tests/test_farm.py's first run compiles.
    job_env = {"FACT_RAY_HOME": str(tmp_path / "home"), "FACT_RAY_TABLE_URI": str(tmp_path / "table"),
               "FACT_RAY_TRACKING_URI": store, "FACT_RAY_ARCH": "sm80", "FACT_RAY_CACHE_DIR": session_build_cache,
               "COLUMNS": "200"}
    out = tmp_path / "night"
    for attempt in range(20):
        # The head's job agent starts a little after `ray start` returns: until it answers, a submission is
        # refused before any job exists, so it is sent again.
        job_id = f"fact-ray-night-test-{attempt}"
        r = subprocess.run([*RAY, "job", "submit", f"--address={address}", f"--submission-id={job_id}",
                            f"--runtime-env-json={json.dumps({'env_vars': job_env})}", "--",
                            FACT_RAY, "retune", "--fleet", str(fleet), "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
        if "No available agent to submit job" not in r.stderr:
            break
        time.sleep(10)
    logs = r.stdout[-4000:] + r.stderr[-2000:]
    status = subprocess.run([*RAY, "job", "status", f"--address={address}", job_id], env=env,
                            capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout + status.stderr, logs
    doc = json.loads((out / "night.json").read_text())
    assert doc["fleet"] == "jobtest" and doc["gpus"] == 0 and doc["exit_code"] == 0
    (model,) = doc["models"]
    assert model["model"] == "tiny" and not model["failed"] and model["mlflow_run_id"]
    assert any("not measured tonight" in n for n in model["notes"])  # said what it could not do
    assert any(n.startswith("no GPU in the cluster") for n in doc["notes"])
    assert (out / "night.html").read_text().startswith("<!doctype html>") and (out / "night.png").is_file()
    # The webhook got the summary; MLflow has the night's run and the model's run tagged with fleet and night.
    ((ctype, payload),) = got
    assert ctype == "application/json" and payload["fleet"] == "jobtest" and payload["clean"]
    c = MlflowClient(store)
    nights = c.search_runs([c.get_experiment_by_name("fact-ray").experiment_id], "tags.`fact_ray.kind` = 'night'")
    assert len(nights) == 1 and nights[0].data.tags["fact_ray.fleet"] == "jobtest"
    tags = c.get_run(model["mlflow_run_id"]).data.tags
    assert tags["fact_ray.model"] == "farm_tiny" and tags["fact_ray.night"] == doc["night"]
    assert "fact-ray night" in logs and "summary sent to" in logs  # the job's own output, tailed by the CLI
