"""Issue 16's norm and RoPE kernels on a GPU, against float64: every dtype, hidden sizes 768, 1024, 4096, 5120 and
an odd one (the general kernel), one row and many, the row kernel in its first launch shapes and the general
kernel; the fused residual add + norm (h exactly PyTorch's rounded x + r); RoPE in both forms on [B, H, S, D] views
with [S, D] and [1, 1, S, D] tables, an odd head dim's scalar path, q and k in one launch; the native dispatcher's
ops against the ctypes path; and the composed Llama (our RMSNorm and RoPE kernels in hf_llama) against eager.

    python3 -m pytest -m gpu tests/test_normrope_gpu.py
"""

from __future__ import annotations

import dataclasses
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fact_ray.realize import norm as N
from fact_ray.realize import rope as R
from fact_ray.types import Arch, Precision

pytestmark = [pytest.mark.gpu, pytest.mark.nvcc]

REPO = Path(__file__).resolve().parents[1]
CACHE = str(REPO / ".fact-ray" / "build-cache")
DTYPES = ("float32", "bfloat16", "float16")
POLICY = {"float32": Precision.FP32, "bfloat16": Precision.BF16, "float16": Precision.FP16}
COLS = (768, 1024, 4096, 5120, 1000, 1001)  # 1000: whole vectors in 16-bit types only; 1001: never
ROWS = (1, 37, 2048)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _arch() -> Arch:
    from fact_ray.toolchain import detect

    return detect(nvcc=None).arch


@pytest.fixture(scope="module")
def norm_libs():
    """(dtype, cols) -> the libraries to test: the first two launch shapes (bf16), the first (others), and the
    general kernel of each dtype; built several at once."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    from fact_ray.realize.build import build

    arch = _arch()
    wanted: dict[tuple[str, int], list] = {}
    for dtype in DTYPES:
        for cols in COLS:
            configs = N.norm_candidates(cols, dtype, arch, budget=16)
            rows = [c for c in configs if c.lanes][: 2 if dtype == "bfloat16" else 1]
            wanted[dtype, cols] = rows + [configs[-1]]
    unique = {c.name: c for cs in wanted.values() for c in cs}
    with ThreadPoolExecutor(max_workers=8) as pool:
        built = dict(zip(unique, pool.map(
            lambda c: build(N.emit_norm(N.DTYPE_OF_ELEMENT[c.element], arch, c), CACHE), unique.values())))
    for lib in built.values():
        assert lib.ok, lib.log[-3000:]
    return {key: [built[c.name] for c in cs] for key, cs in wanted.items()}


@pytest.fixture(scope="module")
def rope_libs():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    from fact_ray.realize.build import build

    arch = _arch()
    configs = [R.rope_config(d, arch, 256, 1) for d in DTYPES] + [R.rope_config("bfloat16", arch, 128, 4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        libs = list(pool.map(lambda c: build(R.emit_rope(R.DTYPE_OF_ELEMENT[c.element], arch, c), CACHE), configs))
    for lib in libs:
        assert lib.ok, lib.log[-3000:]
    return {"float32": [libs[0]], "bfloat16": [libs[1], libs[3]], "float16": [libs[2]]}


def _inputs(rows, cols, dt, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(rows, cols, device="cuda", generator=g) * 3 + 1.5).to(dt)  # a mean to subtract
    w = torch.randn(cols, device="cuda", generator=g).to(dt)
    b = torch.randn(cols, device="cuda", generator=g).to(dt)
    r = torch.randn(rows, cols, device="cuda", generator=g).to(dt)
    return x, w, b, r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", COLS)
def test_norms_match_float64(norm_libs, dtype, cols):
    dt, tol = getattr(torch, dtype), POLICY[dtype].tolerance
    for lib in norm_libs[dtype, cols]:
        kernel = N.NormKernel(lib)
        for rows in ROWS:
            x, w, b, _ = _inputs(rows, cols, dt, rows)
            for kind, call, ref in (
                ("layernorm", lambda o: kernel.layer_norm(x, w, b, 1e-5, out=o), N.reference(x, w, b, 1e-5,
                                                                                             "layernorm")),
                ("layernorm_plain", lambda o: kernel.layer_norm(x, None, None, 1e-3, out=o),
                 N.reference(x, None, None, 1e-3, "layernorm")),
                ("rmsnorm", lambda o: kernel.rms_norm(x, w, 1e-6, out=o), N.reference(x, w, None, 1e-6, "rmsnorm")),
            ):
                out = torch.full_like(x, float("nan"))  # an element never written fails
                call(out)
                torch.cuda.synchronize()
                assert not out.isnan().any(), (lib.source.symbols, kind, rows)
                assert rel_err(out, ref) < tol, (lib.source.symbols, kind, rows, rel_err(out, ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", (768, 4096, 1001))
def test_fused_residual_add_writes_h_as_pytorch_rounds_it_and_norms_it(norm_libs, dtype, cols):
    dt, tol = getattr(torch, dtype), POLICY[dtype].tolerance
    for lib in norm_libs[dtype, cols]:
        kernel = N.NormKernel(lib)
        for rows in (1, 2048):
            x, w, b, r = _inputs(rows, cols, dt, 7)
            for kind, bias in (("rmsnorm", None), ("layernorm", b)):
                h, y = kernel.add_norm(x, r, kind, w, bias, 1e-5)
                torch.cuda.synchronize()
                assert torch.equal(h, x + r), (lib.source.symbols, kind, rows)
                assert rel_err(y, N.reference(x + r, w, bias, 1e-5, kind)) < tol, (lib.source.symbols, kind)


def test_norm_rows_strided_and_pointers_unaligned(norm_libs):
    kernel = N.NormKernel(norm_libs["bfloat16", 4096][0])  # a row-kernel library
    assert kernel.library.source.configs[0].lanes > 0
    wide = torch.randn(2 * 37, 4096 + 8, device="cuda").bfloat16()[::2, :4096]  # rows 2 * 4104 apart: ld_x
    out = kernel.layer_norm(wide, None, None)
    assert rel_err(out, N.reference(wide, None, None, 1e-5, "layernorm")) < 2e-2
    # 2 bytes off a 16-byte boundary: the general kernel's scalar loads
    shifted = torch.randn(37 * 4096 + 1, device="cuda").bfloat16()[1:].view(37, 4096)
    out = kernel.rms_norm(shifted, None)
    assert rel_err(out, N.reference(shifted, None, None, 1e-6, "rmsnorm")) < 2e-2


def _qk(B, S, H, D, dt, seed):
    """q as the model holds it: a [B, H, S, D] view of the [B, S, H * D] projection."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(B, S, H * D, device="cuda", generator=g).to(dt).view(B, S, H, D).transpose(1, 2)


