"""The whole-module guarantee (fact_ray/guarantee.py) and the inference-only guard, on a CPU.

The modules are real and run: a two-layer model and the same model with its Linear layers computed by test-only
custom ops (tests/models/e2e_ops.py, registered as fact-ray registers its kernels). The timer is injected, as
Triton's do_bench lets one: it runs the call under a dispatch mode that charges each op a fixed cost, so the
module that calls the planted slow op is slower by construction and the selection can be checked exactly.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent / "models"))
import e2e_ops  # noqa: E402  (registers the fr_test ops)

from fact_ray.errors import InferenceOnly, UserError  # noqa: E402
from fact_ray.guarantee import CANNOT_BEAT, COMPILE, EAGER, FASTER, NOTHING, parse_against, select  # noqa: E402
from fact_ray.inference import guard  # noqa: E402

COSTS = {"fr_test.fast_linear.default": 4.0, "fr_test.slow_linear.default": 30.0}


class CostClock(TorchDispatchMode):
    """Charges every op it sees: GEMMs 10, the test ops their COSTS, anything else 1."""

    def __init__(self) -> None:
        super().__init__()
        self.ms = 0.0
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.seen.append(name)
        self.ms += COSTS.get(name, 10.0 if "mm" in name else 1.0)
        return func(*args, **(kwargs or {}))


def cost_timer(fn) -> float:
    clock = CostClock()
    with clock:
        fn()
    return clock.ms


@pytest.fixture
def setting():
    torch.manual_seed(0)
    model = e2e_ops.TwoLayers().eval()
    x = torch.randn(4, 16)
    built: list[frozenset] = []

    def build_with(plan):
        def build(keys):
            built.append(keys)
            module = e2e_ops.Replaced(model, {k: plan[k] for k in keys})
            return lambda: module(x)
        return build

    return model, x, build_with, built


def test_the_cost_clock_sees_the_test_ops(setting):
    model, x, _, _ = setting
    clock = CostClock()
    with clock, torch.no_grad():
        y = e2e_ops.Replaced(model, {"fc1": "slow"})(x)
    assert "fr_test.slow_linear.default" in clock.seen
    torch.testing.assert_close(y, model(x))  # the replacement computes what the layer does


def test_a_planted_slow_replacement_is_dropped_and_a_fast_one_kept(setting):
    model, x, build_with, _ = setting
    g = select(["fc1", "fc2"], build_with({"fc1": "fast", "fc2": "slow"}), lambda: model(x),
               describe={"fc1": ("linear", "fc1"), "fc2": ("linear", "fc2")}, reps=3, warmup=1, timer=cost_timer)
    assert g.verdict == FASTER and g.kept == ("fc1",)
    (d,) = g.dropped
    assert d.match_key == "fc2" and d.anchor == "fc2" and d.without_ms < d.with_ms
    assert "with it" in d.reason and "without it" in d.reason
    # End to end it is faster than eager, by the medians it was judged on.
    assert g.composed_ms < g.baseline_ms and math.isclose(g.ratio, g.baseline_ms / g.composed_ms)
    assert g.rounds == 2 and "1 replacement(s) kept, 1 dropped" in g.summary


def test_a_composition_that_cannot_beat_eager_says_so_and_keeps_nothing(setting):
    model, x, build_with, _ = setting
    g = select(["fc1", "fc2"], build_with({"fc1": "slow", "fc2": "slow"}), lambda: model(x), reps=2, warmup=0,
               timer=cost_timer)
    assert g.verdict == CANNOT_BEAT and g.kept == () and {d.match_key for d in g.dropped} == {"fc1", "fc2"}
    assert math.isnan(g.ratio) and "cannot beat eager" in g.summary


def test_helpful_replacements_are_all_kept_and_modules_are_built_once_per_set(setting):
    model, x, build_with, built = setting
    g = select(["fc1", "fc2"], build_with({"fc1": "fast", "fc2": "fast"}), lambda: model(x), reps=2, warmup=0,
               timer=cost_timer)
    assert g.verdict == FASTER and g.kept == ("fc1", "fc2") and g.dropped == () and g.rounds == 1
    assert len(built) == len(set(built)) == 3  # with both, without fc1, without fc2


def test_a_rewrite_that_loses_to_the_baseline_keeps_nothing(setting):
    # Every replacement helps the rewrite, but the baseline is faster still (as a compiled original can be).
    model, x, build_with, _ = setting
    def baseline():
        return model(x)

    g = select(["fc1"], build_with({"fc1": "fast"}), baseline, against=COMPILE, reps=2, warmup=0,
               timer=lambda fn: 1.0 if fn is baseline else cost_timer(fn))
    assert g.verdict == CANNOT_BEAT and g.kept == () and g.dropped[0].match_key == "fc1"
    assert "cannot beat torch.compile (default)" in g.summary


def test_nothing_to_replace_times_nothing():
    g = select([], lambda keys: pytest.fail("built"), lambda: pytest.fail("timed"))
    assert g.verdict == NOTHING and g.kept == () and g.rounds == 0


def test_against_parses_and_refuses():
    assert parse_against(None) == EAGER and parse_against("compile") == COMPILE and parse_against("none") is None
    with pytest.raises(UserError, match="--against"):
        parse_against("inductor")


# --------------------------------------------------------------------------------------------- inference only


def test_a_guarded_module_refuses_autograd_with_one_typed_error(setting):
    model, x, _, _ = setting
    module = guard(e2e_ops.Replaced(model, {"fc1": "fast"}))
    with pytest.raises(InferenceOnly, match="inference only"):
        module(x)  # parameters require grad, grad mode is on
    for p in module.parameters():
        p.requires_grad_(False)
    with pytest.raises(InferenceOnly):
        module(x.clone().requires_grad_())  # an input requires grad
    y = module(x)  # nothing requires grad: runs
    with torch.no_grad():
        torch.testing.assert_close(module(x.requires_grad_()), y)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), y)
    guard(module)
    assert len(module._forward_pre_hooks) == 1  # guarding twice adds no second hook
