"""The LLM discovery agent against a real OpenAI-compatible HTTP server on 127.0.0.1, through its real HTTP
client: rankings, proposals (vetted; one real nvcc compile), and every way an endpoint can fail, after which the
rules' ranking stands with one note."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fact_ray.actors.discovery import Discovery, make_ranker, rank_matches
from fact_ray.actors.llm_agent import (LlmAgent, LlmConfig, candidate_configs, estimate_tokens,
                                       format_agent_changes, match_id, retrieve_examples)
from fact_ray.actors.llm_vet import RuleProposal, proposal_match, vet_proposal
from fact_ray.config import Settings
from fact_ray.errors import CannotImplement, ConfigError
from fact_ray.types import Arch, Precision

MODELS = Path(__file__).parent / "models"
ARCH, POLICY = Arch.SM80, Precision.FP32

EINSUM_MODEL = '''
import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, n))

    def forward(self, x):
        return torch.relu(torch.einsum("bk,kn->bn", x, self.w))


def get_inputs():
    return [torch.randn(64, 128)]


def get_init_inputs():
    return [128, 256]
'''


# --------------------------------------------------------------------------------------------- the server


class FakeEndpoint:
    """A tiny OpenAI-compatible server: POST /v1/chat/completions answers from a script, one step per request.
    A step is (status, content_or_body, delay_s[, usage]); a str content becomes a chat completion's message."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        self.answered: list[int] = []  # statuses whose answer was written whole
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                outer.requests.append({"path": self.path, "body": body})
                status, content, delay, *usage = outer.script.pop(0) if outer.script else (500, {"error": ""}, 0)
                if delay:
                    time.sleep(delay)
                if isinstance(content, str):
                    content = {"id": "c1", "object": "chat.completion", "created": 0, "model": body.get("model"),
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": content}}],
                               "usage": usage[0] if usage else {"prompt_tokens": 900, "completion_tokens": 40,
                                                                "total_tokens": 940}}
                data = json.dumps(content).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    if status == 429:
                        self.send_header("retry-after", "0")
                    self.end_headers()
                    self.wfile.write(data)
                    outer.answered.append(status)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    made = []

    def make(*script):
        ep = FakeEndpoint(script)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.close()


def cfg_for(url: str, mode: str = "rank", **kw) -> LlmConfig:
    base = dict(mode=mode, model="test-model", base_url=url, api_key="EMPTY", timeout_s=5.0, deadline_s=20.0,
                max_retries=2, backoff_s=0.01, max_backoff_s=0.05, nvcc="/nonexistent/nvcc")
    base.update(kw)
    return LlmConfig(**base)


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def block():
    from fact_ray.capture import capture, load_model
    from fact_ray.discover import discover

    graph = capture(load_model(str(MODELS / "small_block.py"))).graph
    return graph, discover(graph, ARCH, POLICY)


@pytest.fixture(scope="module")
def einsum(tmp_path_factory):
    from fact_ray.capture import capture, load_model
    from fact_ray.discover import discover

    path = tmp_path_factory.mktemp("models") / "einsum_gemm.py"
    path.write_text(EINSUM_MODEL)
    graph = capture(load_model(str(path))).graph
    return graph, discover(graph, ARCH, POLICY)


def answer(**kw) -> str:
    return json.dumps(kw)


def einsum_rule(**over) -> dict:
    r = {"name": "einsum_gemm", "family": "gemm", "nodes": ["einsum"], "anchor": "einsum",
         "operands": {"a": "x", "b": "p_w"}, "params": {"M": 64, "N": 256, "K": 128, "L": 1, "layout_b": "row"}}
    r.update(over)
    return r


# --------------------------------------------------------------------------------------------- ranking


