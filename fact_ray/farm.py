"""The farm: one `fact-ray run` driven across a Ray cluster.

    preflight        Ray address answers, tracking store reachable, pattern table writable: before any work,
                     so a bad setting costs seconds and writes nothing
    discover         a DiscoveryAgent actor captures the model and ranks its patterns
    table            a pattern with a valid winner for the same key (match, policy, arch, toolchain) is served
                     from the table: no compile, no trial (unless retune)
    compile          every translation unit of every remaining pattern at once, as CPU tasks
    trials           one candidate per call on GPU trial workers (one per GPU, time limit, replaced on crash);
                     without a GPU in the cluster the run says so and stops after compiling, writing no winners
    select + commit  the fastest verified candidate or the PyTorch op, committed by the one table writer

Everything a person or MLflow sees comes from events (fact_ray.events) sent to the listeners; `run` returns a
`RunSummary` for the caller to print (`format_summary`) or serialise (`to_jsonable`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from fact_ray.config import Settings
from fact_ray.errors import CannotImplement, ModelNotFound, first_line
from fact_ray.events import (
    AgentReport,
    Broadcaster,
    CompileFinished,
    Listener,
    PatternFinished,
    PatternStarted,
    RunFinished,
    RunStarted,
    TrialFinished,
)
from fact_ray.discover.rules import GEMM_FAMILIES  # the one list of GEMM pattern families (SwiGLU included)
from fact_ray.realize import family as families  # no torch: the registry loads families' modules, not torch
from fact_ray.realize.attention_family import AttentionFamily
from fact_ray.realize.norm_family import NormFamily
from fact_ray.types import Arch, Match, Precision, Source, Trial, TrialStatus, Winner, freeze

if TYPE_CHECKING:
    from fact_ray.actors.discovery import Discovery
    from fact_ray.pattern_table import PatternTable
    from fact_ray.toolchain import Host, Toolchain

log = logging.getLogger("fact_ray.farm")
_UNSET = object()  # a ranker not chosen yet (None is a choice: the analytic prior)

# The match families of the built-in fused kernel families (reports and tests group patterns by them; what the farm
# realizes is whatever the registry serves).
FUSED_FAMILIES = (*AttentionFamily.serves, *NormFamily.serves)

# PatternSummary.status values
TUNED = "tuned"
FROM_TABLE = "from table"
NO_GPU = "no GPU"
NOT_REALIZABLE = "not realizable yet"


# --------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class PatternSummary:
    index: int  # 1-based rank
    rule: str
    family: str
    match_key: str
    shapes: str
    dtype: str
    share: float
    status: str  # tuned | from table | no GPU | not realizable yet
    winner: str = ""  # config name, "torch" (the PyTorch op stays) or "" (none selected)
    speedup: float = math.nan
    time_ms: float = math.nan
    baseline_ms: float = math.nan
    configs: int = 0  # candidates in the search space (within the budget)
    compiles: int = 0  # translation units
    compile_failures: int = 0
    trials: int = 0  # candidate trials run (the PyTorch op not counted)
    failures: int = 0  # candidate trials that failed (compile_error, wrong, crashed, timeout, ...)
    same_as: int = 0  # rank of an earlier pattern with the same key, whose result this one shares; 0: none
    reason: str = ""


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    model_name: str
    model_hash: str
    policy: Precision
    arch: Arch
    gpu: str  # "" without a GPU
    gpus: int
    patterns: tuple[PatternSummary, ...]
    compiled: int  # translation units built (cache hits included)
    compile_failed: int  # failed to compile (a result, with its log)
    compile_lost: int  # could not finish on any node
    cached: int  # served from the build cache
    trials: int
    seconds: float
    toolchain: Toolchain
    notes: tuple[str, ...] = ()
    table_commits: tuple[str, ...] = ()
    listener_failures: tuple[str, ...] = ()
    mlflow_run_id: str = ""
    phases: tuple[tuple[str, float], ...] = ()  # (step, seconds) in order: where the run's time went

    @property
    def exit_code(self) -> int:
        """0, or 1 when the run's record is incomplete (a listener such as MLflow failed) or nothing could be
        compiled at all (every translation unit failed: a toolchain problem, not a bad candidate)."""
        attempted = self.compiled + self.compile_failed + self.compile_lost
        if self.listener_failures or (attempted and not self.compiled):
            return 1
        return 0

    def rows(self) -> list[dict[str, Any]]:
        return [_row(p) for p in self.patterns]


def _row(p: PatternSummary) -> dict[str, Any]:
    return {"#": p.index, "rule": p.rule, "shapes": p.shapes, "dtype": p.dtype, "status": p.status,
            "winner": p.winner, "speedup": None if math.isnan(p.speedup) else round(p.speedup, 4),
            "time_ms": None if math.isnan(p.time_ms) else p.time_ms,
            "baseline_ms": None if math.isnan(p.baseline_ms) else p.baseline_ms,
            "compiles": p.compiles, "compile_failures": p.compile_failures, "trials": p.trials,
            "failures": p.failures, "reason": p.reason, "match_key": p.match_key}


def format_summary(summary: RunSummary):
    """The end-of-run table: per pattern rule, shapes, status, winner, speedup."""
    from rich.table import Table

    gpu = summary.gpu or "no GPU"
    table = Table(title=f"{summary.model_name}  {summary.policy.value} {summary.arch.value}  {gpu}  "
                        f"({summary.seconds:.0f} s)")
    for col, kw in (("#", {"justify": "right"}), ("rule", {}), ("shapes", {"overflow": "fold"}), ("status", {}),
                    ("winner", {"overflow": "fold"}), ("speedup", {"justify": "right"}),
                    ("TUs", {"justify": "right"}), ("trials", {"justify": "right"}), ("note", {"overflow": "fold"})):
        table.add_column(col, **kw)
    style = {TUNED: "green", FROM_TABLE: "cyan", NO_GPU: "yellow", NOT_REALIZABLE: "dim"}
    for p in summary.patterns:
        sp = "-" if math.isnan(p.speedup) else f"{p.speedup:.2f}x"
        tus = f"{p.compiles - p.compile_failures}/{p.compiles}" if p.compiles else "-"
        trials = f"{p.trials - p.failures}/{p.trials}" if p.trials else "-"
        note = p.reason or (f"same as #{p.same_as}" if p.same_as else "")
        table.add_row(str(p.index), p.rule, p.shapes, f"[{style.get(p.status, '')}]{p.status}[/]", p.winner or "-",
                      sp, tus, trials, note)
    return table


def summary_text(summary: RunSummary) -> str:
    from fact_ray.progress import plain_text

    lines = list(summary.notes)
    if summary.phases:
        lines.append("time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in summary.phases))
    return plain_text(format_summary(summary), lines)


# --------------------------------------------------------------------------------------------- per pattern


@dataclass
class _Pattern:
    """Driver-side state of one tuning problem (one match key; later matches with the same key share it)."""

    index: int
    match: Match
    status: str = ""
    reason: str = ""
    plan: Any = None  # fact_ray.realize.pipeline.Plan
    compiles: list[Any] = field(default_factory=list)  # CompileOutcome
    trials: list[Trial] = field(default_factory=list)  # candidates
    step: int = 0
    winner: Winner | None = None
    from_table: bool = False
    duplicates: list[tuple[int, Match]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.match.key

    @property
    def configs(self) -> tuple[Any, ...]:
        return self.plan.configs if self.plan is not None else ()

    @property
    def sources(self) -> tuple[Source, ...]:
        return self.plan.sources if self.plan is not None else ()


def _plan_pattern(p: _Pattern, policy: Precision, arch: Arch, budget: int, hinted: Sequence[str] = (),
                  banned: frozenset[str] = frozenset(), ranker: Any = None) -> None:
    """The pipeline's plan of one pattern (problem -> candidates -> translation units), in the driver: pure
    functions, no GPU. `hinted`: config names to try first (the incumbent, then those the LLM agent asked for,
    vetted: each is in this problem's space); they lead the candidates, the family's own order fills the rest of
    the budget. `banned`: config names the table invalidated for this key, never tried again."""
    from fact_ray.realize import pipeline

    try:
        p.plan = pipeline.plan(p.match, policy, arch, budget, hinted, banned, ranker)
    except CannotImplement as e:
        p.status, p.reason = NOT_REALIZABLE, f"{e}; the PyTorch op stays"


def _agent_report(disc: Any, mode: str, model: str) -> AgentReport:
    """The farm event for what the LLM agent did in discovery (MLflow logs it; see tracking.py)."""
    from fact_ray.actors.llm_agent import agent_report_json

    accepted = sum(p.accepted for p in disc.proposals)
    return AgentReport(mode=mode, model=model, prompt_tokens=disc.prompt_tokens,
                       completion_tokens=disc.completion_tokens, latency_s=disc.latency_s, requests=disc.requests,
                       moves=len(disc.moves), accepted=accepted, rejected=len(disc.proposals) - accepted,
                       used=disc.answer_used,
                       notes=tuple(disc.agent_notes), detail_json=agent_report_json(disc))


def _excerpt(log: str, lines: int = 40) -> str:
    ls = log.splitlines()
    errs = [i for i, ln in enumerate(ls) if "error" in ln.lower()]
    if len(ls) <= lines:
        return log
    start = max(0, (errs[0] if errs else 0) - 5)
    return "\n".join(ls[start:start + lines])


# --------------------------------------------------------------------------------------------- the run


def run(ref: str, settings: Settings, listeners: Iterable[Listener] = (), *, retune: bool = False,
        track: bool = True, fresh_since: datetime | None = None, only_incumbent: bool = False,
        retune_keys: frozenset[str] | None = None) -> RunSummary:
    """Capture, discover, compile and tune `ref` on Ray; record winners in the table and the run in MLflow.

    `listeners` get every farm event (the console progress is one); with `track` an MlflowListener for
    `settings.resolved_tracking_uri` is added. User errors (unreachable Ray/tracking, unwritable table, a bad
    model, no nvcc) raise as one-line `UserError`s, before anything is written where they can be checked first.
    `fresh_since` (the fleet's night start): a re-tune serves the rows written since then; `only_incumbent`: a
    re-tune measures each key's incumbent alone (a night's first phase); `retune_keys`: only these keys are
    re-tuned, the others served (see `_plan`).
    """
    from fact_ray.actors.discovery import make_ranker
    from fact_ray.pattern_table import PatternTable

    t0 = time.monotonic()
    make_ranker(settings.llm, settings)  # a missing endpoint/model for --llm fails here, before anything starts
    _check_model_path(ref)
    if settings.ray_address:
        from fact_ray.actors import cluster

        cluster.probe(settings.ray_address)
    mlflow_listener = None
    if track:
        from fact_ray.tracking import MlflowListener, check_reachable

        check_reachable(settings.resolved_tracking_uri)
    table = PatternTable(settings.resolved_table_uri)
    table.check_writable()
    early: list[tuple[str, float]] = []  # where the seconds before the driver went (the summary's "time:")

    def lap(name: str) -> None:
        early.append((name, time.monotonic() - t0 - sum(s for _, s in early)))

    lap("checks")
    # The MLflow store takes seconds to open (imports, schema check): it opens in a thread while discovery runs.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fact-ray-mlflow") as opener:
        opening = opener.submit(MlflowListener, settings.resolved_tracking_uri, check=False) if track else None
        # A local run against a table that may already hold this model's winners first discovers in this
        # process: when the table serves every pattern, Ray (seconds to start and stop, a worker per GPU) is
        # not needed.
        pre = _setup_here(ref, settings) if not (settings.ray_address or retune or table.is_empty()) else None
        if pre is not None:
            lap("capture here")
        mlflow_listener = opening.result() if opening is not None else None
        if pre is not None:
            lap("wait for MLflow")
    bus = Broadcaster([*listeners, *([mlflow_listener] if mlflow_listener else [])])
    night = _Night(fresh_since, only_incumbent, retune_keys)
    planned = None  # (patterns, the ones to tune): planned once, here, when discovery ran in this process
    if pre is not None:
        patterns = _patterns_of(pre.disc.matches)
        planned = (patterns, _plan(patterns, table, settings.policy, pre.arch, pre.toolchain,
                                   settings.budget, pre.disc, retune, _host_env(pre), night, settings.ranker))
        if not planned[1]:
            return _finish_run(_Driver(ref, settings, bus, table, retune, t0, pre=pre, on_ray=False, early=early,
                                       night=night, planned=planned).go(), mlflow_listener)
    if settings.llm != "off":
        pre = planned = None  # the agent ranks the matches in its actor, on the Ray path
    from fact_ray.actors import cluster  # here, not above: a run the table serves whole never imports Ray

    conn = cluster.connect(settings.ray_address)
    try:
        driver = _Driver(ref, settings, bus, table, retune, t0, pre=pre, night=night, planned=planned)
        summary = driver.go()
    finally:
        cluster.disconnect(conn)
    return _finish_run(summary, mlflow_listener)


def _finish_run(summary: RunSummary, mlflow_listener: Any) -> RunSummary:
    if mlflow_listener is not None and mlflow_listener.parent_run_id:
        summary = _with(summary, mlflow_run_id=mlflow_listener.parent_run_id)
    return summary


def _check_model_path(ref: str) -> None:
    """A model file that is not there fails in a second, not after Ray has started (capture checks the rest)."""
    from fact_ray.shapes import split_ref

    ref = split_ref(ref)[0]  # a shape bucket's reference names the same file
    looks_like_file = ref.endswith(".py") or os.sep in ref
    if looks_like_file and not Path(ref).exists():
        raise ModelNotFound(f"{ref}: no such file (give a KernelBench-format .py file, or pkg.module:factory)")


def _with(summary: RunSummary, **kw: Any) -> RunSummary:
    from dataclasses import replace

    return replace(summary, **kw)


@dataclass(frozen=True)
class _Setup:
    """What the run knows before it looks at the table: the ranked matches, the target and the toolchain."""

    disc: Discovery
    arch: Arch
    toolchain: Toolchain  # the table key's part, key_toolchain(facts)
    facts: Host  # what built and times the kernels (recorded with every row and in the run's record)
    gpu_name: str = ""
    host: str = ""
    gpus: int = 0
    ray_version: str = ""


def _host_env(setup: _Setup) -> dict[str, str]:
    """The environment facts of the GPU that measures (nightly.ENV_FACTS names), from the detected host: a winner
    recorded under another driver, cuBLAS or cuDNN is re-verified here before it is served."""
    f, tc = setup.facts, setup.toolchain
    return {"gpu_name": setup.gpu_name, "driver": f.driver, "cublas": f.cublas, "cudnn": f.cudnn,
            "torch": tc.torch, "cuda": tc.cuda, "cutlass": tc.cutlass}


def _patterns_of(matches: Sequence[Match]) -> list[_Pattern]:
    """One tuning problem per match key; later matches with the same key share its result."""
    patterns: list[_Pattern] = []
    by_key: dict[str, _Pattern] = {}
    for i, m in enumerate(matches):
        if m.key in by_key:
            by_key[m.key].duplicates.append((i + 1, m))
            continue
        by_key[m.key] = _Pattern(i + 1, m)
        patterns.append(by_key[m.key])
    return patterns


@dataclass(frozen=True)
class _Night:
    """How a fleet's night re-tunes (fact_ray.fleet): rows written since `fresh_since` are tonight's and served;
    `only_incumbent` measures each key's incumbent alone; `retune_keys` limits the re-tune to these keys."""

    fresh_since: datetime | None = None
    only_incumbent: bool = False
    retune_keys: frozenset[str] | None = None


def _ranker(table: PatternTable, kind: str, policy: Precision, arch: Arch) -> Any:
    """The model that orders GEMM spaces in this run (search_spaces.rankers), trained on the table's timed trials
    when it is a learned one; which, and why, goes to the log once."""
    from fact_ray.search_spaces import learned, rankers

    history = learned.samples_from_rows(table.all_rows()) if kind in ("auto", "learned") else ()
    ranker, why = rankers.choose(kind, policy, arch, history)
    log.info("%s", why)
    return ranker


def _plan(patterns: list[_Pattern], table: PatternTable, policy: Precision, arch: Arch, toolchain: Toolchain,
          budget: int, disc: Discovery, retune: bool, host_env: dict[str, str] | None = None,
          night: _Night | None = None, ranker_kind: str = "heuristic") -> list[_Pattern]:
    """Serve what the table has (status FROM_TABLE), mark what no template realizes (NOT_REALIZABLE), plan the
    rest: the patterns that need compiles and trials.

    The incumbent (the key's current winner) leads its pattern's candidates, so a re-tune re-measures it first;
    kernels the table invalidated are never candidates again. A winner whose recorded environment differs from
    `host_env` (driver, cuBLAS, GPU model, ...: `nightly.environment_drift`) is not served as is: only it is planned,
    to be re-verified here. `night` (a fleet's re-tune): see `_Night`."""
    from fact_ray.nightly import environment_drift, warm_start
    from fact_ray.pattern_table import TableKey
    from fact_ray.pattern_table.truth import invalidated

    host_env = host_env or {}
    night = night or _Night()
    todo: list[_Pattern] = []
    ranker: Any = _UNSET
    for p in patterns:
        row, banned, drift = None, frozenset(), ()
        wanted = retune and (night.retune_keys is None or p.key in night.retune_keys)
        if families.for_match(p.match) is not None:
            key = TableKey.of(p.key, policy, arch, toolchain)
            here = TableKey.of(p.key, policy, arch, toolchain, host_env.get("gpu_name") or None)
            # This GPU model's own winner first: one measured elsewhere is re-verified here, once.
            row = table.best(here) or table.best(key)
            banned = invalidated(table.history(key))
            if row is not None and row.valid:
                drift = environment_drift(row, host_env)
                fresh = night.fresh_since is not None and row.created_at >= night.fresh_since
                if (not wanted or fresh) and not drift:
                    p.status, p.from_table, p.winner = FROM_TABLE, True, row.to_winner()
                    continue
        first = warm_start(row if row is not None and row.valid else None)
        if ranker is _UNSET:  # trained once, and only when some pattern is planned (a served run reads no history)
            ranker = _ranker(table, ranker_kind, policy, arch)
        _plan_pattern(p, policy, arch, budget, (*first, *disc.hinted(p.key)), banned, ranker)
        if first and p.status != NOT_REALIZABLE and ((drift and not wanted) or (wanted and night.only_incumbent)):
            # The incumbent alone (the PyTorch op is always timed beside it): a re-verification, or a night's
            # first phase.
            p.plan = p.plan.only(first[0])
            p.reason = ("re-verified: " + "; ".join(drift)) if drift else "incumbent re-measured"
        if p.status != NOT_REALIZABLE:
            todo.append(p)
    return todo


def _setup_here(ref: str, settings: Settings) -> _Setup | None:
    """Discovery in this process, for the local GPU: a run whose every pattern the table already serves needs no
    Ray, no workers and no compiles, and finishes in seconds. None when this machine has no CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from fact_ray.actors.discovery import make_ranker, rank_matches
    from fact_ray.capture import load_model, under_policy
    from fact_ray.capture_cache import captured
    from fact_ray.discover import discover
    from fact_ray.toolchain import detect, key_toolchain, target_arch

    policy = settings.policy
    facts = detect(settings.nvcc)
    arch = target_arch(settings.arch, facts.capability, facts.gpu_name)
    # The graph from the capture cache when the model's code, inputs and toolchain are unchanged (see there).
    cap, _ = captured(under_policy(load_model(ref), policy), Path(settings.home) / "captures")
    matches = discover(cap.graph, arch, policy)
    disc = rank_matches(make_ranker("off", settings), cap.graph, matches, arch, policy, cap.method, cap.notes)
    return _Setup(disc=disc, arch=arch, toolchain=key_toolchain(facts), facts=facts, gpu_name=facts.gpu_name,
                  host=socket.gethostname(), gpus=torch.cuda.device_count())


class _Driver:
    """One run's orchestration. Holds the Ray handles; `go` always ends them."""

    def __init__(self, ref: str, settings: Settings, bus: Broadcaster, table: Any, retune: bool, t0: float,
                 pre: _Setup | None = None, on_ray: bool = True, early: Sequence[tuple[str, float]] = (),
                 night: _Night | None = None,
                 planned: tuple[list[_Pattern], list[_Pattern]] | None = None) -> None:
        self.ref = ref
        self.night = night or _Night()
        self.pre = pre  # discovery already done in this process (see _setup_here)
        self.planned = planned  # and its patterns planned (run() did, to decide whether Ray is needed)
        self.on_ray = on_ray
        # `early`: the steps run() timed before this driver existed; "setup" then counts what is left of it.
        self.phases: list[tuple[str, float]] = list(early)
        self._mark = t0 + sum(s for _, s in early)
        self.s = settings
        self.bus = bus
        self.table = table
        self.retune = retune
        self.t0 = t0
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.policy = settings.policy
        self.cache_dir = str(Path(settings.resolved_cache_dir).absolute())
        self.pool: Any = None
        self.writer: Any = None
        self.started = False  # RunStarted was emitted
        self.notes: list[str] = []
        self.commits: list[Any] = []

    # ------------------------------------------------------------------ top level

    def go(self) -> RunSummary:
        try:
            summary = self._go()
        except KeyboardInterrupt:
            self._abort("interrupted", "interrupted by the user")
            raise
        except BaseException as e:
            self._abort("failed", first_line(e, 500, named=False))
            raise
        finally:
            self._close()
        return summary

    def _abort(self, status: str, error: str) -> None:
        if self.started:
            self.bus.emit(RunFinished.make(status=status, seconds=time.monotonic() - self.t0, error=error[:500]))

    def _close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.writer is not None:
            import ray

            ray.kill(self.writer)

    def _go(self) -> RunSummary:
        setup = self.pre if self.pre is not None else self._setup_on_ray()
        self._phase("setup")
        self._announce(setup)
        return self._realize(setup)

    def _phase(self, name: str) -> None:
        """Record how long the step that just ended took (the summary shows where a run's time went)."""
        now = time.monotonic()
        self.phases.append((name, now - self._mark))
        self._mark = now

    def _setup_on_ray(self) -> _Setup:
        import ray

        from fact_ray.actors import cluster
        from fact_ray.actors.compile import unwrap_user_error
        from fact_ray.actors.discovery import discovery_actor, llm_config
        from fact_ray.toolchain import key_toolchain

        s = self.s
        ref = self.ref
        if ":" not in ref or os.path.exists(ref):
            ref = str(Path(ref).absolute())  # workers do not share the driver's working directory
        # The toolchain check, discovery and the GPU workers' start-up each take seconds: they run at once.
        # Discovery's cost model needs the arch before the workers have reported theirs, so it starts with the
        # configured one (sm90 by default) and runs again in the rare cluster whose GPUs say otherwise.
        tc_ref = cluster.toolchain_info.remote(s.nvcc)
        guess = s.arch or Arch.SM90
        # The agent's endpoint settings are read here, on the driver, where the user set OPENAI_* for this run.
        llm_cfg = llm_config(s.llm, s) if s.llm != "off" else None
        agent = discovery_actor().options(scheduling_strategy=cluster.driver_node_affinity()).remote(s.llm, llm_cfg)
        captures = str(Path(s.home).absolute() / "captures")  # the agent runs on this node (driver affinity)
        disc_ref = agent.discover.remote(ref, guess, self.policy, captures)
        gpus = self._start_pool()
        arch = self._pool_arch() if gpus else (s.arch or Arch.SM90)
        try:
            compiler, ray_version = ray.get(tc_ref)
        except ray.exceptions.RayTaskError as e:
            unwrap_user_error(e)
            raise
        try:
            disc = ray.get(disc_ref)
            if arch != guess:
                disc = ray.get(agent.discover.remote(ref, arch, self.policy, captures))
        except ray.exceptions.RayTaskError as e:
            unwrap_user_error(e)
            raise
        finally:
            ray.kill(agent)
        info = self.pool.infos()[0] if self.pool is not None else None
        # Libraries come from a compile node, timings from a GPU node: the key names both sides' versions.
        facts = info.toolchain.built_by(compiler) if info else compiler
        return _Setup(disc=disc, arch=arch, toolchain=key_toolchain(facts), facts=facts, gpu_name=facts.gpu_name,
                      host=info.host if info else "", gpus=gpus, ray_version=ray_version)

    def _start_pool(self) -> int:
        """One trial worker per GPU of the cluster (they start in the background); the number of GPUs."""
        from fact_ray.actors import cluster

        gpus = cluster.gpu_count()
        if gpus and self.pool is None:
            from fact_ray.actors.gpu_trial import run_trial
            from fact_ray.actors.trial_worker import TrialPool

            self.pool = TrialPool(run_trial, gpus, timeout_s=self.s.trial_timeout_s)
        return gpus

    def _pool_arch(self) -> Arch:
        from fact_ray.toolchain import target_arch

        infos = self.pool.infos()
        if len({i.gpu_name for i in infos}) > 1:
            self.notes.append(f"mixed GPUs in the cluster ({', '.join(sorted({i.gpu_name for i in infos}))}): "
                              f"timings are each measured against the PyTorch op on the same GPU")
        gpu = infos[0].toolchain
        return target_arch(self.s.arch, gpu.capability, f"the cluster's {gpu.gpu_name}")

    def _announce(self, setup: _Setup) -> None:
        s, disc, toolchain = self.s, setup.disc, setup.toolchain
        self.toolchain = toolchain
        self.notes.extend(disc.notes)
        self.started = True
        self.bus.emit(RunStarted.make(
            run_id=self.run_id, model_name=disc.model_name, model_hash=disc.model_hash, policy=self.policy,
            arch=setup.arch, gpu=setup.gpu_name, budget=s.budget, model_ref=self.ref,
            versions={**setup.facts.recorded(), "ray": setup.ray_version},
            extra={"ray_address": s.ray_address or ("local" if self.on_ray else "not started: all from the table"),
                   "gpus": setup.gpus, "table": self.table.uri, "retune": self.retune, "llm": s.llm,
                   "capture": disc.method}))
        if disc.agent_used:
            self.bus.emit(_agent_report(disc, s.llm, s.llm_model))

    def _realize(self, setup: _Setup) -> RunSummary:
        from fact_ray.actors.executor import RayExecutor
        from fact_ray.pattern_table import RowContext
        from fact_ray.realize import pipeline

        s, disc, arch, toolchain = self.s, setup.disc, setup.arch, setup.toolchain
        gpu_name, host = setup.gpu_name, setup.host
        if self.planned is not None and setup is self.pre:
            patterns, todo = self.planned
        else:
            patterns = _patterns_of(disc.matches)
            todo = None
        for p in patterns:
            self.bus.emit(PatternStarted(match=p.match, index=p.index - 1, total=len(patterns)))
        ctx = RowContext(toolchain=toolchain, run_id=self.run_id, gpu_name=gpu_name or None, host=host or None,
                         facts=setup.facts)
        if todo is None:
            todo = _plan(patterns, self.table, self.policy, arch, toolchain, s.budget, disc, self.retune,
                         _host_env(setup), self.night, s.ranker)
        for p in patterns:
            if p.status in (FROM_TABLE, NOT_REALIZABLE):
                self.bus.emit(PatternFinished(match_key=p.key, winner=p.winner, from_table=p.from_table,
                                              reason=p.reason))
        self._phase("table")
        if todo and not self.on_ray:
            raise RuntimeError("internal: patterns to tune, but Ray was not started")  # run() decides; never here
        gpus = setup.gpus
        if todo and self.pool is None:
            gpus = self._start_pool()  # found here only when discovery ran without Ray (setup_here)

        # Every translation unit of every pattern compiles at once (a unit shared by patterns compiles once), then
        # one trial per candidate: the pipeline `fact-ray tune` runs too, here with the Ray executor.
        n_units = len({src.name for p in todo for src in p.sources})
        n_trials = sum(len(p.configs) for p in todo) if gpus else 0
        for lst in self.bus.listeners:
            plan = getattr(lst, "on_plan", None)
            if callable(plan):
                plan(compiles=n_units, trials=n_trials)
        from fact_ray.shared_cache import cache_uri_for_table

        # A table at a URI every node reaches also shares what the nodes build (see shared_cache).
        executor = RayExecutor(self.cache_dir, s.nvcc, max_in_flight=s.jobs, pool=self.pool if gpus else None,
                               shared=cache_uri_for_table(self.table.uri))
        hooks = _FarmHooks(self, {id(p.plan): p for p in todo}, ctx)
        search = pipeline.Search(halving=s.search == "halving", budget_s=s.budget_s,
                                 chunk=max(1, 2 * int(gpus or 0)))  # a time budget checks between chunks
        pipeline.realize([p.plan for p in todo], executor, self.policy, arch, hooks, search=search)
        outcomes = hooks.outcomes
        if not gpus:
            built = sum(o.ok for o in outcomes)
            failed = len(outcomes) - built
            msg = f"no GPU in the cluster: compiled {built} TUs, trials need a GPU"
            if failed:
                msg += f" ({failed} failed to compile)"
            if todo:
                self.notes.append(msg)
            for p in todo:
                p.status, p.reason = NO_GPU, msg
                failed = sum(not o.ok for o in p.compiles)
                self.bus.emit(PatternFinished(match_key=p.key, winner=None, failures=failed, reason=msg))
        commits = self._wait_commits()
        self._phase("trials + commit")
        summary = self._summary(disc, patterns, outcomes, arch, gpu_name, gpus, commits)
        report = {"run_id": self.run_id, "model": disc.model_name, "model_hash": disc.model_hash,
                  "policy": self.policy.value, "arch": arch.value, "gpu": gpu_name, "gpus": gpus,
                  "patterns": summary.rows(), "notes": list(summary.notes), "table_commits": list(commits),
                  "compiled": summary.compiled, "compile_failed": summary.compile_failed,
                  "compile_lost": summary.compile_lost, "trials": summary.trials,
                  "phases_s": {k: round(v, 3) for k, v in summary.phases}, "ray": self.on_ray}
        self.bus.emit(RunFinished.make(status="ok", seconds=summary.seconds, rows=summary.rows(), report=report,
                                       report_text=summary_text(summary)))
        return _with(summary, listener_failures=tuple(f"{f.listener}: {f.error}" for f in self.bus.failures))

    def _wait_commits(self) -> tuple[str, ...]:
        if self.writer is None and not self.commits:
            return ()
        import ray

        from fact_ray.actors.compile import unwrap_user_error

        try:
            ray.get(self.commits)
            return tuple(ray.get(self.writer.commits.remote())) if self.writer is not None else ()
        except ray.exceptions.RayTaskError as e:
            unwrap_user_error(e)  # a table that stopped being writable mid-run: one line, not a traceback
            raise

    def _trial_event(self, p: _Pattern, trial: Trial, gpu_slot: int = -1, host: str = "") -> None:
        self.bus.emit(TrialFinished(match_key=p.key, trial=trial, step=p.step, gpu_slot=gpu_slot, host=host))
        p.step += 1

    def _commit(self, p: _Pattern, run: Any, arch: Arch, ctx: Any) -> None:
        """The pattern's winner (and the failures behind it) to the table, through the one writer."""
        import ray

        from fact_ray.actors import cluster
        from fact_ray.actors.compile import unwrap_user_error
        from fact_ray.actors.table_writer import TableWriter
        from fact_ray.pattern_table import row_from_trial, row_from_winner

        p.winner = run.winner
        p.status = TUNED
        if not p.trials or all(t.status == TrialStatus.COMPILE_ERROR for t in p.trials):
            p.reason = "every candidate failed to compile; the PyTorch op stays"
        if self.writer is None:
            self.writer = TableWriter.options(scheduling_strategy=cluster.driver_node_affinity()).remote(
                self.table.uri)
        config, chosen = run.winner.config, run.chosen
        lib_uri, symbol, src = None, None, None
        if chosen is not None:
            src = chosen.source
            try:
                lib_uri = ray.get(self.writer.put_library.remote(chosen.handle.so_ref))
            except ray.exceptions.RayTaskError as e:
                unwrap_user_error(e)
                raise
            symbol = src.symbols[[c.name for c in src.configs].index(config.name)]
        rows = [row_from_winner(p.winner, p.match, ctx, library_uri=lib_uri, library_symbol=symbol)]
        # The failures behind the winner are history worth keeping; they can never be selected (status not ok).
        # Other verified candidates are left out so that the table's best entry is always the one chosen here.
        for t in p.trials:
            if not t.status.correct and t is not run.winner.trial:
                cfg = next((c for c in p.configs if c.name == t.candidate_name), None)
                rows.append(row_from_trial(t, p.match, ctx, policy=self.policy, arch=arch, config=cfg))
        self.commits.append(self.writer.commit.remote(rows))

        failures = sum(not t.status.correct for t in p.trials)
        sources = freeze({src.name: src.code}) if src is not None else ()
        self.bus.emit(PatternFinished(match_key=p.key, winner=p.winner, trials=run.winner.trials,
                                      failures=failures, sources=sources, reason=p.reason))

    # ------------------------------------------------------------------ summary

    def _summary(self, disc: Any, patterns: list[_Pattern], outcomes: list[Any], arch: Arch, gpu: str,
                 gpus: int, commits: tuple[str, ...]) -> RunSummary:
        rows: list[PatternSummary] = []
        for p in patterns:
            ps = _pattern_summary(p, p.index, p.match)
            rows.append(ps)
            for idx, m in p.duplicates:
                rows.append(_pattern_summary(p, idx, m, same_as=p.index))
        rows.sort(key=lambda r: r.index)
        return RunSummary(
            run_id=self.run_id, model_name=disc.model_name, model_hash=disc.model_hash, policy=self.policy,
            arch=arch, gpu=gpu, gpus=gpus, patterns=tuple(rows),
            compiled=sum(o.ok for o in outcomes), compile_failed=sum(not o.ok and not o.lost for o in outcomes),
            compile_lost=sum(o.lost for o in outcomes), cached=sum(o.ok and o.library.cached for o in outcomes),
            trials=sum(len(p.trials) for p in patterns), seconds=time.monotonic() - self.t0,
            toolchain=self.toolchain, notes=tuple(dict.fromkeys(self.notes)), table_commits=commits,
            phases=tuple(self.phases))


class _FarmHooks:
    """The pipeline's reports as farm events, per-pattern state and table commits."""

    def __init__(self, driver: _Driver, by_plan: dict[int, _Pattern], ctx: Any) -> None:
        self.d, self.by_plan, self.ctx = driver, by_plan, ctx
        self.outcomes: list[Any] = []  # CompileOutcome of every unit, in plan order, once the build is over

    def compiled(self, run: Any, built: Any) -> None:
        p, o = self.by_plan[id(run.plan)], built.handle
        p.compiles.append(o)
        self.d.bus.emit(CompileFinished(
            match_key=p.key, source_name=o.source.name, ok=o.ok, seconds=o.library.seconds or o.seconds,
            n_configs=len(o.source.configs), log_excerpt="" if o.ok else _excerpt(o.library.log),
            cached=o.library.cached))

    def build_done(self, built: Sequence[Any]) -> None:
        self.outcomes = [b.handle for b in built]
        self.d._phase("compile")

    def trial(self, run: Any, trial: Trial, slot: int = -1, host: str = "") -> None:
        p = self.by_plan[id(run.plan)]
        p.trials = run.trials
        self.d._trial_event(p, trial, gpu_slot=slot, host=host)

    def finished(self, run: Any) -> None:
        p = self.by_plan[id(run.plan)]
        p.trials = run.trials
        self.d._commit(p, run, run.winner.arch, self.ctx)


def _pattern_summary(p: _Pattern, index: int, m: Match, same_as: int = 0) -> PatternSummary:
    w = p.winner
    winner, sp, t_ms, b_ms = "", math.nan, math.nan, math.nan
    if w is not None:
        winner = w.config.name if w.config is not None else "torch"
        sp = w.trial.speedup
        t_ms = w.trial.time.median_ms if w.trial.time else math.nan
        b_ms = w.trial.baseline.median_ms if w.trial.baseline else math.nan
    return PatternSummary(
        index=index, rule=m.rule, family=m.family, match_key=m.key, shapes=m.shape_signature, dtype=m.dtype,
        share=m.share, status=p.status, winner=winner, speedup=sp, time_ms=t_ms, baseline_ms=b_ms,
        configs=len(p.configs), compiles=len(p.compiles), compile_failures=sum(not o.ok for o in p.compiles),
        trials=len(p.trials), failures=sum(not t.status.correct for t in p.trials), same_as=same_as,
        reason=p.reason)
