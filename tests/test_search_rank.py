"""Ranking and search strategy (issue 17): the cost model learned from the table's own history (trained on real
Parquet rows, judged on held-out problems), the ranker choice, NVIDIA's heuristics where installed, and
successive halving on a synthetic timing fixture.
"""

from __future__ import annotations

import math
import random
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from fact_ray.pattern_table import RowContext, Toolchain, row_from_trial
from fact_ray.realize import halving
from fact_ray.search_spaces import learned, nvmmh, rank, rankers, space
from fact_ray.types import Arch, GemmProblem, Match, Precision, TimeStats, Trial, TrialStatus

TC = Toolchain(cuda="13.0", cutlass="4.2.0", torch="2.13.0", bench_method="1")
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
TRAIN = [(2048, 2048, 2048), (8192, 1024, 1024), (1024, 8192, 2048), (4096, 768, 3072), (512, 4096, 4096),
         (16384, 2304, 768)]
HELD_OUT = [(4096, 4096, 1024), (2048, 8192, 768)]


def truth_ms(cfg, p: GemmProblem) -> float:
    """A hidden 'GPU': the analytic prior's physics plus what the prior does not weigh. A raster along the
    grid's longer mode is 25% faster, 4-CTA clusters 15% faster, ping-pong 10% slower, NoSmem epilogues 20%
    slower. Lognormal noise of 3%, seeded by the config's name and problem."""
    t = p.flops / 600e12 * 1e3 / max(rank.score(cfg, p, Arch.SM90), 1e-3)
    tiles_m, tiles_n = math.ceil(p.M / cfg.tile[0]), math.ceil(p.N / cfg.tile[1])
    longer = "along_m" if tiles_m >= tiles_n else "along_n"
    if cfg.raster == longer:
        t *= 0.75
    if cfg.cluster[0] * cfg.cluster[1] >= 4:
        t *= 0.85
    if "Pingpong" in rank.kernel_schedule(cfg):
        t *= 1.1
    if cfg.epilogue_schedule == "NoSmemWarpSpecialized":
        t *= 1.2
    rng = random.Random(f"{cfg.name}|{p.M}x{p.N}x{p.K}")
    return t * math.exp(rng.gauss(0.0, 0.03))


def _problem(mnk) -> GemmProblem:
    m, n, k = mnk
    return GemmProblem(M=m, N=n, K=k, dtype="bfloat16")


def _match(p: GemmProblem) -> Match:
    return Match(rule="linear", family="gemm", nodes=("linear",), anchor="linear",
                 params=(("M", p.M), ("N", p.N), ("K", p.K), ("L", p.L)), dtype="float32",
                 shapes=((p.M, p.K), (p.N, p.K)))


