"""The LLM discovery agent: ranks the rules' matches and proposes rules and search-space hints, over any
OpenAI-compatible endpoint (`OPENAI_BASE_URL`, `OPENAI_API_KEY`, `--llm-model`).

What it is given: a compact graph summary (ops, shapes, dtypes, estimated time shares), the rule matches, the
rule table, and vetted examples from the pattern table for the same arch and rule families (its own past
winners). What it must answer: one JSON object valid against `ANSWER_SCHEMA`.

The model is advice, never authority. Whatever the endpoint does (malformed or oversized JSON, unknown names,
refusals, timeouts, 429/5xx past the retries, a dead endpoint, a spent token budget), `LlmAgent.consult` returns
the rules' own ranking with one note saying why, and a proposal enters only after `llm_vet` has checked it the
way our own templates are checked. One request per run, bounded by a per-request timeout, an overall deadline,
retries with exponential backoff, `max_tokens` per request, a cap on the HTTP body and a token budget per run.

Deadlines are wall-clock: each attempt runs in a watcher thread that the caller stops waiting for at
min(timeout, what is left of the run's deadline), so a server that trickles a byte at a time cannot extend it
(an HTTP client's read timeout restarts with every byte). The body is read in chunks and refused past
`max_body_bytes`, so a huge answer costs at most that much memory. The call goes through the `openai` client's
streaming-response form, which hands over the body's bytes as they arrive, so that every byte read is ours to count.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from fact_ray.actors.llm_vet import PROPOSABLE_FAMILIES, HintProposal, RuleProposal, vet_hint, vet_proposal
from fact_ray.errors import ConfigError, first_line
from fact_ray.types import Arch, Graph, Match, Precision, TrialStatus, to_jsonable

MODES = ("off", "rank", "propose")

# The answer's schema, as data. Names the model may get wrong (ids, nodes, families, configs) are plain strings
# here and checked by meaning later, so that one bad proposal is rejected with its reason instead of the answer.
_NAME = {"type": "string", "minLength": 1, "maxLength": 120}
_WHY = {"type": "string", "maxLength": 400}
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["ranking"],
    "properties": {
        "ranking": {"type": "array", "maxItems": 500, "items": {"type": "string", "pattern": "^m[0-9]{1,4}$"}},
        "why": _WHY,
        "hints": {"type": "array", "maxItems": 20, "items": {
            "type": "object", "additionalProperties": False, "required": ["match", "configs"],
            "properties": {"match": {"type": "string", "pattern": "^m[0-9]{1,4}$"},
                           "configs": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
                               "type": "string", "minLength": 1, "maxLength": 300}},
                           "why": _WHY}}},
        "rules": {"type": "array", "maxItems": 10, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "family", "nodes", "anchor", "operands", "params"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,47}$"},
                "family": {"type": "string", "maxLength": 40},
                "nodes": {"type": "array", "minItems": 1, "maxItems": 32, "items": _NAME},
                "anchor": _NAME,
                "operands": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                             "properties": {r: _NAME for r in ("a", "b", "bias", "residual")}},
                "params": {"type": "object", "additionalProperties": False, "required": ["M", "N", "K"],
                           "properties": {
                               **{k: {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
                                  for k in ("M", "N", "K", "L")},
                               "layout_a": {"enum": ["row", "col"]}, "layout_b": {"enum": ["row", "col"]},
                               "activation": {"enum": ["none", "relu", "gelu", "gelu_tanh", "silu"]},
                               "broadcast_b": {"type": "boolean"}}},
                "why": _WHY}}},
    },
}


class AgentFailed(Exception):
    """The endpoint's answer cannot be used; the message is the one note the run records."""


