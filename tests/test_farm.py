"""The farm on a local Ray (no GPU here): compile-only runs, the build cache, table reuse, bad settings; and the
trial workers' time limit / crash / restart logic, driven by injected trial functions on CPU workers."""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import ray
import ray.cloudpickle

from fact_ray import farm
from fact_ray.actors.trial_worker import TrialPool
from fact_ray.config import Settings
from fact_ray.errors import ModelNotFound, ModelRaised, ServiceUnreachable, TableError, WrongAnswer
from fact_ray.events import CompileFinished, PatternFinished, RunFinished, RunStarted, TrialFinished
from fact_ray.pattern_table import PatternTable, TableKey, TableRow
from fact_ray.types import Arch, Precision

MODEL = str(Path(__file__).parent / "models" / "farm_tiny.py")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket closes: nothing listens there


class Recorder:
    """A listener that keeps every event."""

    def __init__(self) -> None:
        self.events: list = []

    def on_event(self, event) -> None:
        self.events.append(event)

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def settings(root: Path, **kw) -> Settings:
    base = dict(home=str(root / "home"), table_uri=str(root / "table"),
                tracking_uri=f"sqlite:///{root / 'mlflow.db'}", cache_dir=str(root / "cache"),
                arch=Arch.SM80, policy=Precision.FP32, budget=2, trial_timeout_s=60)
    base.update(kw)
    return Settings(**base)


# --------------------------------------------------------------------------------------------- bad settings


@pytest.mark.timeout(120)  # a hang guard, not a speed claim (issue 14: no test asserts a wall time)
def test_unreachable_ray_address_fails_fast(tmp_path):
    for address in (f"ray://127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"):
        with pytest.raises(ServiceUnreachable, match="not reachable"):
            farm.run(MODEL, settings(tmp_path, ray_address=address))
    assert not ray.is_initialized()
    assert not (tmp_path / "table").exists()


@pytest.mark.timeout(120)  # a hang guard, not a speed claim
def test_unreachable_tracking_server_fails_before_any_work(tmp_path):
    with pytest.raises(ServiceUnreachable, match="tracking server"):
        farm.run(MODEL, settings(tmp_path, tracking_uri=f"http://127.0.0.1:{closed_port()}"))
    assert not (tmp_path / "table").exists() and not (tmp_path / "cache").exists()
    assert not ray.is_initialized()


def test_unwritable_table_fails_with_the_table_untouched(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file: nothing can be created under it, even by root")
    with pytest.raises(TableError, match="not writable"):
        farm.run(MODEL, settings(tmp_path, table_uri=str(blocker / "table")))
    assert blocker.read_text().startswith("a regular file")
    assert not (tmp_path / "cache").exists()
    assert not ray.is_initialized()


def test_missing_model_file_fails_before_ray_starts(tmp_path):
    with pytest.raises(ModelNotFound, match="no such file"):
        farm.run(str(tmp_path / "nope.py"), settings(tmp_path))
    assert not ray.is_initialized()


@pytest.mark.slow
def test_a_model_that_raises_is_one_user_error_from_the_discovery_actor(tmp_path):
    rec = Recorder()
    with pytest.raises(ModelRaised, match="planted failure"):
        farm.run(str(Path(MODEL).with_name("farm_raises.py")), settings(tmp_path), [rec])
    assert rec.events == []  # nothing started: no RunStarted, no half-written MLflow run
    assert PatternTable(str(tmp_path / "table")).all_rows() == []
    assert not ray.is_initialized()


# --------------------------------------------------------------------------------------------- runs without a GPU


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, session_build_cache):
    """A compile-only run, and the settings of the runs after it. Budget 1 on the session's build cache: the
    translation unit that the fleet and LLM farm runs compile too (tests/test_fleet.py, tests/test_llm_agent.py),
    so the session compiles it once; the events still tell a compiled unit from a cached one."""
    root = tmp_path_factory.mktemp("farm")
    s = settings(root, budget=1, cache_dir=session_build_cache)
    rec = Recorder()
    summary = farm.run(MODEL, s, [rec])
    return root, summary, rec, s


