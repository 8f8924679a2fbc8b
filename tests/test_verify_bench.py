"""verify() and time_interleaved() on a CPU: real float64 references, planted faults, an injected timer."""

import itertools

import pytest
import torch

from fact_ray.realize.bench import clearly_faster, summarize, time_interleaved
from fact_ray.realize.kernel import torch_op
from fact_ray.realize.verify import as_candidate, make_inputs, policy_dtype, verify
from fact_ray.types import GemmProblem, Precision, TimeStats

LINEAR = GemmProblem(M=48, N=40, K=64, epilogue="bias_act", activation="gelu")
BMM = GemmProblem(M=16, N=24, K=32, L=3, layout_b="row")


def correct(problem):
    return as_candidate(torch_op(problem))


@pytest.mark.parametrize("problem", [LINEAR, BMM])
def test_correct_fp32_passes(problem):
    res = verify(correct(problem), problem, Precision.FP32, "cpu")
    assert res.ok, res.reason
    assert 0 < res.rel_err < Precision.FP32.tolerance and res.allclose_ok and res.reason == ""


def test_correct_bf16_passes_and_inputs_follow_the_policy():
    p = GemmProblem(M=32, N=16, K=64, dtype="bfloat16", epilogue="bias_residual")
    seen = []

    def fn(a, b, bias, residual, out):
        seen.append((a.dtype, b.dtype, bias.dtype, residual.dtype, out.dtype))
        out.copy_(torch_op(p)(a, b, bias, residual))

    res = verify(fn, p, Precision.BF16, "cpu")
    assert res.ok, res.reason
    assert set(seen) == {(torch.bfloat16,) * 5}
    assert len(seen) == 2 * 4  # two runs per draw: three rand seeds and one randn
    with pytest.raises(ValueError, match="does not match policy"):
        verify(fn, p, Precision.FP32, "cpu")


def test_fresh_inputs_per_seed():
    a0, *_ = make_inputs(LINEAR, torch.float32, "cpu", 0)
    a1, *_ = make_inputs(LINEAR, torch.float32, "cpu", 1)
    a0b, *_ = make_inputs(LINEAR, torch.float32, "cpu", 0)
    assert not torch.equal(a0, a1) and torch.equal(a0, a0b)
    assert a0.min() >= 0 and a0.max() < 1  # rand, as KernelBench
    n, *_ = make_inputs(LINEAR, torch.float32, "cpu", 0, "randn")
    assert n.min() < 0


def test_wrong_answer_fails():
    def off_by_a_little(a, b, bias, residual, out):
        out.copy_(torch_op(LINEAR)(a, b, bias, residual) * (1 + 1e-3))

    res = verify(off_by_a_little, LINEAR, Precision.FP32, "cpu")
    assert not res.ok and "rel err" in res.reason and res.rel_err == pytest.approx(1e-3, rel=0.05)
    # the same error is within the bf16 policy's tolerance (and allclose's 1e-2)
    p = GemmProblem(M=48, N=40, K=64, dtype="bfloat16", epilogue="bias_act", activation="gelu")

    def bf16_off(a, b, bias, residual, out):
        out.copy_(torch_op(p)(a, b, bias, residual) * (1 + 1e-3))

    assert verify(bf16_off, p, Precision.BF16, "cpu").ok


def test_allclose_is_checked_on_top_of_the_frobenius_tolerance():
    # One element off by 0.5: rel Frobenius error about 2.5e-4 (< tf32's 1e-3), but allclose (1e-2) fails.
    def one_bad(a, b, bias, residual, out):
        out.copy_(torch_op(LINEAR)(a, b, bias, residual))
        out[3, 7] += 0.5

    res = verify(one_bad, LINEAR, Precision.TF32, "cpu")
    assert not res.ok and not res.allclose_ok and "allclose" in res.reason
    assert res.rel_err < Precision.TF32.tolerance


def test_unwritten_output_fails():
    def skips_last_row(a, b, bias, residual, out):
        out[:-1].copy_(torch_op(LINEAR)(a, b, bias, residual)[:-1])

    res = verify(skips_last_row, LINEAR, Precision.FP32, "cpu")
    assert not res.ok and "40 of 1920 outputs not finite" in res.reason and res.rel_err == float("inf")


