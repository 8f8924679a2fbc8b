"""A hostile OpenAI-compatible server on 127.0.0.1 (issue 14, items 3-4): it trickles bytes, answers with a body
that is not JSON, usage counts that are not integers, a body far over any sane size, a storm of 429s, rule names
ending in a newline. Every one ends as the rules' ranking with one note; none extends the run's deadline, and
nothing crashes. Deadlines are short (config), and no assertion is about wall time: each trickle test asserts
that the agent had given up while the server was still sending."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from fact_ray.actors.llm_agent import LlmAgent, LlmConfig, config_from
from fact_ray.errors import ConfigError
from fact_ray.types import Arch, Precision

pytestmark = pytest.mark.faults
MODELS = Path(__file__).resolve().parents[1] / "models"
ARCH, POLICY = Arch.SM80, Precision.FP32


class HostileServer:
    """One behaviour for every request, written straight to the socket (no HTTP library to tidy it up)."""

    def __init__(self, behaviour: str, **opts) -> None:
        self.behaviour, self.opts = behaviour, opts
        self.requests = 0
        self.sent = 0
        self.finished = threading.Event()  # set when a handler sent everything it meant to
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self._closing = False
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self.sock.close()

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, rest = data.split(b"\r\n\r\n", 1)
        length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))
        while len(rest) < length:
            rest += conn.recv(65536)
        self.requests += 1

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._read_request(conn)
                getattr(self, "_" + self.behaviour)(conn)
                self.finished.set()
        except OSError:
            pass  # the client gave up: what these tests want

    @staticmethod
    def _head(status: int, length: int | None, extra: str = "") -> bytes:
        reason = {200: "OK", 429: "Too Many Requests"}.get(status, "X")
        size = f"content-length: {length}\r\n" if length is not None else ""
        return f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{size}{extra}\r\n".encode()

    def _completion(self, content: str, usage) -> bytes:
        return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}],
                           "usage": usage}).encode()

    def _trickle(self, conn):
        body = self._completion(json.dumps({"ranking": ["m1"]}), {"prompt_tokens": 1, "completion_tokens": 1})
        self._send(conn, self._head(200, len(body)))
        for b in body:  # one byte every `every` s: each read succeeds well inside any read timeout
            self._send(conn, bytes([b]))
            time.sleep(self.opts.get("every", 0.2))

    def _not_json(self, conn):
        body = b"<html><body>502 Bad Gateway, but with status 200</body></html>"
        self._send(conn, self._head(200, len(body)) + body)

    def _bad_usage(self, conn):
        body = self._completion(json.dumps({"ranking": ["m1"]}), {"prompt_tokens": "lots", "completion_tokens": 1.5})
        self._send(conn, self._head(200, len(body)) + body)

    def _huge(self, conn):
        total = 300 * 1024 * 1024
        self._send(conn, self._head(200, total) + b'{"choices": [{"message": {"content": "')
        chunk = b"x" * (1 << 20)
        while self.sent < total:
            self._send(conn, chunk)

    def _storm(self, conn):
        body = b'{"error": {"message": "slow down"}}'
        retry = self.opts.get("retry_after", "0")
        self._send(conn, self._head(429, len(body), f"retry-after: {retry}\r\n") + body)

    def _newline_rule(self, conn):
        rule = {"name": "einsum_gemm\n", "family": "gemm", "nodes": ["einsum"], "anchor": "einsum",
                "operands": {"a": "x", "b": "p_w"}, "params": {"M": 64, "N": 256, "K": 128}}
        body = self._completion(json.dumps({"ranking": ["m0"], "rules": [rule]}),
                                {"prompt_tokens": 1, "completion_tokens": 1})
        self._send(conn, self._head(200, len(body)) + body)

    def _newline_id(self, conn):
        body = self._completion(json.dumps({"ranking": ["m1\n"]}), {"prompt_tokens": 1, "completion_tokens": 1})
        self._send(conn, self._head(200, len(body)) + body)


@pytest.fixture
def hostile():
    made = []

    def make(behaviour, **opts):
        s = HostileServer(behaviour, **opts)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture(scope="module")
def block():
    from fact_ray.capture import capture, load_model
    from fact_ray.discover import discover

    graph = capture(load_model(str(MODELS / "small_block.py"))).graph
    return graph, discover(graph, ARCH, POLICY)


def cfg(url: str, mode: str = "rank", **kw) -> LlmConfig:
    base = dict(mode=mode, model="m", base_url=url, api_key="EMPTY", timeout_s=1.0, deadline_s=1.5, max_retries=2,
                backoff_s=0.01, max_backoff_s=0.05, nvcc="/nonexistent/nvcc")
    return LlmConfig(**(base | kw))


def rules_stand(res, matches, fragment: str) -> None:
    assert not res.answer_used and list(res.matches) == list(matches)
    assert len(res.notes) == 1 and fragment in res.notes[0] and "rules' ranking stands" in res.notes[0], res.notes


def test_trickling_server_cannot_extend_the_request_timeout(hostile, block):
    graph, matches = block
    srv = hostile("trickle", every=0.2)  # the whole answer would take ~40 s
    res = LlmAgent(cfg(srv.url, timeout_s=0.5, deadline_s=30)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, "timed out")
    assert srv.sent > 0 and not srv.finished.is_set(), "gave up while the server was still trickling"


def test_trickling_server_cannot_extend_the_run_deadline(hostile, block):
    graph, matches = block
    srv = hostile("trickle", every=0.2)
    res = LlmAgent(cfg(srv.url, timeout_s=30, deadline_s=0.8)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, "deadline")
    assert not srv.finished.is_set()


@pytest.mark.parametrize("behaviour, fragment", [
    ("not_json", "not JSON"),
    ("bad_usage", "usage.prompt_tokens is not a token count"),
    ("huge", "oversized"),
    ("newline_rule", "schema at rules/name"),
    ("newline_id", "schema at ranking"),
])
def test_malformed_answers_leave_the_rules_ranking(hostile, block, behaviour, fragment):
    graph, matches = block
    srv = hostile(behaviour)
    res = LlmAgent(cfg(srv.url, mode="propose", deadline_s=20, timeout_s=10)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, fragment)
    if behaviour == "huge":
        assert srv.sent < 100 * 1024 * 1024, "the 300 MB body was not read whole"


def test_429_storm_ends_after_the_retries(hostile, block):
    graph, matches = block
    srv = hostile("storm")
    res = LlmAgent(cfg(srv.url, max_retries=3, deadline_s=20)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, "HTTP 429")
    assert srv.requests == 4


def test_429_with_a_huge_retry_after_is_bounded_by_the_deadline(hostile, block):
    graph, matches = block
    srv = hostile("storm", retry_after="86400")
    res = LlmAgent(cfg(srv.url, max_retries=5, deadline_s=0.5, max_backoff_s=60)).consult(graph, matches, ARCH,
                                                                                          POLICY)
    rules_stand(res, matches, "deadline")
    assert srv.requests == 1, "the deadline came before the first backoff ended: no second request"


def test_deadlines_from_the_environment_and_bad_values_are_one_line():
    env = {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1", "OPENAI_API_KEY": "k", "FACT_RAY_LLM_TIMEOUT_S": "0.5",
           "FACT_RAY_LLM_DEADLINE_S": "2"}
    c = config_from("rank", "m", env=env)
    assert (c.timeout_s, c.deadline_s) == (0.5, 2.0)
    for bad in ("abc", "-1", "0", "inf", "nan"):
        with pytest.raises(ConfigError, match="FACT_RAY_LLM_TIMEOUT_S must be a positive"):
            config_from("rank", "m", env=env | {"FACT_RAY_LLM_TIMEOUT_S": bad})
    for url in ("http://host:99999/v1", "http://host:port/v1", "ftp://host/v1", "http:///v1"):
        with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
            config_from("rank", "m", env=env | {"OPENAI_BASE_URL": url})
    with pytest.raises(ConfigError) as e:
        config_from("rank", "m", env=env | {"OPENAI_BASE_URL": "http://user:hunter2@host:99999/v1"})
    assert "hunter2" not in str(e.value)
