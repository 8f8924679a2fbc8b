"""Our LayerNorm/RMSNorm kernels and example 41's causal attention: rendering, real nvcc compiles of both TUs
(sm_80 + sm_90a), their C ABIs' argument checks (which answer before any CUDA call, so they run here), and on a
GPU their numbers against float64 torch.

The attention compile needs cuRAND's headers (kernel_forward.h includes <curand_kernel.h>): it finds them in the
toolkit or an installed nvidia-curand wheel, or in the folder named by FACT_RAY_CURAND_INCLUDE, and skips saying
so when there are none.
"""

import ctypes
import os
import re
import shutil

import pytest
import torch

from fact_ray.errors import CannotImplement, NotAvailable, UnsupportedDtype
from fact_ray.fastcall import aten_name
from fact_ray.realize import attention as A
from fact_ray.realize import norm as N
from fact_ray.realize.build import exported_symbols
from fact_ray.types import Arch, Precision

NORM_DTYPES = ("float32", "bfloat16", "float16")
POLICY = {"float32": Precision.FP32, "bfloat16": Precision.BF16, "float16": Precision.FP16}


def _curand_hints() -> list[str]:
    env = os.environ.get("FACT_RAY_CURAND_INCLUDE")
    return [env] if env else []


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


# --------------------------------------------------------------------------------------------- rendering


def test_emit_norm_fills_every_slot_and_differs_per_dtype():
    sources = [N.emit_norm(d) for d in NORM_DTYPES]
    for s, ctype in zip(sources, ("float", "__nv_bfloat16", "__half")):
        assert "{{" not in s.code
        assert f"using Element = {ctype};" in s.code
        assert s.configs[0].template == "norm" and s.symbols == ("fr_norm_run",)
    assert len({s.name for s in sources}) == 3
    assert N.emit_norm("bfloat16") == N.emit_norm("bfloat16")  # deterministic: same text, same cache key


def test_emit_rejects_unknown_dtypes():
    with pytest.raises(UnsupportedDtype):
        N.emit_norm("float64")
    with pytest.raises(UnsupportedDtype):
        A.emit_attention(["float32", "int8"])
    with pytest.raises(UnsupportedDtype):
        A.emit_attention([])


def test_emit_attention_selects_dtypes_in_a_fixed_order():
    s = A.emit_attention(["bfloat16", "float32"])
    assert s.code == A.emit_attention(["float32", "bfloat16"]).code
    assert "{{" not in s.code
    assert re.search(r"#define FR_ATTN_HAS_F32 1\b", s.code) and re.search(r"#define FR_ATTN_HAS_F16 0\b", s.code)
    assert [c.precision for c in s.configs] == [Precision.FP32, Precision.BF16]


# --------------------------------------------------------------------------------------------- compiles


@pytest.fixture(scope="module")
def cache(session_build_cache):
    return session_build_cache  # the float32 LayerNorm unit is the farm tests' too


@pytest.fixture(scope="module")
def norm_libs(cache):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    return {d: N.build_norm(d, cache) for d in NORM_DTYPES}


def _built_attention(cache, dtypes=("float32", "bfloat16"), **kw):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    if A.curand_include_dir(_curand_hints()) is None:
        pytest.skip("curand_kernel.h not found (toolkit, nvidia-curand wheel or FACT_RAY_CURAND_INCLUDE): "
                    "example 41 cannot compile")
    return A.build_attention(dtypes, cache, curand_hints=_curand_hints(), **kw)


@pytest.fixture(scope="module")
def attn_lib(cache):
    return _built_attention(cache)


@pytest.mark.nvcc
def test_norm_compiles_for_sm80_and_sm90a_with_its_abi(norm_libs):
    for dtype, lib in norm_libs.items():
        assert lib.ok, lib.log[-3000:]
        assert {"fr_abi_version", "fr_norm_element", "fr_norm_run"} <= exported_symbols(lib.path)
        assert "code=sm_80" in lib.log and "code=sm_90a" in lib.log
        handle = N.load_norm(lib)  # dlopen works without a GPU: cudart is static, the driver loads lazily
        assert handle.fr_abi_version() == N.NORM_ABI_VERSION
        assert handle.fr_norm_element() == N._DTYPES[dtype][1]