def test_nan_never_passes():
    def one_nan(a, b, bias, residual, out):
        out.copy_(torch_op(LINEAR)(a, b, bias, residual))
        out[0, 0] = float("nan")

    res = verify(one_nan, LINEAR, Precision.FP32, "cpu")
    assert not res.ok and "not finite" in res.reason


def test_racy_candidate_fails():
    calls = itertools.count()

    def racy(a, b, bias, residual, out):
        # Every other run on the same inputs gets the largest output 5e-5 off: each run alone passes the fp32
        # tolerance and allclose, but no reordering of an fp32 sum moves a result that far.
        out.copy_(torch_op(LINEAR)(a, b, bias, residual))
        if next(calls) % 2:
            i = out.abs().argmax()
            out.view(-1)[i] *= 1 + 5e-5

    res = verify(racy, LINEAR, Precision.FP32, "cpu")
    assert not res.ok and res.reason.startswith("racy")
    assert res.rel_err < Precision.FP32.tolerance  # each run alone would have passed


def test_reordered_accumulation_is_not_a_race():
    calls = itertools.count()

    def split_k(a, b, bias, residual, out):
        # Alternate runs sum the two halves of K in another order, as a nondeterministic split-K would.
        if next(calls) % 2 == 0:
            out.copy_(torch_op(LINEAR)(a, b, bias, residual))
            return
        h = LINEAR.K // 2
        y = a[:, h:] @ b[:, h:].T + a[:, :h] @ b[:, :h].T
        out.copy_(torch.nn.functional.gelu(y + bias))

    res = verify(split_k, LINEAR, Precision.FP32, "cpu")
    assert res.ok, res.reason


def test_policy_dtypes():
    assert policy_dtype(Precision.BF16) == torch.bfloat16 and policy_dtype(Precision.FP16) == torch.float16
    assert policy_dtype(Precision.TF32) == torch.float32 == policy_dtype(Precision.FP32)


# --------------------------------------------------------------------------------------------- bench


def test_time_interleaved_interleaves_and_reports_medians():
    order = []
    fake_ms = {"A": [3.0, 1.0, 2.0, 100.0, 2.0], "B": [5.0, 5.0, 5.0, 5.0, 5.0], "C": [0.5, 0.7, 0.6, 0.4, 0.5]}
    fns = {name: (lambda n=name: order.append(n)) for name in fake_ms}
    rounds = {name: iter(ms) for name, ms in fake_ms.items()}
    current = []

    def timer(fn):
        fn()
        current.append(order[-1])
        return next(rounds[order[-1]])

    stats = time_interleaved(fns, warmup=2, reps=5, timer=timer)
    assert order[:6] == list("ABCABC")  # warm-up calls, interleaved, untimed
    assert current == list("ABC") * 5  # timed rounds A B C, A B C, ...
    assert stats["A"].median_ms == 2.0 and stats["A"].reps == 5  # the 100 ms outlier does not move the median
    assert stats["B"] == TimeStats(5.0, 5.0, 5.0, 5)
    assert stats["C"].median_ms == 0.5 and stats["C"].p10_ms == pytest.approx(0.44)
    assert stats["C"].p90_ms == pytest.approx(0.66)


def test_summarize_quantiles():
    s = summarize([float(x) for x in range(1, 12)])  # 1..11
    assert (s.median_ms, s.p10_ms, s.p90_ms, s.reps) == (6.0, 2.0, 10.0, 11)


def test_clearly_faster_needs_more_than_the_noise():
    base = TimeStats(1.0, 0.9, 1.1, 50)
    assert clearly_faster(TimeStats(0.8, 0.79, 0.81, 50), base)
    assert not clearly_faster(TimeStats(0.95, 0.94, 0.96, 50), base)  # within half the baseline's spread
    assert not clearly_faster(TimeStats(1.2, 1.1, 1.3, 50), base)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error of the default timer")
def test_default_timer_needs_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        time_interleaved({"a": lambda: None}, warmup=0, reps=1)