@dataclass(frozen=True)
class LlmConfig:
    mode: str  # rank | propose
    model: str
    base_url: str
    api_key: str = field(default="", repr=False)  # never printed, never logged
    timeout_s: float = 60.0  # per request
    deadline_s: float = 180.0  # all requests and backoff of one run together
    max_retries: int = 3  # on 429, 5xx and connection errors
    backoff_s: float = 2.0  # first backoff; doubles per retry
    max_backoff_s: float = 30.0
    max_tokens: int = 2048  # completion tokens per request
    token_budget: int = 24000  # prompt + completion tokens per run
    max_answer_chars: int = 64000
    max_body_bytes: int = 1 << 20  # the whole HTTP body of one answer (or error); past it the answer is refused
    max_graph_nodes: int = 120  # nodes listed in the prompt; the rest are summarised
    examples: int = 6  # vetted examples from the pattern table
    table_uri: str = ""
    cache_dir: str = ".fact-ray/build-cache"
    nvcc: str = "nvcc"


def config_from(llm: str, llm_model: str, *, table_uri: str = "", cache_dir: str = ".fact-ray/build-cache",
                nvcc: str = "nvcc", env: Mapping[str, str] | None = None, **overrides: Any) -> LlmConfig:
    """The agent's settings, or one ConfigError line naming what is missing (checked before a run starts)."""
    env = os.environ if env is None else env
    if llm not in MODES or llm == "off":
        raise ConfigError(f"--llm {llm}: the LLM agent runs with --llm rank or --llm propose")
    base_url = env.get("OPENAI_BASE_URL", "").strip()
    if not base_url:
        raise ConfigError(f"--llm {llm} needs an OpenAI-compatible endpoint: set OPENAI_BASE_URL (e.g. "
                          "http://127.0.0.1:8000/v1) and OPENAI_API_KEY, or run with --llm off")
    if not llm_model:
        raise ConfigError(f"--llm {llm} needs a model name: pass --llm-model (or set FACT_RAY_LLM_MODEL)")
    api_key = env.get("OPENAI_API_KEY", "")
    if not api_key:
        raise ConfigError(f"--llm {llm}: set OPENAI_API_KEY (a local server that ignores keys accepts any "
                          "value, e.g. OPENAI_API_KEY=EMPTY)")
    from fact_ray.redact import check_url

    check_url(base_url, "OPENAI_BASE_URL")
    for name, var in (("timeout_s", "FACT_RAY_LLM_TIMEOUT_S"), ("deadline_s", "FACT_RAY_LLM_DEADLINE_S")):
        raw = env.get(var, "").strip()
        if raw and name not in overrides:
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if not value > 0 or value == float("inf"):
                raise ConfigError(f"{var} must be a positive number of seconds, got {raw[:40]!r}")
            overrides[name] = value
    return LlmConfig(mode=llm, model=llm_model, base_url=base_url, api_key=api_key, table_uri=table_uri,
                     cache_dir=cache_dir, nvcc=nvcc, **overrides)


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Move:
    """A match whose place the agent changed: 1-based ranks before (rules) and after (agent)."""

    match_key: str
    label: str  # rule and anchor, for people
    rules_rank: int
    agent_rank: int


@dataclass(frozen=True)
class ProposalOutcome:
    kind: str  # rule | hint
    summary: str  # what was proposed, in our words (built from validated fields)
    accepted: bool
    reason: str
    match_key: str = ""  # the new match (rule) or the hinted one (hint)


@dataclass(frozen=True)
class AgentResult:
    matches: tuple[Match, ...]  # the final order (rules' order where the agent's answer was not used)
    moves: tuple[Move, ...] = ()
    proposals: tuple[ProposalOutcome, ...] = ()
    hints: tuple[tuple[str, tuple[str, ...]], ...] = ()  # accepted: match key -> config names to try first
    notes: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    requests: int = 0
    answer_used: bool = False  # False: the rules' ranking stands (the notes say why)


# --------------------------------------------------------------------------------------------- prompt


def match_id(i: int) -> str:
    return f"m{i}"