@pytest.mark.nvcc
def test_norm_run_refuses_bad_arguments_before_touching_cuda(norm_libs):
    run = N.load_norm(norm_libs["float32"]).fr_norm_run
    buf = (ctypes.c_float * 64)()

    def args(**kw):
        a = N.FrNormArgs(x=ctypes.addressof(buf), y=ctypes.addressof(buf), rows=4, cols=16, ld_x=16, ld_y=16,
                         eps=1e-5, kind=N.KIND["layernorm"])
        for k, v in kw.items():
            setattr(a, k, v)
        return ctypes.byref(a)

    assert run(None) == N.EINVAL
    assert run(args(cols=0)) == N.EINVAL
    assert run(args(ld_x=8)) == N.EINVAL  # rows would overlap
    assert run(args(kind=7)) == N.EINVAL
    assert run(args(eps=float("nan"))) == N.EINVAL
    assert run(args(kind=N.KIND["rmsnorm"], bias=ctypes.addressof(buf))) == N.EINVAL  # RMSNorm has no bias
    assert run(args(rows=0)) == 0  # nothing to do is success, and launches nothing


@pytest.mark.nvcc
@pytest.mark.slow
def test_attention_compiles_with_its_abi_and_refuses_what_it_cannot_run(attn_lib):
    assert attn_lib.ok, attn_lib.log[-3000:]
    assert {"fr_abi_version", "fr_attn_supports", "fr_attn_workspace", "fr_attn_run"} <= exported_symbols(
        attn_lib.path)
    assert "code=sm_80" in attn_lib.log and "code=sm_90a" in attn_lib.log
    h = A.load_attention(attn_lib)
    assert h.fr_abi_version() == A.ATTN_ABI_VERSION
    assert [h.fr_attn_supports(c) for c in (0, 1, 2)] == [1, 1, 0]

    def args(**kw):
        B, S, H, D = 1, 77, 2, 96
        a = A.FrAttnArgs(q=16, k=16, v=16, o=16, B=B, H=H, S_q=S, S_k=S, D=D, scale=D ** -0.5, causal=1, dtype=1)
        for n in "qkvo":  # contiguous BMHK
            setattr(a, f"{n}_stride_b", S * H * D)
            setattr(a, f"{n}_stride_s", H * D)
            setattr(a, f"{n}_stride_h", D)
        for k, v in kw.items():
            setattr(a, k, v)
        return ctypes.byref(a)

    # 32 queries x 128 keys with kMaxK = 128 keeps the output in registers: no workspace.
    assert h.fr_attn_workspace(args()) == 0
    assert h.fr_attn_run(args(q=None)) == A.EINVAL
    assert h.fr_attn_run(args(D=160)) == A.ENOTSUP
    assert h.fr_attn_run(args(dtype=2)) == A.ENOTSUP  # fp16 not in this TU
    assert h.fr_attn_run(args(o_stride_h=1)) == A.ENOTSUP  # the kernel writes O as BMHK
    assert h.fr_attn_run(args(q=18)) == A.ENOTSUP  # misaligned pointer: refused, never run unaligned
    assert h.fr_attn_run(args(D=90, q_stride_h=90, k_stride_h=90, v_stride_h=90, o_stride_h=90)) == A.ENOTSUP


@pytest.fixture(scope="module")
def attn_lib_64(cache):
    return _built_attention(cache, block=(64, 64, 64))


@pytest.mark.nvcc
@pytest.mark.slow
def test_the_64x64_block_compiles_and_refuses_head_dims_over_64(attn_lib_64):
    assert attn_lib_64.ok, attn_lib_64.log[-3000:]
    h = A.load_attention(attn_lib_64)
    assert h.fr_abi_version() == A.ATTN_ABI_VERSION
    B, S, H = 1, 77, 2

    def args(D):
        a = A.FrAttnArgs(q=16, k=16, v=16, o=16, B=B, H=H, S_q=S, S_k=S, D=D, scale=D ** -0.5, causal=1, dtype=0)
        for n in "qkvo":
            setattr(a, f"{n}_stride_b", S * H * D)
            setattr(a, f"{n}_stride_s", H * D)
            setattr(a, f"{n}_stride_h", D)
        return ctypes.byref(a)

    assert h.fr_attn_run(args(96)) == A.ENOTSUP  # kMaxK = 64
    assert h.fr_attn_workspace(args(64)) == 0  # kMaxK <= kKeysPerBlock: the output stays in registers


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_64x64_block_matches_float64(attn_lib_64, dtype):
    kernel = A.AttentionKernel(attn_lib_64)
    dt = getattr(torch, dtype)
    for B, S, D in ((1, 77, 64), (2, 200, 32)):
        g = torch.Generator(device="cuda").manual_seed(S)
        q, k, v = (torch.randn(B, S, 3, D, device="cuda", generator=g).to(dt) for _ in range(3))
        out = torch.full((B, S, 3, D), float("nan"), dtype=dt, device="cuda")
        kernel(q, k, v, causal=True, out=out)
        torch.cuda.synchronize()
        assert rel_err(out, A.reference(q, k, v, causal=True)) < POLICY[dtype].tolerance