def test_good_ranking_reorders_and_reports_moves(endpoint, block, tmp_path):
    graph, matches = block
    n = len(matches)
    ranking = [match_id(2), match_id(0)]  # the rest keep the rules' order after these
    ep = endpoint((200, answer(ranking=ranking, why="attention first"), 0))
    res = LlmAgent(cfg_for(ep.url)).consult(graph, matches, ARCH, POLICY)
    assert res.answer_used and not res.notes
    assert [m.key for m in res.matches] == [matches[i].key for i in [2, 0, 1, *range(3, n)]]
    assert [(mv.rules_rank, mv.agent_rank) for mv in res.moves] == [(3, 1), (1, 2), (2, 3)]
    assert (res.prompt_tokens, res.completion_tokens, res.requests) == (900, 40, 1)
    body = ep.requests[0]["body"]
    assert ep.requests[0]["path"] == "/v1/chat/completions" and body["model"] == "test-model"
    user = json.loads(body["messages"][1]["content"])
    assert [m["id"] for m in user["matches"]] == [match_id(i) for i in range(n)]
    assert any("linear_2" in line for line in user["graph"]["nodes"]) and user["rule_table"]
    assert "config_candidates" not in user  # rank mode asks for no proposals

    disc = rank_matches(make_ranker("rank", config=cfg_for(endpoint((200, answer(ranking=ranking), 0)).url)),
                        graph, matches, ARCH, POLICY, "export")
    assert disc.agent_used and disc.answer_used and len(disc.moves) == 3 and disc.matches[0] == matches[2]
    from rich.console import Console

    con = Console(record=True, width=160)
    con.print(format_agent_changes(disc))
    text = con.export_text()
    assert "moved against the rules' ranking" in text and "900 prompt + 40 completion" in text


def test_vetted_examples_come_from_the_pattern_table(block, tmp_path):
    from fact_ray.pattern_table import PatternTable
    from fact_ray.pattern_table.row import TableRow, Toolchain

    graph, matches = block
    m = matches[0]
    tc = Toolchain("13.0", "4.2.0", "2.13.0", "v1")
    now = datetime.now(timezone.utc)
    rows = [TableRow(m.rule, m.key, m.shape_signature, m.dtype, POLICY, arch, tc, None, name, status,
                     now, gpu_name="A100", median_ms=0.01, speedup=sp)
            for arch, name, status, sp in ((ARCH, "cfg_fast", "ok", 1.7), (Arch.SM90, "cfg_sm90", "ok", 2.5),
                                           (ARCH, "cfg_wrong", "wrong", None))]
    uri = str(tmp_path / "table")
    PatternTable(uri).commit(rows)
    lines, note = retrieve_examples(uri, ARCH, [m.family], 5)
    assert not note and len(lines) == 1 and "cfg_fast" in lines[0] and "1.70x" in lines[0]


# --------------------------------------------------------------------------------------------- failures


def rules_stand(res, matches, fragment: str) -> None:
    assert list(res.matches) == list(matches) and not res.moves and not res.answer_used
    assert len(res.notes) == 1 and fragment in res.notes[0] and "rules' ranking stands" in res.notes[0]


@pytest.mark.parametrize("content,fragment", [
    ("Sure! Here is the ranking: m1, m0", "malformed JSON"),
    (answer(ranking=["m0"], extra="x"), "does not fit the schema"),
    (answer(ranking=["m99"]), "unknown match id"),
    (json.dumps({"ranking": ["m0"], "why": "x" * 90000}), "oversized"),
])
def test_unusable_answers_leave_the_rules_ranking(endpoint, block, content, fragment):
    graph, matches = block
    ep = endpoint((200, content, 0))
    res = LlmAgent(cfg_for(ep.url, max_answer_chars=20000)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, fragment)


def test_429_then_success_retries_with_backoff(endpoint, block):
    graph, matches = block
    ep = endpoint((429, {"error": {"message": "slow down"}}, 0), (200, answer(ranking=["m1"]), 0))
    res = LlmAgent(cfg_for(ep.url)).consult(graph, matches, ARCH, POLICY)
    assert res.answer_used and res.requests == 2 and len(ep.requests) == 2 and res.matches[0] == matches[1]


def test_5xx_past_the_retries(endpoint, block):
    graph, matches = block
    ep = endpoint(*[(503, {"error": "down"}, 0)] * 3)
    res = LlmAgent(cfg_for(ep.url, max_retries=2)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, "HTTP 503")
    assert len(ep.requests) == 3


