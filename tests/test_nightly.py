"""A night's judgement on a real Parquet table: a planted regression (the incumbent made slower by an injected
timer) is demoted and flagged, a planted wrong incumbent is invalidated and never served or tried again, and a
winner measured in another environment is re-verified before it is served. CPU only: the timer is injected
(Triton's do_bench-parameter style); the farm's planning runs on a real capture of a real model."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fact_ray import farm
from fact_ray.config import Settings
from fact_ray.nightly import ModelNight, NightReport, environment_drift, judge, previous_winner, verdict_rows
from fact_ray.pattern_table import PatternTable, RowContext, TableKey, Toolchain, row_from_trial
from fact_ray.pattern_table.truth import DEMOTED, INVALIDATED
from fact_ray.realize.select import select
from fact_ray.types import Arch, KernelConfig, Match, Precision, TimeStats, Trial

TC = Toolchain(cuda="13.0", cutlass="4.2.0", torch="2.13.0", bench_method="1")
NIGHT0 = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)
NIGHT1 = NIGHT0 + timedelta(days=1)
MATCH = Match(rule="linear", family="gemm", nodes=("fc",), anchor="fc", params=(("M", 64), ("N", 256), ("K", 128)),
              dtype="float32", shapes=((64, 128), (256, 128)))
KEY = TableKey.of(MATCH.key, "fp32", "sm80", TC)
GPU = "NVIDIA H200"


def _config(name: str) -> KernelConfig:
    return KernelConfig(template="sm80_gemm", name=name, arch=Arch.SM80, precision=Precision.FP32, element="float",
                        opclass="simt", math_op="multiply_add", instruction=(1, 1, 1), tile=(128, 128, 8),
                        warps=(4, 2, 1), stages=3, alignment=(1, 1, 1))


def timer(times: dict[str, float], wrong: frozenset[str] = frozenset(), baseline: float = 2.0):
    """The injected measurement: what the GPU trial returns, from a table of medians (the test hook)."""

    def measure(name: str) -> Trial:
        ms = times[name]
        base = TimeStats(baseline, baseline * 0.99, baseline * 1.01, 100)
        if name in wrong:
            return Trial(name, "wrong", error="rel err 3e-2 > 1e-5", rel_err=3e-2, time=None, baseline=base)
        return Trial(name, "ok", rel_err=1e-7, max_abs_err=1e-6, time=TimeStats(ms, ms * 0.99, ms * 1.01, 100),
                     baseline=base)

    return measure


def _commit_night(table: PatternTable, trials: list[Trial], when: datetime, previous=None, gpu: str = GPU):
    """What the fleet does per key: select, commit the winner row, judge against the previous winner and commit the
    verdict's rows."""
    chosen = select(trials)
    ctx = RowContext(TC, f"night-{when:%d}", gpu, "node-1")
    table.commit([row_from_trial(chosen, MATCH, ctx, policy=Precision.FP32, arch=Arch.SM80,
                                 config=None if chosen.candidate_name == "torch" else _config(chosen.candidate_name),
                                 created_at=when)])
    verdict, extra = judge(previous, trials, chosen, match_key=MATCH.key, rule=MATCH.rule, gpu_name=gpu)
    if extra:
        table.commit(verdict_rows(extra, previous, MATCH, ctx))
    return verdict


def _night0(table: PatternTable) -> None:
    measure = timer({"torch": 2.0, "k_inc": 1.0, "k_alt": 1.2})
    _commit_night(table, [measure(n) for n in ("torch", "k_inc", "k_alt")], NIGHT0)
    assert table.best(KEY).config_name == "k_inc"


def _report(verdict) -> NightReport:
    return NightReport(fleet="test", night="2026-12-02", started="", seconds=1.0, gpus=1, threshold=0.05,
                       models=(ModelNight("m", "fp32", "sm80", GPU, (verdict,)),))