def graph_summary(graph: Graph, matches: Sequence[Match], max_nodes: int = 120) -> dict[str, Any]:
    """Ops, shapes and dtypes of the computations (placeholders summarised), with which match covers each."""
    owner = {n: match_id(i) for i, m in enumerate(matches) for n in m.nodes}
    ops = [n for n in graph.nodes if n.op == "call_function"]
    lines = []
    for n in ops[:max_nodes]:
        refs = [a.name for a in _refs(n.args)]
        shape = "x".join(map(str, n.meta.shape)) if n.meta else "-"
        dtype = n.meta.dtype if n.meta else "-"
        lines.append(f"{n.name} = {n.target}({', '.join(refs)}) -> {shape} {dtype}"
                     + (f" [{owner[n.name]}]" if n.name in owner else ""))
    inputs = [f"{n.name}: {n.kind or n.op} {'x'.join(map(str, n.meta.shape)) if n.meta else '-'} "
              f"{n.meta.dtype if n.meta else ''}".rstrip() for n in graph.nodes if n.op == "placeholder"]
    return {"model": graph.model_name, "inputs": inputs[:max_nodes], "nodes": lines,
            "nodes_left_out": max(0, len(ops) - max_nodes)}


def _refs(args: Any):
    from fact_ray.types import Ref

    for a in args:
        if isinstance(a, Ref):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from _refs(a)