@pytest.fixture(scope="module")
def attn_lib_tf32(cache):
    return _built_attention(cache, ("float32",), f32_math="tf32")


def test_emit_attention_tf32_is_another_tu_recorded_as_tf32():
    three, one = A.emit_attention(["float32"]), A.emit_attention(["float32"], f32_math="tf32")
    assert re.search(r"#define FR_ATTN_F32_ONE_PASS 0\b", three.code)
    assert re.search(r"#define FR_ATTN_F32_ONE_PASS 1\b", one.code)
    assert three.name != one.name and three.configs[0].name != one.configs[0].name
    assert (three.configs[0].precision, three.configs[0].math_op) == (Precision.FP32, "multiply_add_fast_f32")
    assert (one.configs[0].precision, one.configs[0].math_op) == (Precision.TF32, "multiply_add")
    both = A.emit_attention(["float32", "bfloat16"], f32_math="tf32")  # bf16 has one math whatever f32 takes
    assert [c.precision for c in both.configs] == [Precision.TF32, Precision.BF16]
    with pytest.raises(ValueError, match="f32_math"):
        A.emit_attention(["float32"], f32_math="fp64")


def test_tf32_policy_offers_both_fp32_maths_and_fp32_policy_only_3xtf32():
    from fact_ray.realize.attention_family import AttentionFamily, AttentionProblem

    fam = AttentionFamily()
    p = AttentionProblem(B=2, H=8, S=512, D=96, dtype="float32", causal=True, scale=96 ** -0.5,
                         spelling="explicit")
    assert [c.math_op for c in fam.candidates(p, Precision.FP32, Arch.SM90, 8)] == ["multiply_add_fast_f32"]
    tf32 = AttentionProblem(**{**p.__dict__, "tf32": True})
    configs = fam.candidates(tf32, Precision.TF32, Arch.SM90, 8)
    assert [c.math_op for c in configs] == ["multiply_add_fast_f32", "multiply_add"]
    assert [s.configs for s in fam.sources(configs, Arch.SM90)] == [(c,) for c in configs]
    # an fp32-class kernel serves the tf32 policy; a tf32 one never the fp32 policy
    assert Precision.FP32.serves(Precision.TF32) and not Precision.TF32.serves(Precision.FP32)
    assert not Precision.FP32.serves(Precision.BF16)


@pytest.mark.nvcc
@pytest.mark.slow
def test_the_one_pass_tf32_attention_compiles(attn_lib_tf32):
    assert attn_lib_tf32.ok, attn_lib_tf32.log[-3000:]
    h = A.load_attention(attn_lib_tf32)
    assert h.fr_abi_version() == A.ATTN_ABI_VERSION
    assert [h.fr_attn_supports(c) for c in (0, 1, 2)] == [1, 0, 0]


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_the_one_pass_tf32_attention_meets_tf32_not_fp32(attn_lib_tf32, attn_lib, head_dim):
    one, three = A.AttentionKernel(attn_lib_tf32), A.AttentionKernel(attn_lib)
    B, H, S = 1, 3, 77
    g = torch.Generator(device="cuda").manual_seed(head_dim)
    q, k, v = (torch.randn(B, S, H, head_dim, device="cuda", generator=g) for _ in range(3))
    ref = A.reference(q, k, v, causal=True)
    e1, e3 = rel_err(one(q, k, v, causal=True), ref), rel_err(three(q, k, v, causal=True), ref)
    assert e1 < Precision.TF32.tolerance, e1
    # one TF32 product really is one: its error sits well above the 3xTF32 kernel's fp32-class error
    assert e3 < Precision.FP32.tolerance < e1, (e3, e1)


def test_missing_curand_headers_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "curand_include_dir", lambda hints=(), nvcc="nvcc": None)
    with pytest.raises(NotAvailable, match="curand_kernel.h not found"):
        A.build_attention(["bfloat16"], str(tmp_path))


