"""Selection, and tune_problem's bookkeeping with planted candidates and an injected timer (on a CPU).

The planted candidates stand in for compiled kernels (which need a GPU to launch): each behaves as one kind of
bad or good kernel. Verification against the float64 reference and the selection run for real.
"""

import io
import math

import pytest
import torch
from rich.console import Console

from fact_ray.errors import CannotImplement, LaunchError
from fact_ray.realize.kernel import torch_op
from fact_ray.realize.select import select
from fact_ray.realize.tune import format_trials, tune_problem
from fact_ray.types import Arch, GemmProblem, KernelConfig, Library, Precision, Source, TimeStats, Trial

PROBLEM = GemmProblem(M=64, N=32, K=48, epilogue="bias_act", activation="relu")


def ts(ms, spread=0.0):
    return TimeStats(ms, ms - spread, ms + spread, 20)


def trial(name, status="ok", ms=None, base=1.0):
    return Trial(name, status, time=None if ms is None else ts(ms), baseline=None if ms is None else ts(base))


# --------------------------------------------------------------------------------------------- select()


def test_fastest_verified_kernel_wins():
    trials = [trial("torch", ms=1.0), trial("a", ms=0.8), trial("b", ms=0.5), trial("c", "slower", ms=1.2)]
    assert select(trials).candidate_name == "b"


def test_torch_wins_when_nothing_is_faster():
    trials = [trial("torch", ms=1.0), trial("a", "slower", ms=1.1), trial("b", ms=1.0)]  # a tie is not a win
    assert select(trials).candidate_name == "torch"


@pytest.mark.parametrize("status", ["compile_error", "cannot_implement", "wrong", "crashed", "timeout", "slower"])
def test_failed_trials_are_never_selected_however_fast(status):
    trials = [trial("torch", ms=1.0), trial("bad", status, ms=0.01), trial("good", ms=0.9)]
    assert select(trials).candidate_name == "good"
    assert select([trials[0], trials[1]]).candidate_name == "torch"


def test_min_speedup_and_noise():
    trials = [trial("torch", ms=1.0), trial("a", ms=0.9)]
    assert select(trials, min_speedup=1.2).candidate_name == "torch"
    assert select(trials, min_speedup=1.1).candidate_name == "a"
    noisy = Trial("n", "ok", time=TimeStats(0.95, 0.7, 1.2, 20), baseline=ts(1.0))
    assert select([trials[0], noisy]).candidate_name == "torch"  # 5% better, but the spread is 50%


def test_untimed_kernel_cannot_win_and_torch_is_made_up_when_missing():
    assert select([trial("a", ms=None)]).candidate_name == "torch"
    assert select([trial("a", ms=0.5)]).candidate_name == "a"  # its own side-by-side baseline suffices


# --------------------------------------------------------------------------------------------- tune_problem()

BEHAVIOUR = {
    "k_fast": "correct",
    "k_slow": "correct",
    "k_noimpl": "noimpl",
    "k_wrong": "wrong",
    "k_crash": "crash",
    "k_broken": "never built",
    "k_orphan": "no library",
}
FAKE_MS = {"torch": 1.0, "k_fast": 0.5, "k_slow": 2.0}
RAN: list[str] = []


class Planted:
    """A stand-in for GemmKernel with a planted behaviour (same interface: check() and __call__)."""

    def __init__(self, library, config, problem):
        self.name = config.name
        self.kind = BEHAVIOUR[config.name]
        self.op = torch_op(problem)

    def check(self, a, b, bias=None, residual=None, out=None):
        if self.kind == "noimpl":
            raise CannotImplement(f"{self.name}: can_implement rejects M=64 N=32 K=48 L=1 (status 1)")

    def __call__(self, a, b, bias=None, residual=None, out=None):
        RAN.append(self.name)
        if self.kind == "crash":
            raise LaunchError(f"{self.name}: run failed with status 7")
        y = self.op(a, b, bias, residual)
        if self.kind == "wrong":
            y = y + 1.0
        if out is None:
            return y
        out.copy_(y)
        return out


def fake_timer(fn):
    before = len(RAN)
    fn()
    return FAKE_MS[RAN[-1] if len(RAN) > before else "torch"]