def matches_summary(matches: Sequence[Match]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(matches):
        out.append({"id": match_id(i), "rule": m.rule, "family": m.family, "anchor": m.anchor,
                    "nodes": len(m.nodes), "shapes": m.shape_signature, "dtype": m.dtype,
                    "params": {k: to_jsonable(v) for k, v in m.params if k != "operands"},
                    "est_us": round(m.est_time_s * 1e6, 3), "share": round(m.share, 4)})
    return out


def rule_table() -> list[str]:
    from fact_ray.discover.rules import RULES

    return [f"{r.name}: family {r.family}" for r in RULES]


def retrieve_examples(table_uri: str, arch: Arch, families: Sequence[str], k: int) -> tuple[list[str], str]:
    """The best few verified winners of the pattern table for this arch and these rule families, one line
    each; and a note when the table could not be read ("" otherwise)."""
    if not table_uri or k <= 0:
        return [], ""
    from fact_ray.discover.rules import RULES
    from fact_ray.errors import UserError
    from fact_ray.pattern_table import PatternTable

    family_of = {r.name: r.family for r in RULES}
    try:
        rows = PatternTable(table_uri).all_rows()
    except (UserError, OSError) as e:
        return [], f"pattern table {table_uri} unreadable ({first_line(e, 160)}); no examples given"
    wanted = set(families)
    rows = [r for r in rows if r.arch == Arch(arch) and r.status == TrialStatus.OK and r.config_name != "torch"
            and family_of.get(r.rule) in wanted]
    rows.sort(key=lambda r: -(r.speedup or 0.0))
    lines = [f"{r.rule} shapes {r.shape_signature} {r.dtype} policy {r.policy.value}: {r.config_name} "
             f"{(r.speedup or 0):.2f}x over torch ({r.median_ms or 0:.4f} ms on {r.gpu_name or '?'})"
             for r in rows[:k]]
    return lines, ""


def candidate_configs(matches: Sequence[Match], arch: Arch, policy: Precision, per_match: int = 6
                      ) -> dict[str, list[str]]:
    """The first configs of each GEMM match's search space: the names a hint may choose among."""
    from fact_ray.errors import CannotImplement
    from fact_ray.realize.problem import problem_from_match
    from fact_ray.search_spaces import space

    out = {}
    for i, m in enumerate(matches):
        if m.family not in PROPOSABLE_FAMILIES:
            continue
        try:
            out[match_id(i)] = [c.name for c in space(problem_from_match(m, policy), arch, policy, per_match)]
        except CannotImplement:
            continue
    return out


_SYSTEM = (
    "You rank and extend the patterns of a CUTLASS auto-tuner. Answer with ONE JSON object only, no prose, "
    "matching this JSON schema:\n{schema}\n"
    "ranking: every match id, most worth tuning first (estimated time share is the rules' ranking; move a match "
    "only for a reason). {extra}"
)
_PROPOSE = (
    "hints: for a match, config names (only from the candidates listed) to try first. rules: an UNMATCHED "
    "subgraph (node names from the graph, none already in a match) that computes a GEMM of family "
    + "|".join(PROPOSABLE_FAMILIES) + ", with operands a and b (and bias/residual) named by their input nodes "
    "and params M, N, K, L (batch), layout_a, layout_b ('col' = B stored [N,K]), activation. Propose nothing "
    "you are unsure of."
)


def build_messages(cfg: LlmConfig, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision,
                   examples: Sequence[str]) -> list[dict[str, str]]:
    propose = cfg.mode == "propose"
    system = _SYSTEM.format(schema=json.dumps(ANSWER_SCHEMA, separators=(",", ":")),
                            extra=_PROPOSE if propose else "Give no hints and no rules.")
    user: dict[str, Any] = {
        "arch": Arch(arch).value, "policy": Precision(policy).value,
        "graph": graph_summary(graph, matches, cfg.max_graph_nodes),
        "matches": matches_summary(matches), "rule_table": rule_table(),
        "vetted_examples": list(examples),
    }
    if propose:
        user["config_candidates"] = candidate_configs(matches, arch, policy)
    return [{"role": "system", "content": system},
            {"role": "user", "content": json.dumps(user, separators=(",", ":"))}]


def estimate_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """A conservative count without a tokenizer: about 3 characters a token for JSON-heavy text."""
    return sum(len(m["content"]) for m in messages) // 3 + 8 * len(messages)


# --------------------------------------------------------------------------------------------- the call


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    requests: int


def ask(cfg: LlmConfig, messages: list[dict[str, str]], max_tokens: int) -> Reply:
    """One chat completion, retried with exponential backoff on 429, 5xx and connection errors, within the
    per-request timeout and the run's deadline, both wall-clock. Raises AgentFailed with the reason."""
    import openai  # imported and the client made before the clock starts: a first import takes a second here

    client = openai.OpenAI(base_url=cfg.base_url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout_s)
    t0 = time.monotonic()
    run_end = t0 + cfg.deadline_s
    body = {"model": cfg.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    requests, last = 0, ""
    for attempt in range(cfg.max_retries + 1):
        left = run_end - time.monotonic()
        if left <= 0:
            break
        requests += 1
        limit = min(cfg.timeout_s, left)
        outcome = _within(limit, lambda: _post(cfg, client, body, time.monotonic() + limit))
        if outcome is None:
            if limit < cfg.timeout_s:
                raise AgentFailed(f"LLM endpoint: no answer within the {cfg.deadline_s:g} s deadline")
            raise AgentFailed(f"LLM endpoint timed out after {limit:g} s")
        status, data, headers = outcome
        if status == 200:
            return _reply(data, time.monotonic() - t0, requests)
        if status == -1:
            raise AgentFailed(f"LLM endpoint's answer is oversized (over {cfg.max_body_bytes} bytes)")
        if status == 0:  # no HTTP answer at all
            last = data.decode(errors="replace")
            retry_after = None
        elif status == 429 or status >= 500:
            last, retry_after = f"HTTP {status}", _retry_after(headers)
        else:
            raise AgentFailed(f"LLM endpoint refused the request (HTTP {status})")
        if attempt == cfg.max_retries:
            break
        wait = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** attempt)
        if retry_after is not None:
            wait = min(cfg.max_backoff_s, max(wait, retry_after))
        time.sleep(max(0.0, min(wait, run_end - time.monotonic())))
    if time.monotonic() >= run_end:
        raise AgentFailed(f"LLM endpoint: no answer within the {cfg.deadline_s:g} s deadline ({last})")
    raise AgentFailed(f"LLM endpoint failed after {requests} attempt(s): {last}")


def _within(limit_s: float, fn: Any) -> Any:
    """fn() run in a daemon thread, or None when it has not returned within limit_s (wall clock). The thread
    is left behind; `_post` ends it at its own deadline (checked between reads). What fn raises is raised here."""
    box: list[tuple[bool, Any]] = []

    def target() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller's thread, which decides
            box.append((False, e))

    t = threading.Thread(target=target, name="fact-ray-llm-request", daemon=True)
    t.start()
    t.join(limit_s)
    if not box:
        return None
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _post(cfg: LlmConfig, client: Any, body: dict[str, Any], end: float) -> tuple[int, bytes, Mapping[str, str]]:
    """One chat completion through the `openai` client, its body read in chunks: (status, body, headers);
    (0, reason, {}) when there was no HTTP answer; (-1, b"", {}) when the body passed cfg.max_body_bytes.
    The streaming-response form hands us the bytes as they arrive, so we count them and stop at `end` (the
    client's own timeout restarts with every byte, which is why the caller also watches the wall clock)."""
    import openai

    from fact_ray.redact import redact

    client = client.with_options(timeout=max(0.05, end - time.monotonic()))
    try:
        with client.chat.completions.with_streaming_response.create(**body) as resp:
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                if time.monotonic() > end:
                    return 0, b"the answer was still arriving at the deadline", {}
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    return -1, b"", {}
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks), resp.headers
    except openai.APIStatusError as e:  # an HTTP answer all the same: its status (and Retry-After) decide
        return e.status_code, b"", e.response.headers
    except openai.APIConnectionError as e:  # includes APITimeoutError
        cause = e.__cause__ or e
        return 0, redact(f"cannot connect to {cfg.base_url} ({type(cause).__name__}: {str(cause)[:160]})").encode(), {}
    except (OSError, ValueError) as e:
        return 0, redact(f"cannot connect to {cfg.base_url} ({type(e).__name__}: {str(e)[:160]})").encode(), {}


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        value = float(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def _int(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AgentFailed(f"LLM answer's usage.{what} is not a token count ({str(value)[:40]!r})")
    return value


def _reply(data: bytes, latency: float, requests: int) -> Reply:
    """The chat completion's text and usage from the raw body; AgentFailed for anything malformed."""
    try:
        resp = json.loads(data)
    except (ValueError, RecursionError):
        raise AgentFailed("LLM endpoint answered with a body that is not JSON") from None
    choices = resp.get("choices") if isinstance(resp, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    msg = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(msg, dict):
        raise AgentFailed("LLM answer is not a chat completion (no choices[0].message)")
    if msg.get("refusal"):
        raise AgentFailed("LLM refused to answer")
    text = msg.get("content")
    if not isinstance(text, str):
        raise AgentFailed("LLM answer has no text content")
    usage = resp.get("usage") or {}
    if not isinstance(usage, dict):
        raise AgentFailed("LLM answer's usage is not an object")
    return Reply(text, _int(usage.get("prompt_tokens"), "prompt_tokens"),
                 _int(usage.get("completion_tokens"), "completion_tokens"), latency, requests)


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*)\n\s*```\s*$", re.S)


def parse_answer(text: str, max_chars: int) -> dict[str, Any]:
    """The answer as a dict valid against ANSWER_SCHEMA, or AgentFailed saying what was wrong (one line)."""
    import jsonschema

    if len(text) > max_chars:
        raise AgentFailed(f"LLM answer is oversized ({len(text)} characters, limit {max_chars})")
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        raise AgentFailed("LLM answer was malformed JSON") from None
    try:
        jsonschema.validate(data, ANSWER_SCHEMA)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise AgentFailed(f"LLM answer does not fit the schema at {where[:80]}") from None
    _check_whole_names(data)
    return data


_ID = re.compile(r"m[0-9]{1,4}")
_RULE_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")


def _check_whole_names(data: dict[str, Any]) -> None:
    """The schema's patterns end in `$`, which JSON Schema's Python engine (re.search) lets match before a trailing
    newline: "m1\\n" or "my_rule\\n" would pass it. Ids and rule names must match whole (fullmatch)."""
    names = [("ranking", r, _ID) for r in data.get("ranking", [])]
    names += [("hints/match", h["match"], _ID) for h in data.get("hints", [])]
    names += [("rules/name", r["name"], _RULE_NAME) for r in data.get("rules", [])]
    for where, value, pattern in names:
        if not pattern.fullmatch(value):
            raise AgentFailed(f"LLM answer does not fit the schema at {where} ({value[:40]!r})")


def apply_ranking(matches: Sequence[Match], ranking: Sequence[str]) -> tuple[list[Match], list[Move]]:
    """The agent's order: the ids it listed first, then the rest in the rules' order. Unknown or repeated ids
    make the whole ranking unusable (AgentFailed)."""
    ids = {match_id(i): i for i in range(len(matches))}
    unknown = [r for r in ranking if r not in ids]
    if unknown:
        raise AgentFailed(f"LLM ranking names unknown match id(s) {', '.join(unknown[:5])}")
    if len(set(ranking)) != len(ranking):
        raise AgentFailed("LLM ranking repeats a match id")
    order = [ids[r] for r in ranking] + [i for i in range(len(matches)) if match_id(i) not in set(ranking)]
    moves = [Move(matches[i].key, f"{matches[i].rule} @ {matches[i].anchor}", i + 1, pos + 1)
             for pos, i in enumerate(order) if i != pos]
    return [matches[i] for i in order], moves


# --------------------------------------------------------------------------------------------- the agent


class LlmAgent:
    """One endpoint, one model; `consult` per discovery. Holds no state between runs beyond its settings."""

    def __init__(self, cfg: LlmConfig) -> None:
        self.cfg = cfg
        self.name = f"llm-{cfg.mode}:{cfg.model}"

    def consult(self, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision) -> AgentResult:
        rules_order = tuple(matches)
        notes: list[str] = []
        if not matches and self.cfg.mode == "rank":
            return AgentResult(rules_order, notes=("LLM agent not asked: the rules found no pattern to rank",))
        families = sorted({m.family for m in matches} or set(PROPOSABLE_FAMILIES))
        examples, note = retrieve_examples(self.cfg.table_uri, arch, families, self.cfg.examples)
        if note:
            notes.append(note)
        messages = build_messages(self.cfg, graph, matches, arch, policy, examples)
        prompt_est = estimate_tokens(messages)
        max_tokens = min(self.cfg.max_tokens, self.cfg.token_budget - prompt_est)
        if max_tokens < 64:
            notes.append(f"LLM agent not asked: the prompt (~{prompt_est} tokens) leaves no room under the "
                         f"per-run cap of {self.cfg.token_budget} tokens; the rules' ranking stands")
            return AgentResult(rules_order, notes=tuple(notes))
        try:
            reply = ask(self.cfg, messages, max_tokens)
        except AgentFailed as e:
            notes.append(f"{e}; the rules' ranking stands")
            return AgentResult(rules_order, notes=tuple(notes))
        base = AgentResult(rules_order, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                           latency_s=reply.latency_s, requests=reply.requests)
        used = reply.prompt_tokens + reply.completion_tokens
        if used > self.cfg.token_budget:
            notes.append(f"LLM endpoint used {used} tokens, over the per-run cap of {self.cfg.token_budget}; "
                         "its answer is not used; the rules' ranking stands")
            return replace(base, notes=tuple(notes))
        try:
            answer = parse_answer(reply.text, self.cfg.max_answer_chars)
            order, moves = apply_ranking(matches, answer["ranking"])
        except AgentFailed as e:
            notes.append(f"{e}; the rules' ranking stands")
            return replace(base, notes=tuple(notes))
        outcomes: list[ProposalOutcome] = []
        hints: list[tuple[str, tuple[str, ...]]] = []
        if self.cfg.mode == "propose":
            order = self._proposals(answer, graph, matches, order, arch, policy, outcomes, hints)
        elif answer.get("hints") or answer.get("rules"):
            notes.append("LLM proposals ignored: --llm rank only re-ranks (use --llm propose)")
        return replace(base, matches=tuple(order), moves=tuple(moves), proposals=tuple(outcomes),
                       hints=tuple(hints), notes=tuple(notes), answer_used=True)

    def _proposals(self, answer: dict[str, Any], graph: Graph, matches: Sequence[Match], order: list[Match],
                   arch: Arch, policy: Precision, outcomes: list[ProposalOutcome],
                   hints: list[tuple[str, tuple[str, ...]]]) -> list[Match]:
        from fact_ray.discover.cost import estimate
        from fact_ray.discover.rules import RULES

        for h in answer.get("hints", []):
            idx = int(h["match"][1:])
            if idx >= len(matches):
                outcomes.append(ProposalOutcome("hint", f"hint for unknown match {h['match']}", False,
                                                "rejected: unknown match id"))
                continue
            m = matches[idx]
            hint = HintProposal(m.key, f"#{idx + 1} {m.rule} @ {m.anchor}", tuple(dict.fromkeys(h["configs"])),
                                h.get("why", ""))
            v = vet_hint(hint, m, arch, policy)
            outcomes.append(ProposalOutcome("hint", hint.summary, v.accepted, v.reason, m.key))
            if v.accepted:
                hints.append((m.key, hint.configs))
        accepted: list[Match] = []
        for r in answer.get("rules", []):
            p = RuleProposal(name=r["name"], family=r["family"], nodes=tuple(dict.fromkeys(r["nodes"])),
                             anchor=r["anchor"], operands=tuple(sorted(r["operands"].items())),
                             params=tuple(sorted(r["params"].items())), why=r.get("why", ""))
            v = vet_proposal(p, graph, arch, policy, self.cfg.cache_dir, matched=[*matches, *accepted],
                             known_rules=[x.name for x in RULES] + [a.rule for a in accepted], nvcc=self.cfg.nvcc)
            key = v.match.key if v.match is not None else ""
            outcomes.append(ProposalOutcome("rule", p.summary, v.accepted, v.reason, key))
            if v.accepted and v.match is not None:
                accepted.append(v.match)
        if not accepted:
            return order
        # Costed with the rules' model alongside the existing matches; they join after the agent's order.
        costed = {m.key: m for m in estimate(graph, [*matches, *accepted], arch, policy)}
        return [*(costed.get(m.key, m) for m in order), *(costed[m.key] for m in accepted)]


class LlmRanker:
    """The `Ranker` face of the agent: `rank` returns the order; `consult` the whole result."""

    def __init__(self, cfg: LlmConfig) -> None:
        self.agent = LlmAgent(cfg)
        self.name = self.agent.name

    def consult(self, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision) -> AgentResult:
        return self.agent.consult(graph, matches, arch, policy)

    def rank(self, graph: Graph, matches: Sequence[Match], arch: Arch, policy: Precision) -> list[Match]:
        return list(self.consult(graph, matches, arch, policy).matches)


# --------------------------------------------------------------------------------------------- reporting


def agent_report_json(d: Any) -> str:
    """What the agent did in a Discovery, as JSON text (the MLflow artifact agent.json)."""
    return json.dumps({
        "ranker": d.ranker, "moves": to_jsonable(list(d.moves)), "proposals": to_jsonable(list(d.proposals)),
        "hints": [[k, list(v)] for k, v in d.hints], "notes": list(d.agent_notes),
        "prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens, "latency_s": d.latency_s,
        "requests": d.requests, "answer_used": d.answer_used,
    }, indent=1, sort_keys=True)


def format_agent_changes(discovery: Any):
    """What the agent changed against the rules' ranking, for `fact-ray discover --llm rank`: moves, proposals
    with their verdicts, notes, tokens and latency. The model's words are shown as plain text (no markup)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(f"LLM agent ({discovery.ranker}): {discovery.prompt_tokens} prompt + "
                             f"{discovery.completion_tokens} completion tokens, {discovery.latency_s:.2f} s, "
                             f"{discovery.requests} request(s)")]
    if discovery.moves:
        t = Table(title="moved against the rules' ranking")
        for col in ("pattern", "rules", "agent"):
            t.add_column(col)
        for mv in discovery.moves:
            t.add_row(Text(mv.label), str(mv.rules_rank), str(mv.agent_rank))
        parts.append(t)
    else:
        parts.append(Text("ranking: unchanged from the rules'"))
    if discovery.proposals:
        t = Table(title="proposals")
        for col in ("kind", "proposal", "verdict"):
            t.add_column(col)
        for p in discovery.proposals:
            t.add_row(p.kind, Text(_printable(p.summary)), Text(_printable(p.reason),
                                                                 style="green" if p.accepted else "red"))
        parts.append(t)
    for n in discovery.agent_notes:
        parts.append(Text("note: " + _printable(n), style="yellow"))
    return Group(*parts)


def _printable(s: str, limit: int = 300) -> str:
    s = "".join(c if c.isprintable() else " " for c in s)
    return s if len(s) <= limit else s[:limit - 1] + "…"