def test_a_planted_regression_is_demoted_and_flagged_with_a_nonzero_exit(tmp_path):
    table = PatternTable(str(tmp_path))
    _night0(table)
    prev = previous_winner(table.history(KEY), NIGHT1)
    assert prev.config_name == "k_inc"
    # Tonight the incumbent is 60 % slower (the hook); k_alt is unchanged-ish and now the fastest.
    measure = timer({"torch": 2.0, "k_inc": 1.6, "k_alt": 1.1})
    verdict = _commit_night(table, [measure(n) for n in ("k_inc", "torch", "k_alt")], NIGHT1, prev)
    assert verdict.regressed and verdict.changed and not verdict.invalidated
    assert verdict.winner == "k_alt" and "k_inc 1 -> 1.6 ms" in verdict.note
    fresh = PatternTable(str(tmp_path))
    assert fresh.best(KEY).config_name == "k_alt"  # demoted: tonight's time speaks for the incumbent
    inc_rows = [r for r in fresh.history(KEY) if r.config_name == "k_inc"]
    assert [r.status for r in inc_rows] == ["ok", DEMOTED] and inc_rows[-1].median_ms == 1.6  # history kept
    assert _report(verdict).exit_code == 1 and "1 regressions" in _report(verdict).summary_line()


def test_a_quiet_night_changes_nothing_and_exits_zero(tmp_path):
    table = PatternTable(str(tmp_path))
    _night0(table)
    prev = previous_winner(table.history(KEY), NIGHT1)
    measure = timer({"torch": 2.0, "k_inc": 1.01, "k_alt": 1.2})  # within the noise threshold
    verdict = _commit_night(table, [measure(n) for n in ("k_inc", "torch", "k_alt")], NIGHT1, prev)
    assert not (verdict.regressed or verdict.changed or verdict.invalidated)
    assert PatternTable(str(tmp_path)).best(KEY).median_ms == 1.01
    assert _report(verdict).exit_code == 0 and _report(verdict).clean


def test_a_planted_wrong_incumbent_is_invalidated_and_never_served_again(tmp_path):
    table = PatternTable(str(tmp_path))
    _night0(table)
    prev = previous_winner(table.history(KEY), NIGHT1)
    measure = timer({"torch": 2.0, "k_inc": 1.0, "k_alt": 1.2}, wrong=frozenset({"k_inc"}))
    verdict = _commit_night(table, [measure(n) for n in ("k_inc", "torch", "k_alt")], NIGHT1, prev)
    assert verdict.invalidated and verdict.winner == "k_alt" and _report(verdict).exit_code == 1
    history = PatternTable(str(tmp_path)).history(KEY)
    assert [r.status for r in history if r.config_name == "k_inc"] == ["ok", INVALIDATED]
    # A later night where it happens to pass again still cannot bring it back.
    measure = timer({"torch": 2.0, "k_inc": 0.5, "k_alt": 1.2})
    night2 = NIGHT1 + timedelta(days=1)
    _commit_night(table, [measure(n) for n in ("k_inc", "torch")], night2,
                  previous_winner(table.history(KEY), night2))
    assert PatternTable(str(tmp_path)).best(KEY).config_name in ("k_alt", "torch")
    assert all(r.config_name != "k_inc" for r in PatternTable(str(tmp_path)).top_k(KEY, 10))


def test_environment_drift_names_what_changed():
    ctx = RowContext(TC, "r", GPU, "node")
    row = row_from_trial(timer({"k": 1.0})("k"), MATCH, ctx, policy=Precision.FP32, arch=Arch.SM80,
                         config=_config("k"))
    assert environment_drift(row, {"gpu_name": GPU, "torch": "2.13.0", "cuda": "13.0", "cutlass": "4.2.0"}) == ()
    assert environment_drift(row, {"gpu_name": "NVIDIA H100 80GB HBM3"}) == (
        f"gpu_name: {GPU} -> NVIDIA H100 80GB HBM3",)
    # A fact the host does not know is no evidence; one the row never recorded is.
    assert environment_drift(row, {"gpu_name": "", "cudnn": ""}) == ()
    assert environment_drift(row, {"driver": "580.95.05"}) == ("driver: not recorded -> 580.95.05",)


# ------------------------------------------------------------------------------ the farm's planning (real capture)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fact_ray.actors.discovery import make_ranker, rank_matches
    from fact_ray.capture import capture, load_model, under_policy
    from fact_ray.discover import discover

    cap = capture(under_policy(load_model(str(Path(__file__).parent / "models" / "farm_tiny.py")), Precision.FP32))
    matches = discover(cap.graph, Arch.SM80, Precision.FP32)
    disc = rank_matches(make_ranker("off", Settings()), cap.graph, matches, Arch.SM80, Precision.FP32, cap.method)
    gemm = next(m for m in disc.matches if m.family in farm.GEMM_FAMILIES)
    return disc, gemm


def _plan(table, disc, retune=False, host=None):
    patterns = farm._patterns_of(disc.matches)
    todo = farm._plan(patterns, table, Precision.FP32, Arch.SM80, TC, 4, disc, retune, host or {})
    return {p.key: p for p in patterns}, todo