def _sample(configs, k: int, seed: int):
    """The first k/2 of the ranked space (what budgets try) and k/2 drawn from the rest (explorations)."""
    rng = random.Random(seed)
    head, tail = configs[: k // 2], configs[k // 2:]
    return head + rng.sample(tail, min(len(tail), k - len(head)))


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Trials of six problems (48 configs each) committed to a real Parquet table and read back."""
    from fact_ray.pattern_table import PatternTable

    table = PatternTable(str(tmp_path_factory.mktemp("table") / "t"))
    rows = []
    for i, mnk in enumerate(TRAIN):
        p = _problem(mnk)
        for j, cfg in enumerate(_sample(space(p, Arch.SM90, Precision.BF16), 48, i)):
            ms = truth_ms(cfg, p)
            trial = Trial(cfg.name, TrialStatus.OK, rel_err=1e-3, max_abs_err=1e-2,
                          time=TimeStats(ms, ms * 0.98, ms * 1.02, 50), baseline=TimeStats(1.0, 0.98, 1.02, 50))
            rows.append(row_from_trial(trial, _match(p), RowContext(TC, "run-1", "NVIDIA H200", "node"),
                                       policy=Precision.BF16, arch=Arch.SM90, config=cfg,
                                       created_at=T0 + timedelta(seconds=len(rows))))
    # Rows that must not train: a failed compile, the PyTorch op, another policy's key without configs.
    bad = Trial("x", TrialStatus.COMPILE_ERROR, error="nvcc")
    rows.append(row_from_trial(bad, _match(_problem(TRAIN[0])), RowContext(TC), policy=Precision.BF16,
                               arch=Arch.SM90, config=space(_problem(TRAIN[0]), Arch.SM90, Precision.BF16)[0]))
    rows.append(row_from_trial(Trial("torch", TrialStatus.OK, time=TimeStats(1.0, 1.0, 1.0, 5)),
                               _match(_problem(TRAIN[0])), RowContext(TC), policy=Precision.BF16,
                               arch=Arch.SM90, config=None))
    table.commit(rows)
    return PatternTable(table.uri).all_rows()  # a fresh reader: the rows come back from Parquet


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_learned_ranker_orders_held_out_problems_better_than_random_and_the_prior(history):
    samples = learned.samples_from_rows(history)
    assert len(samples) == 48 * len(TRAIN), "only verified, timed kernel trials train"
    assert {s.problem.M for s in samples} == {m for m, _, _ in TRAIN}
    model = learned.fit(samples, Arch.SM90)
    assert model is not None and model.problems == len(TRAIN)
    rng = np.random.default_rng(0)
    for mnk in HELD_OUT:
        p = _problem(mnk)
        configs = _sample(space(p, Arch.SM90, Precision.BF16), 200, 99)
        true = np.array([truth_ms(c, p) for c in configs])
        pred = model.predict(p, configs)
        prior = -np.log([rank.score(c, p, Arch.SM90) for c in configs])
        rho_model = _spearman(pred, true)
        rho_prior = _spearman(prior, true)
        rho_random = max(_spearman(rng.permutation(len(configs)), true) for _ in range(20))
        assert rho_model > rho_random + 0.3, (mnk, rho_model, rho_random)
        assert rho_model > rho_prior, (mnk, rho_model, rho_prior)
        # The true best among the model's top 16 (what a budget of 16 tries), within 3% of it.
        top16 = np.argsort(pred)[:16]
        assert true[top16].min() <= true.min() * 1.03, (mnk, true[top16].min() / true.min())


def test_learned_model_needs_history_and_its_own_arch(history):
    samples = learned.samples_from_rows(history)
    assert learned.fit(samples[:10], Arch.SM90) is None, "too thin to learn from"
    assert learned.fit(samples, Arch.SM80) is None, "sm90 trials do not train an sm80 model"
    model = learned.fit(samples, Arch.SM90)
    p = _problem(HELD_OUT[0])
    configs = space(p, Arch.SM90, Precision.BF16)[:40]
    assert model.scores(p, configs, Arch.SM80) is None
    scores = model.scores(p, configs, Arch.SM90)
    assert len(scores) == len(configs) and max(scores) == pytest.approx(1.0)
    # The space ordered by the model: the same configs, another order, its best-scored config first.
    ordered = space(p, Arch.SM90, Precision.BF16, ranker=model)
    assert sorted(c.name for c in ordered) == sorted(c.name for c in space(p, Arch.SM90, Precision.BF16))
    full = space(p, Arch.SM90, Precision.BF16)
    best = full[int(np.argmax(model.scores(p, full, Arch.SM90)))]
    assert ordered[0].name == best.name


def test_ranker_choice_says_which_and_why(history):
    samples = learned.samples_from_rows(history)
    r, why = rankers.choose("heuristic", Precision.BF16, Arch.SM90, samples)
    assert r is None and "analytic" in why
    r, why = rankers.choose("learned", Precision.BF16, Arch.SM90, samples)
    assert isinstance(r, learned.CostModel) and "288 trials of 6 problems" in why
    r, why = rankers.choose("learned", Precision.FP32, Arch.SM90, samples)
    assert r is None and "too thin" in why, "bf16 trials do not train the fp32 policy's model"
    r, why = rankers.choose("auto", Precision.BF16, Arch.SM90, samples)
    assert r is not None and why.startswith("ranking: a cost model learned")
    with pytest.raises(ValueError, match="unknown ranker"):
        rankers.choose("oracle", Precision.BF16, Arch.SM90)


def test_nvidia_heuristics_rank_where_installed():
    got = nvmmh.available()
    if not got.ok:
        assert "nvidia-matmul-heuristics" in got.why
        r, why = rankers.choose("nvmmh", Precision.BF16, Arch.SM90)
        assert r is None and "nvidia-matmul-heuristics" in why
        pytest.skip(got.why)
    heur = nvmmh.NvMatmulHeuristicsRanker(Precision.BF16)
    p = GemmProblem(M=4096, N=4096, K=4096, dtype="bfloat16")
    configs = space(p, Arch.SM90, Precision.BF16)
    scores = heur.scores(p, configs, Arch.SM90)
    assert scores is not None and len(scores) == len(configs) and all(s > 0 for s in scores)
    by = {c.name: s for c, s in zip(configs, scores)}
    big = max(by[c.name] for c in configs if c.tile[:2] == (128, 256) and c.split_k == 1)
    tiny = max(by[c.name] for c in configs if c.tile[:2] == (64, 16))
    assert big > tiny, "a 128x256 tile outruns a 64x16 one on a 4096^3 GEMM"
    assert nvmmh.NvMatmulHeuristicsRanker(Precision.FP32).scores(p, configs, Arch.SM90) is None, \
        "3xTF32 is not modelled: the analytic order stays"


# ------------------------------------------------------------------------------------------ halving


def _fixture(seed: int, n: int = 64):
    """True times: one best at 1.0, the rest 1.05..3.0; measurements noisier at cheaper rungs (8% screening,
    3% at the second rung, 0.5% for the full timing)."""
    rng = random.Random(seed)
    names = [f"k{i:02d}" for i in range(n)]
    true = {name: rng.uniform(1.05, 3.0) for name in names}
    true[rng.choice(names)] = 1.0
    noise = {0: 0.08, 1: 0.03, 2: 0.005}

    def measure(name: str, rung: int):
        t = true[name] * math.exp(rng.gauss(0.0, noise[rung]))
        return halving.Timing(t, t * (1 - 2 * noise[rung]), t * (1 + 2 * noise[rung]))

    rng_order = names[:]
    rng.shuffle(rng_order)  # the ranker's order knows nothing here
    return rng_order, true, measure


def test_successive_halving_keeps_the_true_best():
    for seed in range(40):
        order, true, measure = _fixture(seed)
        out = halving.successive_halving(order, measure, rungs=3, eta=4)
        assert out.best == min(true, key=true.get), seed
        assert out.measurements == 64 + 16 + 4, "screening spares the full timing of 60 of 64 candidates"
        assert not out.out_of_time


def test_halving_stops_early_when_the_leader_is_clearly_ahead():
    times = {f"k{i}": 2.0 + i * 0.01 for i in range(32)}
    times["k7"] = 0.5
    seen = []

    def measure(name, rung):
        seen.append((name, rung))
        t = times[name]
        return halving.Timing(t, t * 0.97, t * 1.03)

    out = halving.successive_halving(list(times), measure, rungs=3)
    assert out.best == "k7" and out.early_stop and out.ranking == ("k7",)
    assert len(seen) == 33 and seen[-1] == ("k7", 2), "screened once, then only the leader's full timing"
    # Overlapping spreads are noise, not a lead: no early stop.
    noisy = lambda name, rung: halving.Timing(times[name], times[name] * 0.2, times[name] * 5)  # noqa: E731
    assert not halving.successive_halving(list(times), noisy, rungs=3).early_stop


def test_halving_budget_in_seconds_and_failures():
    now = [0.0]

    def measure(name, rung):
        now[0] += 1.0  # each measurement takes a second on this clock
        return None if name == "broken" else halving.Timing(float(name[1:]))

    names = ["broken"] + [f"k{i}" for i in range(1, 20)]
    out = halving.successive_halving(names, measure, rungs=3, budget_s=10.0, clock=lambda: now[0])
    assert out.out_of_time and out.measurements == 10 and out.best == "k1"
    assert out.eliminated["broken"] == 0
    assert halving.successive_halving(["broken"], measure, rungs=2).best is None
    with pytest.raises(ValueError):
        halving.keep({"a": halving.Timing(1.0)}, ["a"], eta=1)


# ------------------------------------------------------------------------------------------ the pipeline's halving


class _Cfg:
    def __init__(self, name: str) -> None:
        self.name = name


class _SyntheticFamily:
    """A test-only family whose trials time a hidden truth (no GPU here): the full trial exactly, the screen
    with 8% noise. It counts both, so the test sees what successive halving spared."""

    name = "synthetic_halving"
    serves = ("synthetic_halving",)
    templates = ("synthetic",)

    problem_type = GemmProblem

    def __init__(self, truth: dict[str, float], seed: int = 0) -> None:
        self.truth, self.rng = truth, random.Random(seed)
        self.full, self.screens = [], []

    # The rest of the protocol: never reached by the pipeline's trial step.
    def _unused(self, *a, **k):
        raise NotImplementedError

    problem = candidates = sources = operands = accepts = register_op = bind = output_shape = _unused

    def _trial(self, name: str, noise: float, reps: int):
        t = self.truth[name] * math.exp(self.rng.gauss(0.0, noise))
        base = TimeStats(1.0, 0.99, 1.01, reps)
        status = TrialStatus.OK if t < 1.0 else TrialStatus.SLOWER
        return (Trial("torch", TrialStatus.OK, time=base),
                Trial(name, status, rel_err=1e-7, time=TimeStats(t, t * (1 - noise), t * (1 + noise), reps),
                      baseline=base))

    def trial(self, problem, config, library, policy, device):
        self.full.append(config.name)
        return self._trial(config.name, 0.002, 100)

    def screen(self, problem, config, library, policy, device):
        self.screens.append(config.name)
        return self._trial(config.name, 0.08, 10)


class _Executor:
    can_trial = True

    def build(self, sources, on_done):
        from fact_ray.realize.pipeline import Built
        from fact_ray.types import Library

        out = [Built(s, Library(source=s, key=s.name, ok=True, path="/nonexistent.so")) for s in sources]
        for b in out:
            on_done(b)
        return out

    def trials(self, calls, policy, on_done):
        from fact_ray.realize.pipeline import TrialDone

        for i, c in enumerate(calls):
            torch_trial, trial = c.family().trial(c.plan.problem, c.config, c.built.library, policy, None)
            on_done(TrialDone(i, trial, torch_trial, slot=0))


def _synthetic_plan(names):
    from fact_ray.realize.pipeline import Plan
    from fact_ray.types import Source

    configs = tuple(_Cfg(n) for n in names)
    src = Source(name="synthetic_tu", arch=Arch.SM90, code="", configs=configs, symbols=tuple(names))
    match = Match(rule="synthetic", family="synthetic_halving", nodes=("x",), anchor="x", params=(),
                  dtype="float32", shapes=((1,),))
    return Plan(match=match, family="synthetic_halving", problem=None, configs=configs, sources=(src,))


@pytest.fixture
def synthetic():
    from fact_ray.realize import family as registry

    rng = random.Random(7)
    names = [f"c{i:02d}" for i in range(32)]
    truth = {n: rng.uniform(0.62, 1.4) for n in names}
    truth["c21"] = 0.55  # the true best, 13% ahead of the next at most: screening noise cannot hide it
    fam = registry.register(_SyntheticFamily(truth))
    yield fam, names
    registry.unregister(fam)


def test_pipeline_halving_screens_all_then_times_the_best_quarter(synthetic):
    from fact_ray.realize import pipeline

    fam, names = synthetic
    (run,) = pipeline.realize([_synthetic_plan(names)], _Executor(), Precision.FP32, Arch.SM90,
                              search=pipeline.Search(halving=True, eta=4, lead=10.0))
    assert sorted(fam.screens) == sorted(names), "every candidate screened once"
    assert len(fam.full) == 8 and "c21" in fam.full, "the best quarter timed in full, the true best among them"
    assert run.winner.trial.candidate_name == "c21"
    out = [t for t in run.trials if t.error.startswith("screened out")]
    assert len(out) == 24 and all(t.status is TrialStatus.SLOWER for t in out)
    assert len(run.trials) == 32 and run.torch_trial is not None and not run.left_out


def test_pipeline_halving_stops_at_a_clear_leader_and_honours_the_time_budget(synthetic):
    from fact_ray.realize import pipeline

    fam, names = synthetic
    fam.truth["c21"] = 0.2  # now far ahead of everything else, beyond screening noise
    (run,) = pipeline.realize([_synthetic_plan(names)], _Executor(), Precision.FP32, Arch.SM90,
                              search=pipeline.Search(halving=True))
    assert fam.full == ["c21"] and run.winner.trial.candidate_name == "c21"

    fam.full.clear(), fam.screens.clear()
    now = [0.0]
    real_trial = fam.screen

    def slow_screen(*a):
        now[0] += 1.0  # a screen takes a second on this clock
        return real_trial(*a)

    fam.screen = slow_screen
    (run,) = pipeline.realize([_synthetic_plan(names)], _Executor(), Precision.FP32, Arch.SM90,
                              search=pipeline.Search(halving=True, budget_s=12.0, chunk=4, clock=lambda: now[0]))
    assert len(fam.screens) == 12, "three chunks of four, then the budget is spent"
    assert set(run.left_out) >= set(names[12:]), "the budget went to the ranker's first candidates"
    assert fam.full == [], "the budget ran out before the full trials: none started"
    assert len(run.left_out) == 20 + 3, "the 20 never screened and the 3 survivors of 12 never timed in full"
    assert run.winner is not None and run.winner.trial.candidate_name == "torch"


def test_budget_in_candidates_seconds_or_both():
    from fact_ray import config
    from fact_ray.errors import ConfigError

    env: dict[str, str] = {}
    s = config.load({"budget": "120s"}, env=env)
    assert (s.budget, s.budget_s) == (config.SECONDS_POOL, 120.0)
    s = config.load({"budget": "256,600s"}, env=env)
    assert (s.budget, s.budget_s) == (256, 600.0)
    s = config.load({"budget": "32"}, env={"FACT_RAY_SEARCH": "halving", "FACT_RAY_RANKER": "learned"})
    assert (s.budget, s.budget_s, s.search, s.ranker) == (32, 0.0, "halving", "learned")
    for bad, fragment in (("0", "at least 1, got 0"), ("ten", "candidates (64), seconds (120s)"),
                          ("0s", "positive time")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            config.load({"budget": bad}, env=env)
    with pytest.raises(ConfigError, match="search must be rank or halving"):
        config.load({}, env={"FACT_RAY_SEARCH": "bandit"})
    with pytest.raises(ConfigError, match="ranker must be one of"):
        config.load({}, env={"FACT_RAY_RANKER": "oracle"})
    assert config.RANKERS == rankers.KINDS


def test_rank_ablation_scores_rankers_on_recorded_sweeps(tmp_path):
    """benchmarks/rank_ablation.py on sweeps shaped like budget_curve.py's (times from the hidden 'GPU' above):
    the leave-one-problem-out learned ranker recalls at least as often as random orders do."""
    import importlib.util
    import json
    from pathlib import Path

    from fact_ray.types import to_jsonable

    spec = importlib.util.spec_from_file_location(
        "rank_ablation", Path(__file__).resolve().parent.parent / "benchmarks" / "rank_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sweeps = {}
    for i, mnk in enumerate(TRAIN[:4] + HELD_OUT[:1]):
        p = _problem(mnk)
        rows = []
        for c in _sample(space(p, Arch.SM90, Precision.BF16), 64, i):
            ms = truth_ms(c, p)
            rows.append({"name": c.name, "config": to_jsonable(c), "status": "ok", "speedup": 1.0 / ms,
                         "median_ms": ms, "rel_time": ms})
        sweeps[f"p{i}/bf16"] = {"problem": to_jsonable(p), "arch": "sm90", "policy": "bf16", "configs": rows}
    src = tmp_path / "budget_curve.json"
    src.write_text(json.dumps({"sweeps": sweeps}))
    assert mod.main(["--sweeps", str(src), "--out", str(tmp_path), "--shuffles", "20"]) == 0
    result = json.loads((tmp_path / "rank_ablation.json").read_text())
    r = result["rankers"]
    assert set(r) >= {"heuristic", "learned", "random"} and r["heuristic"]["ranked"] == 5
    assert r["learned"]["ranked"] == 5, "each problem ranked by a model that never saw it"
    mean = {k: sum(v["ratio"].values()) / len(v["ratio"]) for k, v in r.items() if v["ratio"]}
    assert mean["learned"] >= mean["random"], mean
    assert all(0 < x <= 1.0 for v in r.values() for x in v["ratio"].values())
