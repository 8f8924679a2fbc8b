"""Real CUTLASS configs, compiled with the real build and run on the local GPU against float64.

One config per case is taken from the search space (the first the space offers, or the first with the property
the case is about), all cases are compiled in one parallel build, and each config must pass verify() at several
shapes, run through its custom op, and be timed by the default (CUDA-event) timer.
"""

import os
from dataclasses import replace

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.nvcc,
]

from fact_ray.realize.bench import time_interleaved  # noqa: E402
from fact_ray.realize.kernel import GemmKernel, register_op, torch_op  # noqa: E402
from fact_ray.realize.tune import local_arch  # noqa: E402
from fact_ray.realize.verify import make_inputs, policy_dtype, verify  # noqa: E402
from fact_ray.types import GemmProblem, Precision  # noqa: E402

BF16, FP32 = Precision.BF16, Precision.FP32

# name: (problem, policy, which config, extra shapes (M, N, K[, L]))
CASES = {
    "bf16_tn": (GemmProblem(M=1024, N=768, K=512, dtype="bfloat16"), BF16, "first",
                [(256, 2304, 768), (4096, 128, 1024)]),
    "bf16_bias_gelu_tanh": (GemmProblem(M=1024, N=3072, K=768, dtype="bfloat16", epilogue="bias_act",
                                        activation="gelu_tanh"), BF16, "first", [(512, 768, 256)]),
    "bf16_bias_residual": (GemmProblem(M=1024, N=768, K=3072, dtype="bfloat16", epilogue="bias_residual"), BF16,
                           "first", [(2048, 768, 768)]),
    "fp32_3xtf32": (GemmProblem(M=1024, N=1024, K=1024, layout_b="row"), FP32, "3xtf32",
                    [(512, 2048, 256), (768, 384, 4096)]),
    "bmm_fp32": (GemmProblem(M=256, N=512, K=256, L=8, layout_b="row"), FP32, "first", [(128, 256, 512, 4)]),
    "bmm_bf16": (GemmProblem(M=256, N=512, K=256, L=8, dtype="bfloat16", layout_b="row"), BF16, "first",
                 [(128, 256, 512, 4)]),
    "split_k_fp32": (GemmProblem(M=256, N=256, K=65536, layout_b="row"), FP32, "split_k", [(128, 256, 32768)]),
}


def _pick(configs, how, case):
    if not configs:
        pytest.fail(f"{case}: the search space is empty")
    if how == "3xtf32":
        chosen = [c for c in configs if c.math_op == "multiply_add_fast_f32"]
        assert chosen, f"{case}: the fp32 space offers no 3xTF32 config: {[c.name for c in configs]}"
        return chosen[0]
    if how == "split_k":
        chosen = [c for c in configs if c.split_k > 1]
        assert chosen, f"{case}: the space offers no split-K config: {[c.name for c in configs]}"
        return chosen[0]
    return configs[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from fact_ray.realize.build import build_many
    from fact_ray.realize.emit import emit
    from fact_ray.search_spaces import space

    device = torch.device("cuda", 0)
    arch = local_arch(device, None)
    picked = {}
    for case, (problem, policy, how, _) in CASES.items():
        picked[case] = _pick(list(space(problem, arch, policy, 16)), how, case)
    sources = emit(list(picked.values()), arch)
    cache = os.environ.get("FACT_RAY_TEST_CACHE") or str(tmp_path_factory.mktemp("build-cache"))
    libraries = build_many(sources, cache, min(8, os.cpu_count() or 1))
    lib_of = {cfg.name: lib for lib in libraries for cfg in lib.source.configs}
    return picked, lib_of, device


def _at(problem: GemmProblem, shape) -> GemmProblem:
    m, n, k, *rest = shape
    return replace(problem, M=m, N=n, K=k, L=rest[0] if rest else problem.L)


@pytest.mark.parametrize("case", list(CASES))
def test_config_is_correct_at_several_shapes(built, case):
    picked, lib_of, device = built
    problem, policy, _, shapes = CASES[case]
    cfg = picked[case]
    lib = lib_of[cfg.name]
    assert lib.ok, f"{cfg.name} failed to build:\n{lib.log[-3000:]}"
    for shape in [(problem.M, problem.N, problem.K, problem.L)] + list(shapes):
        p = _at(problem, shape)
        kernel = GemmKernel(lib, cfg, p)
        res = verify(lambda a, b, bias, r, out: kernel(a, b, bias, r, out=out), p, policy, device)
        assert res.ok, f"{cfg.name} at {shape}: {res.reason}"
        assert res.rel_err <= policy.tolerance and res.allclose_ok


@pytest.mark.parametrize("case", ["bf16_bias_gelu_tanh", "fp32_3xtf32"])
def test_custom_op_and_cuda_event_timing(built, case):
    picked, lib_of, device = built
    problem, policy, _, _ = CASES[case]
    cfg = picked[case]
    kernel = GemmKernel(lib_of[cfg.name], cfg, problem)
    op = register_op(kernel, problem)
    a, b, bias, residual = make_inputs(problem, policy_dtype(policy), device, 5)
    y = op(a, b, bias, residual)
    ref = torch_op(problem)(*(None if t is None else t.double() for t in (a, b, bias, residual)))
    rel = float((y.double() - ref).norm() / ref.norm())
    assert y.shape == ref.shape and y.dtype == policy_dtype(policy) and rel < policy.tolerance
    stats = time_interleaved({"torch": lambda: torch_op(problem)(a, b, bias, residual),
                              "kernel": lambda: op(a, b, bias, residual)}, warmup=3, reps=10)
    for s in stats.values():
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms and s.reps == 10


def test_tune_match_end_to_end(tmp_path):
    from fact_ray.config import Settings
    from fact_ray.realize.tune import tune_match
    from fact_ray.types import Match

    match = Match(rule="linear_bias", family="gemm_bias", nodes=("linear",), anchor="linear",
                  params=(("K", 1024), ("M", 4096), ("N", 1536), ("has_bias", True)), dtype="float32",
                  shapes=((4096, 1024), (1536, 1024), (1536,)))
    cache = os.environ.get("FACT_RAY_TEST_CACHE") or str(tmp_path / "cache")
    result = tune_match(match, Settings(policy=BF16, budget=2, cache_dir=cache))
    names = [t.candidate_name for t in result.trials]
    assert names[0] == "torch" and len(names) == 3 and result.configs == 2
    torch_trial = result.trials[0]
    assert torch_trial.time is not None and torch_trial.time.median_ms > 0
    for t in result.trials[1:]:
        assert t.status in ("ok", "slower", "compile_error", "cannot_implement", "wrong", "crashed"), t
        assert t.status != "wrong", t.error  # the space's first configs must be correct
    w = result.winner
    assert w.match_key == match.key and w.precision == BF16 and w.trials == result.trials
    if w.config is None:
        assert w.trial.candidate_name == "torch"
    else:
        assert w.trial.status == "ok" and w.trial.speedup > 1 and w.library_key