def cfg(name):
    return KernelConfig(template="sm80_gemm", name=name, arch=Arch.SM80, precision=Precision.FP32,
                        element="float", opclass="simt", math_op="multiply_add", instruction=(1, 1, 1),
                        tile=(64, 64, 8))


def libraries(configs):
    ok = [c for c in configs if BEHAVIOUR[c.name] not in ("never built", "no library")]
    broken = [c for c in configs if BEHAVIOUR[c.name] == "never built"]
    libs = [Library(Source("good", Arch.SM80, "", tuple(ok), tuple(c.name for c in ok)), "key-good", True, "/x.so")]
    if broken:
        libs.append(Library(Source("bad", Arch.SM80, "", tuple(broken), ("b",)), "key-bad", False,
                            log="In file included from x.cu:1:\nx.cu(40): error: no instance of CollectiveBuilder\n"))
    return libs


def run(names, **kw):
    configs = [cfg(n) for n in names]
    RAN.clear()
    return tune_problem(PROBLEM, configs, libraries(configs), Precision.FP32, "cpu", timer=fake_timer,
                        kernel_factory=Planted, reps=5, **kw)


def test_tune_problem_reports_every_failure_and_picks_the_fast_kernel():
    choice, trials = run(list(BEHAVIOUR))
    by = {t.candidate_name: t for t in trials}
    assert trials[0].candidate_name == "torch" and len(trials) == 1 + len(BEHAVIOUR)
    assert by["k_broken"].status == "compile_error"
    assert by["k_broken"].error == "x.cu(40): error: no instance of CollectiveBuilder"
    assert by["k_orphan"].status == "compile_error" and "no library" in by["k_orphan"].error
    assert by["k_noimpl"].status == "cannot_implement" and "can_implement rejects" in by["k_noimpl"].error
    assert by["k_wrong"].status == "wrong" and "rel err" in by["k_wrong"].error and by["k_wrong"].rel_err > 1e-3
    assert by["k_crash"].status == "crashed" and "status 7" in by["k_crash"].error
    assert by["k_fast"].status == "ok" and by["k_fast"].speedup == pytest.approx(2.0)
    assert by["k_slow"].status == "slower" and by["k_slow"].speedup == pytest.approx(0.5)
    assert by["k_fast"].rel_err < Precision.FP32.tolerance
    assert by["torch"].time.median_ms == 1.0 and by["torch"].error == ""
    assert by["k_fast"].tflops == pytest.approx(PROBLEM.flops / 0.5e-3 / 1e12)
    # interleaved timing of the verified ones only
    assert set(RAN[-15:]) == {"k_fast", "k_slow"} and "k_wrong" not in RAN[-15:]
    assert choice.trial.candidate_name == "k_fast" and choice.config.name == "k_fast"
    assert choice.library_key == "key-good"


def test_tune_problem_keeps_the_torch_op_when_nothing_beats_it():
    events = []
    choice, trials = run(["k_slow", "k_wrong", "k_noimpl"], progress=events.append)
    assert choice.trial.candidate_name == "torch" and choice.config is None and choice.library_key == ""
    assert [t.status for t in trials] == ["ok", "slower", "wrong", "cannot_implement"]
    assert [e.stage for e in events if e.stage == "verify"] == ["verify"] * 3 and events[-1].stage == "done"


def test_format_trials_is_readable():
    _, trials = run(["k_fast", "k_wrong"])
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(format_trials(trials, chosen="k_fast"))
    text = buf.getvalue()
    assert "k_fast *" in text and "2.00x" in text and "wrong" in text and "rel err" in text
    assert not math.isnan(trials[1].speedup)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_tune_match_needs_a_gpu():
    from fact_ray.config import Settings
    from fact_ray.errors import NotAvailable
    from fact_ray.realize.tune import tune_match
    from fact_ray.types import Match

    match = Match(rule="linear", family="gemm_bias", nodes=("n",), anchor="n",
                  params=(("K", 32), ("M", 64), ("N", 16)), dtype="float32", shapes=((64, 32), (16, 32), (16,)))
    with pytest.raises(NotAvailable, match="no CUDA GPU"):
        tune_match(match, Settings())
