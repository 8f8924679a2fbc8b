"""The float64 reference is a fresh instance of the model loaded with its state, never a deep copy that closures
escape (issue 15: KernelBench's MiniGPT builds its MLP as a lambda over an nn.ModuleDict)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fact_ray import bench as bn
from fact_ray.capture import load_model, under_policy
from fact_ray.reference import ReferenceUnavailable, escaped_modules, float64_reference
from fact_ray.types import Precision

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "models"
CLOSURE = str(SUITE / "kb_minigpt_closure.py")



def test_a_deep_copy_of_the_closure_model_is_not_float64(small):
    loaded = load_model(CLOSURE)
    x = loaded.inputs[0]
    with pytest.raises(RuntimeError, match="dtype"):  # the bug the fresh instance fixes
        copy.deepcopy(loaded.module).double()(x.double())
    where = [w for w, _ in escaped_modules(copy.deepcopy(loaded.module))]
    assert where and "closure" in where[0]
    with pytest.raises(ReferenceUnavailable, match="closure"):
        float64_reference(loaded.module)  # no way to rebuild it: a clear error, not a half-converted copy


def test_closure_model_gets_a_right_float64_reference(small):
    loaded = load_model(CLOSURE)
    x = loaded.inputs[0]
    ref = float64_reference(loaded.module, rebuild=loaded.rebuild)
    assert all(p.dtype == torch.float64 for p in ref.parameters())
    assert not list(escaped_modules(ref))
    with torch.no_grad():
        out64 = ref(x.double())
        out32 = loaded.module(x)
    assert out64.dtype == torch.float64
    rel = float((out32.double() - out64).norm() / out64.norm())
    assert rel < 1e-5  # the very weights: fp32 vs float64 of the same model differ by rounding only
    # The fresh instance is not the original's random weights: every state entry is the original's.
    for name, t in loaded.module.state_dict().items():
        assert torch.equal(ref.state_dict()[name], t.double()), name


def test_reference_under_bf16_holds_the_bf16_weights_exactly(small):
    loaded = under_policy(load_model(CLOSURE), Precision.BF16)
    state = loaded.module.state_dict()
    rng = torch.random.get_rng_state()
    ref = float64_reference(loaded.module, rebuild=loaded.rebuild)
    assert torch.equal(torch.random.get_rng_state(), rng)  # building it did not move the caller's random stream
    w = "mlp.c_fc.weight"
    assert state[w].dtype == torch.bfloat16 and torch.equal(ref.state_dict()[w], state[w].double())


def _cpu_timer(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_bench_measures_the_closure_model_against_float64(small):
    loaded = load_model(CLOSURE)
    rows = bn.measure(loaded, Precision.FP32, {"eager": lambda: bn.Variant(loaded.module)}, device="cpu", reps=2,
                      warmup=0, timer=_cpu_timer)
    (eager,) = rows
    assert eager.status == bn.OK and eager.rel_err < 1e-5 and eager.allclose


def test_a_plain_module_without_closures_still_deep_copies():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ref = float64_reference(m)
    assert ref is not m and all(p.dtype == torch.float64 for p in ref.parameters())
    assert next(m.parameters()).dtype == torch.float32  # the original is untouched