def test_timeout_leaves_the_rules_ranking(endpoint, block):
    graph, matches = block
    ep = endpoint((200, answer(ranking=["m1"]), 2.0))
    res = LlmAgent(cfg_for(ep.url, timeout_s=0.4)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, "timed out")
    assert ep.requests and not ep.answered, "the agent gave up before the server answered (no wall-time bound)"


def test_endpoint_down_leaves_the_rules_ranking(block):
    graph, matches = block
    res = LlmAgent(cfg_for(closed_port_url(), max_retries=1)).consult(graph, matches, ARCH, POLICY)
    rules_stand(res, matches, "cannot connect")
    assert res.requests == 0


def test_missing_endpoint_is_a_user_error_up_front(monkeypatch, tmp_path):
    from fact_ray import farm

    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        make_ranker("rank", Settings(llm="rank", llm_model="m"))
    with pytest.raises(ConfigError, match="--llm-model"):
        make_ranker("propose", Settings(llm="propose"), env={"OPENAI_BASE_URL": "http://x/v1",
                                                             "OPENAI_API_KEY": "k"})
    # the farm checks before Ray, tracking or the table are touched
    s = Settings(home=str(tmp_path / "home"), llm="rank", llm_model="m")
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        farm.run(str(MODELS / "farm_tiny.py"), s, track=False)
    assert not (tmp_path / "home").exists()
    assert make_ranker("off").name == "rules"