def _tables(S, D, dt, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    angles = torch.rand(S, D, device="cuda", generator=g) * 6.3
    return angles.cos().to(dt), angles.sin().to(dt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["half", "interleaved"])
@pytest.mark.parametrize("D", [64, 128, 96, 6])
def test_rope_matches_float64(rope_libs, dtype, form, D):
    dt, tol = getattr(torch, dtype), POLICY[dtype].tolerance
    for lib in rope_libs[dtype]:
        kernel = R.RopeKernel(lib)
        for B, S, H in ((1, 1, 1), (2, 37, 4), (4, 512, 8)):
            x = _qk(B, S, H, D, dt, S)
            cos, sin = _tables(S, D, dt, H)
            for c, s in ((cos, sin), (cos[None, None], sin[None, None])):  # [S, D] and HF's [1, 1, S, D]
                out = kernel.apply(x, c, s, form, out=torch.full_like(x, float("nan")))
                torch.cuda.synchronize()
                assert out.stride() == x.stride() and not out.isnan().any()
                assert rel_err(out, R.reference(x, c, s, form)) < tol, (lib.source.symbols, B, S, H, D)


def test_rope_q_and_k_in_one_launch(rope_libs):
    kernel = R.RopeKernel(rope_libs["bfloat16"][0])
    q, k = _qk(2, 300, 32, 128, torch.bfloat16, 0), _qk(2, 300, 8, 128, torch.bfloat16, 1)  # GQA: 8 KV heads
    cos, sin = _tables(300, 128, torch.bfloat16, 2)
    qo, ko = kernel.apply_qk(q, k, cos, sin, "half")
    torch.testing.assert_close(qo, kernel.apply(q, cos, sin, "half"), rtol=0, atol=0)
    torch.testing.assert_close(ko, kernel.apply(k, cos, sin, "half"), rtol=0, atol=0)
    assert rel_err(ko, R.reference(k, cos, sin, "half")) < 2e-2


def test_native_ops_match_the_ctypes_path(norm_libs, rope_libs):
    from fact_ray.realize import dispatch
    from fact_ray.realize.norm_family import NormFamily, NormProblem
    from fact_ray.realize.rope_family import RopeFamily, RopeProblem

    if not dispatch.available(CACHE):
        pytest.skip("the native dispatcher does not build here")
    lib = norm_libs["bfloat16", 4096][0]
    p = NormProblem(rows=2048, cols=4096, kind="rmsnorm", dtype="bfloat16", eps=1e-6, has_weight=True,
                    has_bias=False)
    call = dispatch.composed_fused(NormFamily(), p, lib.source.configs[0], lib)
    x, w, _, _ = _inputs(2048, 4096, torch.bfloat16, 3)
    torch.testing.assert_close(call(x, w, None), N.NormKernel(lib).rms_norm(x, w, 1e-6), rtol=0, atol=0)

    lib = rope_libs["bfloat16"][0]
    q = _qk(2, 64, 4, 128, torch.bfloat16, 4)
    cos, sin = _tables(64, 128, torch.bfloat16, 5)
    rp = RopeProblem(x_shape=tuple(q.shape), x_stride=tuple(q.stride()), cos_shape=(64, 128), sin_shape=(64, 128),
                     form="half", dtype="bfloat16")
    call = dispatch.composed_fused(RopeFamily(), rp, lib.source.configs[0], lib)
    y = call(q, cos, sin)
    assert y.stride() == q.stride()
    torch.testing.assert_close(y, R.RopeKernel(lib).apply(q, cos, sin, "half"), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["rmsnorm", "rope"])
def test_family_trial_verifies_and_times_against_the_models_op(norm_libs, rope_libs, family):
    from fact_ray.realize.norm_family import NormFamily, NormProblem
    from fact_ray.realize.rope_family import RopeFamily, RopeProblem
    from fact_ray.types import TrialStatus

    if family == "rmsnorm":
        fam, lib = NormFamily(), norm_libs["bfloat16", 4096][0]
        p = NormProblem(rows=8 * 2048, cols=4096, kind="rmsnorm", dtype="bfloat16", eps=1e-6, has_weight=True,
                        has_bias=False)
    else:
        fam, lib = RopeFamily(), rope_libs["bfloat16"][0]
        p = RopeProblem(x_shape=(8, 32, 2048, 128), x_stride=(2048 * 4096, 128, 4096, 1), cos_shape=(2048, 128),
                        sin_shape=(2048, 128), form="half", dtype="bfloat16")
    base, ours = fam.trial(p, lib.source.configs[0], lib, Precision.BF16, "cuda")
    assert base.status == TrialStatus.OK and ours.status in (TrialStatus.OK, TrialStatus.SLOWER), ours.error
    assert ours.rel_err < Precision.BF16.tolerance and ours.time.median_ms > 0


def test_composed_hf_llama_with_our_rmsnorm_and_rope_matches_eager(norm_libs, rope_libs, monkeypatch):
    """hf_llama in bf16 (2 layers, d 1024, 16 heads over 4 KV heads), its five RMSNorms and four RoPEs replaced by
    our kernels: the composed module's error against the float64 model is eager's, give or take."""
    pytest.importorskip("transformers")
    from fact_ray.capture import capture, load_model, under_policy
    from fact_ray.compose import KernelChoice, compose
    from fact_ray.discover import discover
    from fact_ray.reference import float64_reference

    for k, v in {"FR_BATCH": "2", "FR_SEQ": "256", "FR_LAYERS": "2"}.items():
        monkeypatch.setenv(k, v)
    loaded = under_policy(load_model(str(REPO / "benchmarks" / "models" / "hf_llama.py")), "bf16")
    loaded.module.cuda()
    loaded = dataclasses.replace(loaded, inputs=tuple(t.cuda() for t in loaded.inputs))
    inputs = loaded.inputs
    captured = capture(loaded)
    arch = _arch()
    matches = discover(captured.graph, arch, "bf16")
    norm_lib, rope_lib = norm_libs["bfloat16", 1024][0], rope_libs["bfloat16"][0]
    replaced = [m for m in matches if m.family in ("rmsnorm", "rope")]
    assert len(replaced) == 9
    # one winner per key: matches of the same shapes share it (the five RMSNorms one, q's and k's RoPE one each)
    winners = {m.key: KernelChoice(lib.source.configs[0], lib.path, lib.source.symbols[0], 1.2)
               for m in replaced for lib in [norm_lib if m.family == "rmsnorm" else rope_lib]}
    composed = compose(captured, matches, winners, "bf16", arch=arch)
    assert len(composed.fact_ray.replacements) == 9 and not composed.fact_ray.fallbacks
    with torch.no_grad():
        ours = composed(*inputs)
        eager = loaded.module(*inputs)
        ref = float64_reference(loaded.module, rebuild=loaded.rebuild, device="cuda")(*inputs)
    e_ours, e_eager = rel_err(ours, ref), rel_err(eager, ref)
    assert e_ours < Precision.BF16.tolerance and e_ours < 1.5 * e_eager + 1e-3, (e_ours, e_eager)