def _space_names(disc, gemm) -> list[str]:
    from fact_ray.realize.problem import problem_from_match
    from fact_ray.search_spaces import space

    return [c.name for c in space(problem_from_match(gemm, Precision.FP32), Arch.SM80, Precision.FP32)]


def _winner_row(gemm, name, status="ok", gpu=GPU, days=0):
    t = timer({name: 0.5})(name)
    return row_from_trial(t if status == "ok" else Trial(name, status), gemm, RowContext(TC, "n", gpu, "h"),
                          policy=Precision.FP32, arch=Arch.SM80, config=_config(name),
                          created_at=NIGHT0 + timedelta(days=days))


def test_the_incumbent_leads_a_retune_and_an_invalidated_kernel_is_never_tried_again(tmp_path, tiny):
    disc, gemm = tiny
    names = _space_names(disc, gemm)
    incumbent, bad = names[7], names[0]  # the incumbent is deep in the space's order; bad would lead it
    table = PatternTable(str(tmp_path))
    table.commit([_winner_row(gemm, bad, days=0)])
    table.commit([_winner_row(gemm, bad, status=INVALIDATED, days=1), _winner_row(gemm, incumbent, days=1)])
    by_key, todo = _plan(table, disc, retune=True)
    p = by_key[gemm.key]
    assert p in todo and [c.name for c in p.configs][0] == incumbent
    assert bad not in [c.name for c in p.configs] and len(p.configs) == 4


def test_an_environment_change_forces_reverification_before_serving(tmp_path, tiny):
    disc, gemm = tiny
    incumbent = _space_names(disc, gemm)[3]
    table = PatternTable(str(tmp_path))
    table.commit([_winner_row(gemm, incumbent, gpu=GPU)])
    by_key, todo = _plan(table, disc, host={"gpu_name": GPU})
    assert by_key[gemm.key].status == farm.FROM_TABLE and by_key[gemm.key] not in todo  # same environment: served
    by_key, todo = _plan(table, disc, host={"gpu_name": "NVIDIA H100 80GB HBM3"})
    p = by_key[gemm.key]
    assert p in todo and p.status != farm.FROM_TABLE
    assert [c.name for c in p.configs] == [incumbent] and "re-verified: gpu_name" in p.reason
    # Once re-verified on this GPU (its own row), it is served here without another check.
    table.commit([_winner_row(gemm, incumbent, gpu="NVIDIA H100 80GB HBM3", days=1)])
    by_key, _ = _plan(table, disc, host={"gpu_name": "NVIDIA H100 80GB HBM3"})
    assert by_key[gemm.key].status == farm.FROM_TABLE


def test_a_nights_first_phase_measures_incumbents_only_and_the_second_only_the_keys_asked(tmp_path, tiny):
    disc, gemm = tiny
    incumbent = _space_names(disc, gemm)[5]
    table = PatternTable(str(tmp_path))
    table.commit([_winner_row(gemm, incumbent)])
    patterns = farm._patterns_of(disc.matches)
    todo = farm._plan(patterns, table, Precision.FP32, Arch.SM80, TC, 4, disc, True, {"gpu_name": GPU},
                      farm._Night(fresh_since=NIGHT1, only_incumbent=True))
    p = next(x for x in todo if x.key == gemm.key)
    assert [c.name for c in p.configs] == [incumbent] and p.reason == "incumbent re-measured"
    # A pattern with no winner yet is tuned in full in the first phase already.
    others = [x for x in todo if x.key != gemm.key]
    assert all(len(x.configs) != 1 or x.match.family not in farm.GEMM_FAMILIES for x in others)
    # Second phase: only the keys asked for are re-tuned (incumbent first, full budget); the rest are served.
    patterns = farm._patterns_of(disc.matches)
    todo = farm._plan(patterns, table, Precision.FP32, Arch.SM80, TC, 4, disc, True, {"gpu_name": GPU},
                      farm._Night(retune_keys=frozenset({gemm.key})))
    p = next(x for x in todo if x.key == gemm.key)
    assert [c.name for c in p.configs][0] == incumbent and len(p.configs) == 4
    patterns = farm._patterns_of(disc.matches)
    todo = farm._plan(patterns, table, Precision.FP32, Arch.SM80, TC, 4, disc, True, {"gpu_name": GPU},
                      farm._Night(retune_keys=frozenset({"some other key"})))
    assert gemm.key not in {x.key for x in todo}