def test_token_cap_per_request_and_per_run(endpoint, block):
    graph, matches = block
    ep = endpoint((200, answer(ranking=["m0"]), 0))
    agent = LlmAgent(cfg_for(ep.url, max_tokens=512))
    res = agent.consult(graph, matches, ARCH, POLICY)
    assert res.answer_used and ep.requests[0]["body"]["max_tokens"] == 512

    # a budget just above the prompt: the request asks only for what is left
    from fact_ray.actors.llm_agent import build_messages

    prompt = estimate_tokens(build_messages(agent.cfg, graph, matches, ARCH, POLICY, []))
    ep2 = endpoint((200, answer(ranking=["m0"]), 0))
    LlmAgent(cfg_for(ep2.url, max_tokens=4096, token_budget=prompt + 300)).consult(graph, matches, ARCH, POLICY)
    assert ep2.requests[0]["body"]["max_tokens"] == 300

    # no room at all: nothing is sent
    ep3 = endpoint((200, answer(ranking=["m0"]), 0))
    res = LlmAgent(cfg_for(ep3.url, token_budget=prompt // 2)).consult(graph, matches, ARCH, POLICY)
    assert not ep3.requests and list(res.matches) == list(matches) and "per-run cap" in res.notes[0]

    # an endpoint that ignores max_tokens and blows the budget: its answer is not used
    ep4 = endpoint((200, answer(ranking=["m1"]), 0,
                    {"prompt_tokens": prompt, "completion_tokens": 5000, "total_tokens": prompt + 5000}))
    res = LlmAgent(cfg_for(ep4.url, token_budget=prompt + 100, max_tokens=64)).consult(graph, matches, ARCH,
                                                                                        POLICY)
    assert list(res.matches) == list(matches) and "over the per-run cap" in res.notes[0]


# --------------------------------------------------------------------------------------------- proposals


@pytest.mark.parametrize("over,fragment", [
    ({"nodes": ["einsum", "no_such_node"]}, "unknown node name"),
    ({"family": "conv2d"}, "unknown kernel family"),
    ({"params": {"M": 64, "N": 128, "K": 128, "layout_b": "row"}}, "disagree with the graph"),
    ({"params": {"M": 64, "N": 256, "K": 128, "layout_b": "col"}}, "disagree with the graph"),
    ({"operands": {"a": "p_w", "b": "p_w"}}, "disagree with the graph"),
    ({"name": "linear_bias"}, "already taken"),
    ({"nodes": ["einsum", "relu"], "anchor": "einsum"}, "used outside the subgraph"),
])
def test_bad_rule_proposals_are_rejected_without_compiling(einsum, tmp_path, over, fragment):
    graph, matches = einsum
    r = einsum_rule(**over)
    p = RuleProposal(r["name"], r["family"], tuple(r["nodes"]), r["anchor"], tuple(r["operands"].items()),
                     tuple(r["params"].items()))
    # nvcc does not exist: a compile attempt would raise NotAvailable, so a verdict proves none was made
    v = vet_proposal(p, graph, ARCH, POLICY, str(tmp_path), matched=matches, known_rules=["linear_bias"],
                     nvcc="/nonexistent/nvcc")
    assert not v.accepted and fragment in v.reason and v.match is None


def test_already_matched_nodes_are_rejected(block):
    graph, matches = block
    p = RuleProposal("again", "gemm_bias", ("linear",), "linear",
                     (("a", "layer_norm"), ("b", "p_c_attn_weight"), ("bias", "p_c_attn_bias")),
                     (("K", 32), ("M", 16), ("N", 96)))
    with pytest.raises(CannotImplement, match="already matched"):
        proposal_match(p, graph, matches)
    assert proposal_match(p, graph, [m for m in matches if "linear" not in m.nodes]).param("N") == 96


def test_hints_are_vetted_against_the_search_space(endpoint, block, tmp_path):
    from fact_ray.farm import _Pattern, _plan_pattern

    graph, matches = block
    cands = candidate_configs(matches, ARCH, POLICY, per_match=6)
    # the match with the widest space: the shape pruning of the search space leaves tiny GEMMs few configs
    mid = max(cands, key=lambda k: len(cands[k]))
    assert len(cands[mid]) >= 5, cands
    good = cands[mid][4]
    ep = endpoint((200, answer(ranking=[], hints=[{"match": mid, "configs": [good]},
                                                  {"match": mid, "configs": ["not_a_config_of_ours"]}]), 0))
    res = LlmAgent(cfg_for(ep.url, mode="propose")).consult(graph, matches, ARCH, POLICY)
    assert res.answer_used and [p.accepted for p in res.proposals] == [True, False]
    assert "not_a_config_of_ours" in res.proposals[1].reason
    match = matches[int(mid[1:])]
    assert res.hints == ((match.key, (good,)),)
    user = json.loads(ep.requests[0]["body"]["messages"][1]["content"])
    assert good in user["config_candidates"][mid]
    # the farm puts the hinted config first, the space's order after it
    p = _Pattern(1, match)
    _plan_pattern(p, POLICY, ARCH, 4, res.hints[0][1])
    assert [c.name for c in p.configs] == [good, *[n for n in cands[mid] if n != good][:3]]


@pytest.mark.nvcc
@pytest.mark.slow
def test_useful_rule_proposal_compiles_and_is_accepted(endpoint, einsum, tmp_path):
    graph, matches = einsum
    assert matches == []  # the rules do not know einsum: an unmatched GEMM
    ep = endpoint((200, answer(ranking=[], rules=[
        einsum_rule(why="einsum bk,kn->bn is a plain GEMM"),
        einsum_rule(name="twice"),  # the same nodes again: already matched by the first
    ]), 0))
    cfg = cfg_for(ep.url, mode="propose", nvcc="nvcc", cache_dir=str(tmp_path / "cache"))
    res = LlmAgent(cfg).consult(graph, matches, ARCH, POLICY)
    assert res.answer_used and [o.accepted for o in res.proposals] == [True, False], res.proposals
    assert "compiled" in res.proposals[0].reason and "already matched" in res.proposals[1].reason
    (m,) = res.matches
    assert (m.rule, m.family, m.nodes, m.dtype) == ("einsum_gemm", "gemm", ("einsum",), "float32")
    assert m.param("layout_b") == "row" and m.shapes == ((64, 128), (128, 256)) and m.flops == 2 * 64 * 256 * 128
    assert m.share > 0 and res.proposals[0].match_key == m.key
    assert any((tmp_path / "cache").rglob("*.so"))


# --------------------------------------------------------------------------------------------- tracking


def test_agent_report_is_logged_to_mlflow(endpoint, block, tmp_path, tmp_tracking_uri):
    from mlflow.tracking import MlflowClient

    from fact_ray.events import RunFinished, RunStarted
    from fact_ray.farm import _agent_report
    from fact_ray.tracking import MlflowListener

    graph, matches = block
    ep = endpoint((200, answer(ranking=["m1"]), 0))
    disc = rank_matches(make_ranker("rank", config=cfg_for(ep.url)), graph, matches, ARCH, POLICY, "export")
    assert isinstance(disc, Discovery)
    ev = _agent_report(disc, "rank", "test-model")
    assert (ev.moves, ev.used, ev.prompt_tokens + ev.completion_tokens) == (2, True, 940)

    uri = tmp_tracking_uri
    lst = MlflowListener(uri)
    lst.on_event(RunStarted.make(run_id="r1", model_name=graph.model_name, model_hash="h", policy=POLICY,
                                 arch=ARCH, gpu="", budget=2))
    lst.on_event(ev)
    lst.on_event(RunFinished.make(status="ok", seconds=1.0))
    run = MlflowClient(uri).get_run(lst.parent_run_id)
    assert run.data.params["llm.mode"] == "rank" and run.data.params["llm.model"] == "test-model"
    assert run.data.metrics["llm_tokens"] == 940 and run.data.metrics["llm_moves"] == 2
    assert run.data.tags["fact_ray.llm_used"] == "true"
    agent = json.loads(Path(MlflowClient(uri).download_artifacts(lst.parent_run_id, "agent.json",
                                                                 str(tmp_path))).read_text())
    assert agent["ranker"] == "llm-rank:test-model" and len(agent["moves"]) == 2 and agent["answer_used"]


def test_cli_discover_llm_rank_prints_what_the_agent_changed(endpoint, block):
    """`fact-ray discover --llm rank` end to end: the real CLI, the real openai client, a local endpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    graph, matches = block
    ep = endpoint((200, answer(ranking=[match_id(2), match_id(0)], why="attention first"), 0))
    env = {**os.environ, "OPENAI_BASE_URL": ep.url, "OPENAI_API_KEY": "EMPTY", "COLUMNS": "200"}
    r = subprocess.run([str(Path(sys.executable).parent / "fact-ray"), "discover", str(MODELS / "small_block.py"),
                        "--llm", "rank", "--llm-model", "test-model"], capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    assert "moved against the rules' ranking" in r.stdout
    assert ep.requests and ep.requests[0]["body"]["model"] == "test-model"
    # the agent's first pick leads the printed ranking
    first_row = next(line for line in r.stdout.splitlines() if line.startswith("│ 1 "))
    assert matches[2].rule in first_row


@pytest.mark.nvcc
@pytest.mark.slow
def test_farm_run_with_llm_rank_consults_the_endpoint_and_logs_it(endpoint, tmp_path, tmp_tracking_uri, monkeypatch,
                                                                  session_build_cache):
    """`fact-ray run --llm rank` through the Ray discovery actor: the agent is asked, its report reaches MLflow."""
    from mlflow.tracking import MlflowClient

    from fact_ray import farm
    from fact_ray.config import Settings

    ep = endpoint((200, answer(ranking=[match_id(1), match_id(0)], why="the activation GEMM first"), 0))
    monkeypatch.setenv("OPENAI_BASE_URL", ep.url)
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    s = Settings(home=str(tmp_path / "home"), table_uri=str(tmp_path / "table"),
                 tracking_uri=tmp_tracking_uri, cache_dir=session_build_cache,  # the unit test_farm compiles
                 arch=ARCH, policy=POLICY, budget=1, llm="rank", llm_model="test-model")
    summary = farm.run(str(MODELS / "farm_tiny.py"), s)
    assert summary.exit_code == 0
    assert ep.requests and ep.requests[0]["body"]["model"] == "test-model"
    run = MlflowClient(s.tracking_uri).get_run(summary.mlflow_run_id)
    assert run.data.params.get("llm.mode") == "rank" and run.data.params.get("llm.model") == "test-model"
    assert run.data.metrics.get("llm_tokens", 0) > 0
