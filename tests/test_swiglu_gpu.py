"""The SwiGLU kernels on an H100/H200 (gpu, sm90 and nvcc markers): against float64 at several shapes (M off the
tile multiple, M = 1, a 3-D x, with and without biases, bf16 and fp16, a cooperative and a ping-pong config, and a
raster/swizzle launch variant) through the native op and the Python path; the interleaved-weight cache follows an
in-place weight update; the family's trial verifies and times a config; and a Llama MLP composed with the kernel
matches eager.

    python3 -m pytest -m gpu tests/test_swiglu_gpu.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.sm90, pytest.mark.nvcc]

REPO = Path(__file__).resolve().parents[1]
CACHE = str(REPO / ".fact-ray" / "build-cache")
POLICY = {"bfloat16": "bf16", "float16": "fp16"}


@pytest.fixture(scope="module")
def built():
    """dtype -> [(config, library)]: a cooperative and a ping-pong config per dtype, built in parallel, and for bf16
    a launch variant of the cooperative one (raster along N, swizzle 4: compiled in its unit, no new kernel)."""
    from fact_ray.realize.pipeline import LocalExecutor
    from fact_ray.realize.swiglu import emit_swiglu
    from fact_ray.search_spaces import swiglu as space
    from fact_ray.types import Arch, Precision

    picks = {}
    for dtype, policy in POLICY.items():
        configs = space.space(4096, 4096, 1024, Precision(policy), Arch.SM90)
        picks[dtype] = [next(c for c in configs if c.kernel_schedule == s)
                        for s in (space.COOPERATIVE, space.PINGPONG)]
    coop = picks["bfloat16"][0]
    picks["bfloat16"].append(space.config(Precision.BF16, coop.kernel_schedule, coop.tile, coop.cluster[:2],
                                          raster="along_n", max_swizzle=4))
    sources = emit_swiglu([c for cs in picks.values() for c in cs], Arch.SM90)
    libs = LocalExecutor(CACHE).build(sources, lambda b: None)
    by_config = {}
    for b in libs:
        assert b.ok, b.library.log[-3000:]
        for c in b.source.configs:
            by_config[c.name] = b.library
    return {dtype: [(c, by_config[c.name]) for c in cs] for dtype, cs in picks.items()}


def _inputs(M, F, K, dtype, bias, seed=0, lead=()):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(*lead, M, K, device="cuda", generator=g).to(dt)
    wg = (torch.randn(F, K, device="cuda", generator=g) * K ** -0.5).to(dt)
    wu = (torch.randn(F, K, device="cuda", generator=g) * K ** -0.5).to(dt)
    bg = (0.1 * torch.randn(F, device="cuda", generator=g)).to(dt) if bias else None
    bu = (0.1 * torch.randn(F, device="cuda", generator=g)).to(dt) if bias else None
    return x, wg, wu, bg, bu


def _rel(out, ref) -> float:
    import torch

    return float(torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("dtype", sorted(POLICY))
@pytest.mark.parametrize("M,F,K,bias,lead", [
    (1, 512, 256, False, ()),          # decode: one row
    (1, 512, 256, True, ()),
    (77, 1000, 512, True, ()),         # M and F off every tile multiple
    (300, 384, 1024, False, (2,)),     # a 3-D x [2, 300, K]: leading dims fold into M
    (2048, 2816, 1024, False, ()),     # several waves of tiles
    (1000, 1536, 4096, True, ()),
])
def test_against_float64(built, dtype, M, F, K, bias, lead):
    import torch

    from fact_ray.realize import dispatch
    from fact_ray.realize.kernel import symbol_of
    from fact_ray.realize.swiglu import SwiGluKernel, reference
    from fact_ray.realize.swiglu_family import SwiGluProblem
    from fact_ray.types import Precision

    tol = Precision(POLICY[dtype]).tolerance
    x, wg, wu, bg, bu = _inputs(M, F, K, dtype, bias, lead=lead)
    ref = reference(*[t.double() if t is not None else None for t in (x, wg, wu, bg, bu)])
    eager = _rel(reference(x, wg, wu, bg, bu), ref)
    problem = SwiGluProblem(M=M, F=F, K=K, dtype=dtype, has_bias=bias)
    for cfg, lib in built[dtype]:
        # the Python path into a NaN-poisoned output: every element must be written
        out = torch.full(tuple(x.shape[:-1]) + (F,), math.nan, dtype=x.dtype, device="cuda")
        y = SwiGluKernel(lib, cfg)(x, wg, wu, bg, bu, out=out)
        assert bool(torch.isfinite(y).all()), f"{cfg.name}: unwritten or non-finite outputs"
        rel = _rel(y, ref)
        assert rel <= tol and rel <= 2 * eager + 1e-3, f"{cfg.name}: rel err {rel:.3g} (eager {eager:.3g})"
        # the native op, as a composed module calls it
        sym = symbol_of(lib, cfg)
        native = dispatch.caller(dispatch.bind_swiglu(lib, problem, sym))
        z = native(x, wg, wu, bg, bu)
        assert z.shape == y.shape and _rel(z, ref) <= tol
        assert torch.equal(z, y)  # one kernel, one answer, whichever path calls it


def test_the_packed_weights_follow_an_in_place_update(built):
    import torch

    from fact_ray.realize import dispatch
    from fact_ray.realize.kernel import symbol_of
    from fact_ray.realize.swiglu import reference
    from fact_ray.realize.swiglu_family import SwiGluProblem

    cfg, lib = built["bfloat16"][0]
    x, wg, wu, _, _ = _inputs(256, 512, 512, "bfloat16", False, seed=3)
    sym = symbol_of(lib, cfg)
    call = dispatch.caller(dispatch.bind_swiglu(lib, SwiGluProblem(256, 512, 512, "bfloat16"), sym))
    first = call(x, wg, wu, None, None)
    assert torch.equal(call(x, wg, wu, None, None), first)  # served from the cached copy
    with torch.no_grad():
        wu.mul_(-1.0)  # in place: the cached copy is stale now
    flipped = call(x, wg, wu, None, None)
    assert _rel(flipped, reference(x.double(), wg.double(), wu.double())) <= 2e-2
    assert torch.allclose(flipped.float(), -first.float(), atol=1e-2, rtol=1e-2)


def test_the_family_trial_verifies_and_times(built):
    from fact_ray.realize.swiglu_family import SwiGluFamily, SwiGluProblem
    from fact_ray.types import TrialStatus

    cfg, lib = built["bfloat16"][0]
    problem = SwiGluProblem(M=2048, F=2816, K=1024, dtype="bfloat16")
    torch_trial, trial = SwiGluFamily().trial(problem, cfg, lib, "bf16", "cuda", reps=10)
    assert torch_trial.status == TrialStatus.OK and torch_trial.time.median_ms > 0
    assert trial.status in (TrialStatus.OK, TrialStatus.SLOWER), trial.error
    assert trial.rel_err <= 2e-2 and trial.time.median_ms > 0


def test_the_composed_llama_mlp_matches_eager(built, monkeypatch):
    import torch

    from fact_ray.capture import capture, load_model, under_policy
    from fact_ray.compose import KernelChoice, check, compose
    from fact_ray.discover import discover
    from fact_ray.realize.kernel import symbol_of

    for k, v in {"FR_BATCH": "2", "FR_SEQ": "96", "FR_EMBD": "512", "FR_HEADS": "4", "FR_KV_HEADS": "2",
                 "FR_HEAD_DIM": "128", "FR_FFN": "1408"}.items():
        monkeypatch.setenv(k, v)
    loaded = under_policy(load_model(str(REPO / "benchmarks" / "models" / "llama3_8b_layer.py")), "bf16")
    captured = capture(loaded)
    (m,) = [m for m in discover(captured.graph, "sm90", "bf16") if m.family == "swiglu"]
    cfg, lib = built["bfloat16"][0]
    sym = symbol_of(lib, cfg)
    composed = compose(captured, [m], {m.key: KernelChoice(cfg, lib.path, sym)}, "bf16")
    assert [r.op for r in composed.fact_ray.replacements] == ["fact_ray_native.swiglu"]
    # the house's end-to-end proof: composed vs the model in float64, fresh inputs, the bf16 policy's tolerance
    report = check(loaded.module, composed, "bf16", seeds=(0, 1), rebuild=loaded.rebuild)
    assert report.passed, report.reason
    model, x = loaded.module.cuda(), loaded.inputs[0].cuda()
    with torch.no_grad():
        want, got = model(x), composed(x)
    assert got.shape == want.shape and _rel(got, want.double()) <= 2e-2