@pytest.mark.nvcc
@pytest.mark.slow
def test_run_without_gpu_compiles_and_writes_no_winners(first_run):
    root, summary, rec, _ = first_run
    assert summary.gpus == 0 and summary.gpu == ""
    gemm = [p for p in summary.patterns if p.family in farm.GEMM_FAMILIES]
    norm = [p for p in summary.patterns if p.family in farm.FUSED_FAMILIES]
    assert gemm and norm and len(gemm) + len(norm) == len(summary.patterns), [p.family for p in summary.patterns]
    assert all(p.status == farm.NO_GPU and p.winner == "" for p in gemm + norm)
    assert summary.compiled >= 1 and summary.compile_failed == 0 and summary.compile_lost == 0
    assert any(n.startswith("no GPU in the cluster: compiled") for n in summary.notes)
    # Events: one RunStarted, a compile event per TU and pattern, a PatternFinished without winner, RunFinished ok.
    assert len(rec.of(RunStarted)) == 1 and rec.of(RunStarted)[0].gpu == ""
    compiles = rec.of(CompileFinished)
    assert len(compiles) == sum(p.compiles for p in gemm + norm) and all(c.ok for c in compiles)
    assert all(e.winner is None for e in rec.of(PatternFinished))
    assert rec.of(RunFinished)[-1].status == "ok"
    # No winners written; the run is in MLflow.
    assert PatternTable(str(root / "table")).all_rows() == []
    assert summary.mlflow_run_id and summary.exit_code == 0
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(summary.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["gpu"] == "none"
    assert not ray.is_initialized()  # the farm shut down the Ray it started


@pytest.mark.nvcc
def test_the_farm_keys_the_table_as_the_artifact_does_on_the_same_host(first_run):
    """The farm takes its toolchain from a Ray compile task, `fact-ray compose` (the artifact) from this process:
    both go through key_toolchain, so the same host gets the same key, naming nvcc's version and not its path."""
    from fact_ray.toolchain import detect, key_toolchain

    _, summary, rec, _ = first_run
    assert summary.toolchain == key_toolchain(detect())
    versions = dict(rec.of(RunStarted)[0].versions)  # what MLflow records of the run
    assert versions["nvcc"] == summary.toolchain.cuda == detect().nvcc and "/" not in versions["nvcc"]
    assert {"driver", "cublas", "cudnn", "torch_cuda"} <= set(versions)


@pytest.mark.nvcc
@pytest.mark.slow
def test_second_run_reuses_the_build_cache(first_run, local_ray):
    # On the module's Ray, which farm.run reuses (the first run covers starting and stopping one): seconds saved
    # per run, and the same compile and table path.
    root, first, _, s = first_run
    rec = Recorder()
    summary = farm.run(MODEL, s, [rec])
    compiles = rec.of(CompileFinished)
    assert compiles and all(c.cached and c.ok for c in compiles)
    assert summary.cached == summary.compiled == first.compiled
    # Discovery filled the capture cache on the first run (the all-from-table path of later runs reads it).
    assert len(list((root / "home" / "captures").glob("*.pkl"))) == 1


@pytest.mark.nvcc
@pytest.mark.slow
def test_a_winner_in_the_table_is_reused_without_compiling(first_run, local_ray):
    root, first, _, s = first_run
    target = next(p for p in first.patterns if p.family in farm.GEMM_FAMILIES)
    table = PatternTable(str(root / "table"))
    table.commit([TableRow(
        rule=target.rule, match_key=target.match_key, shape_signature=target.shapes, dtype=target.dtype,
        policy=Precision.FP32, arch=Arch.SM80, toolchain=first.toolchain, config_json=None, config_name="torch",
        status="ok", created_at=datetime.now(timezone.utc), gpu_name="NVIDIA A100-SXM4-40GB", median_ms=0.02,
        baseline_median_ms=0.02, speedup=1.0, run_id="planted")])
    rec = Recorder()
    summary = farm.run(MODEL, s, [rec])
    served = next(p for p in summary.patterns if p.match_key == target.match_key)
    assert served.status == farm.FROM_TABLE and served.winner == "torch"
    assert not [c for c in rec.of(CompileFinished) if c.match_key == target.match_key]
    finished = next(e for e in rec.of(PatternFinished) if e.match_key == target.match_key)
    assert finished.from_table and finished.winner is not None
    assert len(table.all_rows()) == 1  # nothing was written beside the planted row
    # retune ignores the table: the pattern is compiled again (from the build cache) and not served
    rec = Recorder()
    summary = farm.run(MODEL, s, [rec], retune=True)
    again = next(p for p in summary.patterns if p.match_key == target.match_key)
    assert again.status == farm.NO_GPU
    assert [c for c in rec.of(CompileFinished) if c.match_key == target.match_key]


# --------------------------------------------------------------------------------------------- with a GPU


@pytest.mark.gpu
@pytest.mark.nvcc
def test_run_on_a_gpu_tunes_commits_the_winner_and_serves_it_next_time(tmp_path):
    rec = Recorder()
    s = settings(tmp_path, arch=None, budget=4)  # arch from the cluster's GPU
    summary = farm.run(MODEL, s, [rec])
    assert summary.gpus >= 1 and summary.gpu
    p = next(p for p in summary.patterns if p.family in farm.GEMM_FAMILIES)
    assert p.status == farm.TUNED and p.winner, p
    assert p.trials == p.configs >= 1
    trials = [e.trial for e in rec.of(TrialFinished) if e.match_key == p.match_key]
    assert [t.candidate_name for t in trials].count("torch") == 1
    assert all(t.status in ("ok", "slower", "wrong", "cannot_implement", "crashed", "timeout", "compile_error")
               for t in trials)
    finished = next(e for e in rec.of(PatternFinished) if e.match_key == p.match_key)
    assert finished.winner is not None and len(finished.trials) == p.trials + 1
    table = PatternTable(s.resolved_table_uri)
    best = table.best(TableKey.of(p.match_key, s.policy, summary.arch, summary.toolchain))
    assert best is not None and best.valid and best.config_name == p.winner
    assert best.gpu_name == summary.gpu and best.run_id == summary.run_id
    if p.winner != "torch":
        assert best.library_uri and best.library_symbol
        assert len(table.get_library(best.library_uri)) > 100_000
    # the next run reuses the winner: no compile and no trial for that pattern
    rec = Recorder()
    again = farm.run(MODEL, s, [rec])
    q = next(q for q in again.patterns if q.match_key == p.match_key)
    assert q.status == farm.FROM_TABLE and q.winner == p.winner
    assert not [e for e in rec.of(CompileFinished) + rec.of(TrialFinished) if e.match_key == p.match_key]
    if all(x.status in (farm.TUNED, farm.NOT_REALIZABLE) for x in summary.patterns):
        # every pattern is served or has no kernel family: the run needs no Ray, no workers, no compiles
        assert rec.of(RunFinished)[-1].report["ray"] is False
        assert [name for name, _ in again.phases] == ["checks", "capture here", "wait for MLflow", "setup", "table",
                                                      "compile", "trials + commit"]


# --------------------------------------------------------------------------------------------- trial workers


def _trial(ctx, what: str):
    """An injected trial function: misbehaves on request, else reports which process ran it."""
    if what == "hang":
        time.sleep(3600)
    if what == "exit":
        os._exit(7)
    if what == "raise":
        raise ValueError("boom")
    if what == "wrong":
        raise WrongAnswer("rel err 0.5 > 1e-05")
    if what.startswith("nap"):
        time.sleep(0.5)
    return {"what": what, "pid": os.getpid(), "device": ctx.device, "workdir": ctx.workdir}


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray kept up for the rest of the module: the trial pools' and the later farm runs' (an initialised
    Ray is reused by farm.run and left running)."""
    assert not ray.is_initialized()
    # Workers cannot import this test module: ship the injected trial function by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(include_dashboard=False, num_cpus=2, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_trial_pool_records_timeout_crash_and_failure_and_replaces_the_worker(local_ray):
    calls = [("a",), ("hang",), ("b",), ("exit",), ("c",), ("raise",), ("d",), ("wrong",), ("e",)]
    seen = []
    pool = TrialPool(_trial, 1, timeout_s=4, num_gpus=0, start_timeout_s=120)
    try:
        first = pool.infos()[0]
        assert first.device == "cpu" and first.gpu_name == ""
        outs = pool.run(calls, seen.append)
    finally:
        pool.close()
    status = [o.status for o in outs]
    assert status == ["done", "timeout", "done", "crashed", "done", "failed", "done", "wrong", "done"]
    assert len(seen) == len(calls)  # each outcome reported once, as it came
    assert "within 4 s" in outs[1].error and outs[1].seconds >= 4
    assert "died" in outs[3].error
    assert outs[5].error == "ValueError: boom" and "Traceback" in outs[5].detail
    assert outs[7].error.startswith("WrongAnswer")
    pids = [o.value["pid"] for o in outs if o.done]
    # a new process after the timeout, after the crash and after the unexpected exception; none after a
    # candidate's own verdict (wrong), which leaves the worker trusted
    assert pids[0] == first.pid
    assert len({pids[0], pids[1], pids[2], pids[3]}) == 4
    assert pids[4] == pids[3]


def test_trial_pool_spreads_calls_over_workers_and_keeps_order(local_ray):
    pool = TrialPool(_trial, 2, timeout_s=30, num_gpus=0)
    try:
        assert len(pool.infos()) == 2
        outs = pool.run([(f"nap{i}",) for i in range(6)])
    finally:
        pool.close()
    assert [o.value["what"] for o in outs] == [f"nap{i}" for i in range(6)]
    assert len({o.value["pid"] for o in outs}) == 2
    assert len({o.value["workdir"] for o in outs}) == 2  # each worker its own scratch folder
