"""Hostile and clumsy input (issue 14, items 8-11): each is one line on stderr and exit 2, before any work
(no Ray started, nothing written); credentials in URIs never printed; a non-Ray service at --address is refused
at once; a planted capture-cache pickle never runs; a GEMM over CUTLASS's 32-bit extents is refused before
planning. The CLI runs in-process (typer's runner) except where a fresh process is the point."""

from __future__ import annotations

import os
import pickle
import socket
import threading
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from fact_ray import capture_cache as cc
from fact_ray.actors import cluster
from fact_ray.capture import load_model
from fact_ray.cli import app
from fact_ray.errors import CannotImplement, ServiceUnreachable
from fact_ray.realize.problem import problem_from_match
from fact_ray.redact import redact
from fact_ray.types import Match, Precision

pytestmark = pytest.mark.faults
MODELS = Path(__file__).resolve().parents[1] / "models"
TINY = str(MODELS / "farm_tiny.py")


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith(("FACT_RAY_", "OPENAI_"))]:
        monkeypatch.delenv(k)

    def run(*args, env=None):
        r = CliRunner().invoke(app, list(args), env=env)
        return r.exit_code, r.stderr

    return run


def one_line(code, err, fragment, exit_code=2):
    assert code == exit_code, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize("args, fragment", [
    (("--budget", "-1"), "budget must be candidates per pattern, at least 1, got -1"),
    (("--budget", "0"), "budget must be candidates per pattern, at least 1, got 0"),
    (("--arch", "sm90aaaa"), "unknown architecture 'sm90aaaa'"),
])
def test_bad_run_flags_are_one_line_before_ray(cli, tmp_path, args, fragment):
    one_line(*cli("run", TINY, *args), fragment)
    assert not ray.is_initialized() and not (tmp_path / ".fact-ray").exists()


def test_bad_environment_and_toml_are_one_line(cli, tmp_path):
    one_line(*cli("run", TINY, env={"FACT_RAY_TRIAL_TIMEOUT_S": "abc"}), "trial_timeout_s must be a positive")
    toml = tmp_path / "fact-ray.toml"
    toml.write_bytes(b'policy = "fp32"\nnvcc = "\xff\xfe"\n')
    one_line(*cli("discover", TINY), "not UTF-8 text")
    for text, fragment in (('budget = [1]\n', "setting budget has the wrong type"),
                           ('nvcc = 5\n', "setting nvcc has the wrong type"),
                           ('trial_timeout_s = "soon"\n', "trial_timeout_s must be a positive"),
                           ('budget = true\n', "setting budget has the wrong type")):
        toml.write_text(text)
        one_line(*cli("discover", TINY), fragment)
    assert not (tmp_path / ".fact-ray").exists()


def test_arch_spellings_still_accepted():
    from fact_ray.config import parse_arch

    assert {parse_arch(a).value for a in ("sm90", "sm_90a", "SM90A", "90", "h200")} == {"sm90"}
    assert {parse_arch(a).value for a in ("sm80", "sm_80", "a100", "80")} == {"sm80"}


def test_doctor_with_a_bad_port_is_one_line(cli):
    one_line(*cli("doctor", "--address", "head:99999"), "--address")
    one_line(*cli("doctor", "--address", "ray://head:port"), "--address")
    one_line(*cli("doctor", env={"OPENAI_BASE_URL": "http://user:hunter2@h:70000/v1"}), "OPENAI_BASE_URL")
    code, err = cli("doctor", env={"OPENAI_BASE_URL": "http://user:hunter2@h:70000/v1"})
    assert "hunter2" not in err


def test_get_inputs_raising_a_base_exception_is_one_line(cli, tmp_path):
    model = tmp_path / "boom.py"
    model.write_text((MODELS / "farm_tiny.py").read_text() + '''

class Boom(BaseException):
    pass


def get_inputs():
    raise Boom("from get_inputs")
''')
    one_line(*cli("discover", str(model)), "get_inputs() raised")


def test_secrets_in_uris_are_never_printed(cli, tmp_path):
    code, err = cli("table", "list", "--table", "s3://AKIAEXAMPLE:SECRETKEY123@127.0.0.1:1/bucket/t?x=1")
    assert code != 0 and "SECRETKEY123" not in err and "AKIAEXAMPLE" not in err, err
    r = CliRunner().invoke(app, ["doctor", "--table", "s3://AKIAEXAMPLE:SECRETKEY123@127.0.0.1:1/b"])
    assert "SECRETKEY123" not in r.output + r.stderr and "pattern table" in r.output


@pytest.mark.parametrize("text, secret", [
    ("s3://KEY:SECRET@bucket/t", "SECRET"),
    ("https://u:p4ss@host:8000/v1", "p4ss"),
    ("https://b.s3.amazonaws.com/t?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=deadbeef&part=1", "deadbeef"),
    ("gs://b/t?token=abc123&x=1", "abc123"),
    ("error: cannot read https://h/x?sig=s1g&key=k3y today", "s1g"),
])
def test_redact_masks_credentials_and_keeps_the_rest(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out
    assert out.split("://")[0] == text.split("://")[0]
    if "part=1" in text:
        assert "part=1" in out and "X-Amz-Credential=***" in out


def test_a_service_that_is_not_ray_is_refused_at_once(cli):
    """A listener that accepts TCP and says nothing (as a busy non-Ray service can) and one that speaks HTTP/1:
    the probe refuses both, where Ray's own client would wait on them for minutes."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http.listen(4)

    def answer_http():
        conn, _ = http.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    threading.Thread(target=answer_http, daemon=True).start()
    try:
        with pytest.raises(ServiceUnreachable, match="not a Ray cluster.*no answer"):
            cluster.probe(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        with pytest.raises(ServiceUnreachable, match="not a Ray cluster.*HTTP/1.1"):
            cluster.probe(f"ray://127.0.0.1:{http.getsockname()[1]}")
    finally:
        silent.close()
        http.close()
    assert not ray.is_initialized()


@pytest.mark.recovers
def test_a_planted_capture_pickle_never_runs(tmp_path):
    loaded = load_model(TINY)
    cache = tmp_path / "captures"
    cache.mkdir()
    marker = tmp_path / "PLANTED"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (cache / f"{cc.key_of(loaded)}.pkl").write_bytes(pickle.dumps(Planted()))
    entry, hit = cc.captured(loaded, cache)
    assert not hit and not marker.exists(), "the planted pickle ran"
    assert entry.graph.nodes and isinstance(cc.read_entry(cache / f"{cc.key_of(loaded)}.pkl"), cc.CachedCapture)
    assert cc.captured(loaded, cache)[1], "the entry written after the refusal is served"


def test_a_gemm_over_32_bit_extents_is_refused_before_planning():
    m = Match(rule="linear", family="gemm", nodes=("linear",), anchor="linear",
              params=(("M", 3_000_000_000), ("N", 128), ("K", 256)), dtype="float32",
              shapes=((3_000_000_000, 256), (128, 256)))
    with pytest.raises(CannotImplement, match="over CUTLASS's 32-bit extent"):
        problem_from_match(m, Precision.FP32)