# --------------------------------------------------------------------------------------------- GPU numbers


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("cols", [768, 1000, 4096])
def test_norms_match_float64(norm_libs, dtype, cols):
    kernel = N.NormKernel(norm_libs[dtype])
    dt = getattr(torch, dtype)
    tol = POLICY[dtype].tolerance
    for seed in (0, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        rows = 37  # not a multiple of anything the kernel blocks by
        x = (torch.randn(rows, cols, device="cuda", generator=g) * 3 + 1.5).to(dt)  # a mean to subtract
        w = torch.randn(cols, device="cuda", generator=g).to(dt)
        b = torch.randn(cols, device="cuda", generator=g).to(dt)
        for kind, call, ref in (
            ("layernorm", lambda o: kernel.layer_norm(x, w, b, 1e-5, out=o), N.reference(x, w, b, 1e-5, "layernorm")),
            ("layernorm_plain", lambda o: kernel.layer_norm(x, None, None, 1e-3, out=o),
             N.reference(x, None, None, 1e-3, "layernorm")),
            ("rmsnorm", lambda o: kernel.rms_norm(x, w, 1e-6, out=o), N.reference(x, w, None, 1e-6, "rmsnorm")),
        ):
            out = torch.full_like(x, float("nan"))
            call(out)
            torch.cuda.synchronize()
            assert not out.isnan().any(), kind
            assert rel_err(out, ref) < tol, (kind, rel_err(out, ref))
    # A strided row view (every other row of a wider buffer) folds into ld_x; vectorised path off for 1000 cols.
    wide = torch.randn(2 * 37, cols + 8, device="cuda").to(dt)[::2, :cols]
    out = kernel.layer_norm(wide, w, b)
    assert rel_err(out, N.reference(wide, w, b, 1e-5, "layernorm")) < tol


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_causal_attention_matches_float64(attn_lib, dtype, head_dim):
    kernel = A.AttentionKernel(attn_lib)
    dt = getattr(torch, dtype)
    B, H, S = 1, 3, 77  # S not a multiple of the 32-query or 128-key blocks
    for seed in (0, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(B, S, H, head_dim, device="cuda", generator=g).to(dt) for _ in range(3))
        out = torch.full((B, S, H, head_dim), float("nan"), dtype=dt, device="cuda")
        kernel(q, k, v, causal=True, out=out)
        torch.cuda.synchronize()
        ref = A.reference(q, k, v, causal=True)
        assert not out.isnan().any()
        assert rel_err(out, ref) < POLICY[dtype].tolerance, rel_err(out, ref)
    # [B, H, S, D] tensors as the usual transposed views: strides, no copies.
    qh, kh, vh = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out2 = kernel(qh, kh, vh, causal=True)
    assert rel_err(out2, A.reference(q, k, v, causal=True)) < POLICY[dtype].tolerance


@pytest.mark.nvcc
def test_norm_kernel_refuses_cpu_tensors(norm_libs):
    with pytest.raises(CannotImplement):
        N.NormKernel(norm_libs["float32"]).layer_norm(torch.randn(4, 8))


# --------------------------------------------------------------------------------------------- in the pipeline

from pathlib import Path  # noqa: E402

SMALL_BLOCK = str(Path(__file__).parent / "models" / "small_block.py")


def _small_block(policy: str = "fp32"):
    from fact_ray.capture import capture, load_model, under_policy
    from fact_ray.discover import discover

    loaded = under_policy(load_model(SMALL_BLOCK), policy)
    captured = capture(loaded)
    return loaded, captured, discover(captured.graph, Arch.SM90, policy)


def test_attention_and_norm_matches_become_kernel_problems():
    from fact_ray.realize.attention_family import AttentionProblem
    from fact_ray.realize.family import for_match
    from fact_ray.realize.norm_family import NormProblem

    def problem_of(m, policy):
        return for_match(m).problem(m, Precision(policy))

    _, _, matches = _small_block()
    attn = next(m for m in matches if m.family == "attention")
    assert problem_of(attn, "fp32") == AttentionProblem(
        B=2, H=4, S=8, D=8, dtype="float32", causal=True, scale=pytest.approx(8 ** -0.5), spelling="explicit")
    ln = next(m for m in matches if m.family == "layernorm")
    assert problem_of(ln, "tf32") == NormProblem(rows=16, cols=32, kind="layernorm", dtype="float32",
                                                 eps=1e-5, has_weight=True, has_bias=True)
    with pytest.raises(CannotImplement, match="runs float32 here, the bf16 policy bfloat16"):
        problem_of(attn, "bf16")  # the farm runs the model in bf16 under bf16; a float32 match is not that
    _, _, bf = _small_block("bf16")
    assert problem_of(next(m for m in bf if m.family == "attention"), "bf16").dtype == "bfloat16"


def test_farm_plans_one_kernel_per_fused_pattern_for_the_target_arch():
    from fact_ray import farm

    _, _, matches = _small_block()  # head dim 8: both of example 41's block shapes run it
    for family, template, n in (("attention", "attention_sm80", 2), ("layernorm", "norm", 1)):
        p = farm._Pattern(1, next(m for m in matches if m.family == family))
        farm._plan_pattern(p, Precision.FP32, Arch.SM90, budget=8)
        assert p.status == "" and len(p.configs) == n and len(p.sources) == n, p.reason
        assert {c.template for c in p.configs} == {template} and {c.arch for c in p.configs} == {Arch.SM90}
        assert all(p.plan.source_of(c.name) is src for c, src in zip(p.configs, p.sources))
    attn = farm._Pattern(1, next(m for m in matches if m.family == "attention"))
    farm._plan_pattern(attn, Precision.FP32, Arch.SM90, budget=8)
    assert [c.name for c in attn.configs] == ["attn_causal_float32_q32_k128_d128", "attn_causal_float32_q64_k64_d64"]


def test_block_shapes_follow_the_head_dim():
    assert A.blocks_for(64) == ((32, 128, 128), (64, 64, 64))
    assert A.blocks_for(96) == ((32, 128, 128),)
    assert A.blocks_for(160) == ()
    small = A.emit_attention(["float32"], block=(64, 64, 64))
    assert "kMaxHeadDim = 64;" in small.code and small.code != A.emit_attention(["float32"]).code
    with pytest.raises(ValueError, match="not one of"):
        A.emit_attention(["float32"], block=(16, 16, 16))


@pytest.fixture(scope="module")
def fused_winners(norm_libs, attn_lib, cache):
    """KernelChoices for the small block's attention and LayerNorms, from the libraries built above, and for the
    attention projection + residual (one sm80 SIMT GEMM): ln_2 then reads that kernel's output, a chain."""
    from fact_ray.compose import KernelChoice
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.realize.problem import problem_from_match
    from fact_ray.search_spaces import space

    _, _, matches = _small_block()
    proj = next(m for m in matches if m.rule == "linear_bias_residual" and m.param("operands") and
                dict(m.param("operands"))["residual"] == "x")
    cfg = next(c for c in space(problem_from_match(proj, Precision.FP32), Arch.SM80, Precision.FP32)
               if c.opclass == "simt" and c.split_k == 1)
    (source,) = emit([cfg], Arch.SM80)
    lib = build(source, cache)
    assert lib.ok, lib.log[-2000:]
    winners = {proj.key: KernelChoice(cfg, lib.path, source.symbols[0], 1.2)}
    for m in matches:
        if m.family == "attention":
            cfg = next(c for c in attn_lib.source.configs if c.precision == Precision.FP32)
            winners[m.key] = KernelChoice(cfg, attn_lib.path, "fr_attn_run", 3.0)
        elif m.family == "layernorm":
            lib = norm_libs["float32"]
            winners[m.key] = KernelChoice(lib.source.configs[0], lib.path, "fr_norm_run", 1.5)
    return winners


@pytest.mark.nvcc
@pytest.mark.slow
def test_compose_replaces_attention_and_norms_and_still_traces(fused_winners):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fact_ray.compose import compose

    loaded, captured, matches = _small_block()
    module = compose(captured, matches, fused_winners, Precision.FP32)
    calls = [aten_name(n) for n in module.graph.nodes if n.op == "call_function"]
    # the native dispatcher's ops (realize/dispatch.py), one call per replacement
    ops = [c for c in calls if c.startswith("fact_ray_native.")]
    assert len(ops) == 4 and ops.count("fact_ray_native.attention.default") == 1
    assert ops.count("fact_ray_native.norm.default") == 2
    for gone in ("aten.softmax.int", "aten.layer_norm.default", "aten.masked_fill.Scalar", "aten.eq.Scalar"):
        assert gone not in calls, f"{gone} should be replaced (or dead and removed)"
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():  # composed modules are inference only
        y = module(torch.empty(2, 8, 32))
    assert tuple(y.shape) == (2, 8, 32) and y.dtype == torch.float32


@pytest.mark.gpu
def test_composed_attention_and_norms_match_the_model_in_float64(fused_winners):
    from fact_ray.compose import check, compose

    loaded, captured, matches = _small_block()
    module = compose(captured, matches, fused_winners, Precision.FP32)
    report = check(loaded.module, module, Precision.FP32, seeds=(0, 1, 2), example_inputs=loaded.inputs)
    assert report.passed and report.worst_rel_err < 1e-5, report


@pytest.mark.gpu
@pytest.mark.parametrize("spelling", ["explicit", "sdpa"])
def test_fused_trial_verifies_and_times_against_the_models_op(attn_lib, norm_libs, spelling):
    from fact_ray.realize.attention_family import AttentionFamily, AttentionProblem
    from fact_ray.realize.norm_family import NormFamily, NormProblem

    problem = AttentionProblem(B=2, H=8, S=200, D=96, dtype="float32", causal=True, scale=96 ** -0.5,
                               spelling=spelling)
    cfg = next(c for c in attn_lib.source.configs if c.precision == Precision.FP32)
    torch_trial, trial = AttentionFamily().trial(problem, cfg, attn_lib, Precision.FP32, "cuda", reps=10)
    assert torch_trial.status == "ok" and torch_trial.time.median_ms > 0
    assert trial.status.correct and trial.rel_err < 1e-5 and trial.speedup > 0, trial
    norm = NormProblem(rows=1000, cols=768, kind="layernorm", dtype="float32", eps=1e-5, has_weight=True,
                       has_bias=False)
    lib = norm_libs["float32"]
    _, t = NormFamily().trial(norm, lib.source.configs[0], lib, Precision.FP32, "cuda", reps=10)
    assert t.status.correct and t.rel_err < 1e-5, t


@pytest.mark.gpu
def test_sdpa_spelling_composes_onto_the_same_kernel(attn_lib):
    from fact_ray.capture import capture, load_model
    from fact_ray.compose import KernelChoice, check, compose
    from fact_ray.discover import discover

    loaded = load_model(str(Path(__file__).parent / "models" / "sdpa_attention.py"))
    captured = capture(loaded)
    matches = discover(captured.graph, Arch.SM90, Precision.FP32)
    attn = next(m for m in matches if m.family == "attention")
    assert attn.param("spelling") == "sdpa" and attn.param("causal") is True
    cfg = next(c for c in attn_lib.source.configs if c.precision == Precision.FP32)
    module = compose(captured, matches, {attn.key: KernelChoice(cfg, attn_lib.path, "fr_attn_run", 2.0)},
                     Precision.FP32)
    assert not any("scaled_dot_product" in aten_name(n) for n in module.graph.nodes)
    report = check(loaded.module, module, Precision.FP32, seeds=(0, 1), example_inputs=loaded.inputs)
    assert report.passed, report


@pytest.mark.nvcc
def test_an_artifact_with_attention_and_norm_kernels_loads_in_a_fresh_process_without_nvcc(fused_winners, tmp_path):
    import json
    import subprocess
    import sys
    import textwrap

    from fact_ray.artifact import read_manifest, save
    from fact_ray.compose import compose

    _, captured, matches = _small_block()
    art = save(compose(captured, matches, fused_winners, Precision.FP32), tmp_path / "art", allow_unchecked=True)
    assert {p["family"] for p in read_manifest(art)["patterns"]} >= {"attention", "layernorm"}
    fake = tmp_path / "nvcc"
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'nvcc-was-called'}\nexit 1\n")
    fake.chmod(0o755)
    code = textwrap.dedent(f"""
        import json, sys
        import fact_ray
        module = fact_ray.load({str(art)!r}, {SMALL_BLOCK!r}, expect_arch="sm80")
        print(json.dumps({{"ops": sorted(r.family for r in module.fact_ray.replacements),
                          "build": "fact_ray.realize.build" in sys.modules}}))
    """)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}", FACT_RAY_NVCC=str(fake))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not (tmp_path / "nvcc-was-called").exists() and not result["build"]
    assert result["ops"].count("attention") == 1 and result["ops"].count("layernorm") == 2
