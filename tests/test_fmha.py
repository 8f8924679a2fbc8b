"""Example 88's Hopper FMHA (realize/fmha.py): rendering, its place beside example 41 in the fused family, one real
sm_90a compile of the bf16 TU in the 96-wide head-dim tile with grouped key/value heads in its ABI (shared by every
CPU test here: it takes minutes on a small host), its C ABI's refusals (answered from the arguments before any CUDA
call, so they run without a GPU), and on a GPU its numbers against float64 torch (grouped-query attention's in
tests/test_gqa_gpu.py, which builds through `fmha_libraries` below and shares its build cache)."""

import ctypes
import shutil

import pytest
import torch

from fact_ray.errors import CannotImplement, NotAvailable, UnsupportedDtype
from fact_ray.realize import attention as A
from fact_ray.realize import fmha as F
from fact_ray.realize.build import exported_symbols
from fact_ray.types import Arch, Precision

POLICY = {"bfloat16": Precision.BF16, "float16": Precision.FP16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


# --------------------------------------------------------------------------------------------- rendering


def test_emit_fmha_fills_every_slot_and_differs_per_dtype():
    bf, fp = F.emit_fmha("bfloat16"), F.emit_fmha("float16")
    for s, element in ((bf, "cutlass::bfloat16_t"), (fp, "cutlass::half_t")):
        assert "{{" not in s.code and f"using Element = {element};" in s.code
        assert s.arch == Arch.SM90 and s.symbols == ("fr_fmha_run",)
        (cfg,) = s.configs
        assert cfg.template == "fmha_sm90" and cfg.arch == Arch.SM90 and cfg.block == (128, 128, 128)
    assert bf.configs[0].name == "fmha_sm90_causal_bfloat16_q128_k128_d128"
    assert (bf.configs[0].precision, fp.configs[0].precision) == (Precision.BF16, Precision.FP16)
    assert bf.code != fp.code and bf.name != fp.name
    assert F.emit_fmha("bfloat16") == bf  # deterministic: same text, same cache key


def test_emit_fmha_refuses_fp32_and_sm80():
    with pytest.raises(UnsupportedDtype):
        F.emit_fmha("float32")
    with pytest.raises(CannotImplement, match="sm90 only"):
        F.emit_fmha("bfloat16", Arch.SM80)


def test_fmha_builds_for_sm90a_only_with_example_88_on_the_include_path():
    from fact_ray.realize import build as B

    s = F.emit_fmha("bfloat16")
    assert B.flags_for(s)[-1:] == ("-gencode=arch=compute_90a,code=sm_90a",) and B.arch_targets(s) == "sm_90a"
    assert "--use_fast_math" not in B.flags_for(s)
    assert F.include_dirs()[0].endswith("88_hopper_fmha")


@pytest.mark.parametrize("dtype, D, S, causal, ok", [
    ("bfloat16", 96, 512, True, True), ("float16", 128, 136, True, True), ("bfloat16", 8, 8, True, True),
    ("bfloat16", 100, 512, True, False), ("bfloat16", 160, 512, True, False), ("bfloat16", 96, 77, True, False),
    ("float32", 96, 512, True, False), ("bfloat16", 64, 512, False, F.HAS_FULL),
])
def test_fits_mirrors_example_88s_can_implement(dtype, D, S, causal, ok):
    assert F.fits(dtype, D, S, causal) is ok


def test_fits_takes_key_value_heads_that_divide_the_query_heads():
    assert F.fits("bfloat16", 128, 2048, True, heads=32, kv_heads=8)
    assert F.fits("bfloat16", 128, 2048, True, heads=32, kv_heads=1)  # multi-query
    assert not F.fits("bfloat16", 128, 2048, True, heads=32, kv_heads=12)
    assert not F.fits("bfloat16", 128, 2048, True, heads=8, kv_heads=16)


def _sources(problem, arch, policy=Precision.BF16):
    from fact_ray.realize.attention_family import AttentionFamily

    fam = AttentionFamily()
    return fam.sources(fam.candidates(problem, policy, arch, budget=16), arch)


def test_fused_offers_the_fmha_beside_example_41_on_sm90_only():
    from fact_ray.realize.attention_family import AttentionProblem

    p = AttentionProblem(B=2, H=8, S=512, D=96, dtype="bfloat16", causal=True, scale=96 ** -0.5,
                               spelling="sdpa")
    assert {s.configs[0].template for s in _sources(p, Arch.SM90)} == {"attention_sm80", "fmha_sm90"}
    fmha_blocks = [s.configs[0].block for s in _sources(p, Arch.SM90) if s.configs[0].template == "fmha_sm90"]
    assert fmha_blocks[0] == (128, 128, 96) and {b[2] for b in fmha_blocks} == {96}  # tiles sized to D = 96
    assert [s.configs[0].template for s in _sources(p, Arch.SM80)] == ["attention_sm80"]
    fp32 = AttentionProblem(B=2, H=8, S=512, D=96, dtype="float32", causal=True, scale=96 ** -0.5,
                            spelling="sdpa")
    assert [s.configs[0].template for s in _sources(fp32, Arch.SM90, Precision.FP32)] == ["attention_sm80"]
    odd = AttentionProblem(B=2, H=8, S=77, D=96, dtype="bfloat16", causal=True, scale=1.0, spelling="sdpa")
    assert len(_sources(odd, Arch.SM90)) == 1


def test_missing_example_88_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "EXAMPLE_DIR", ("examples", "no_such_example"))
    with pytest.raises(NotAvailable, match="example 88 missing"):
        F.include_dirs()


# --------------------------------------------------------------------------------------------- the compile


CPU_BLOCK = (128, 128, 96)  # the one compile of the CPU tests: MiniGPT's head dim, grouped heads in the ABI


def fmha_libraries(cache: str, wanted) -> dict:
    """{(dtype, block): Library} for every (dtype, tile) in `wanted`, built in parallel (an sm_90a FMHA compile is
    a minute; nvcc processes, so threads suffice) into `cache`, the session's build cache (conftest), which the
    test files and the xdist workers share: a second ask is a cache hit, or waits for the compile under way.
    Skips without nvcc or example 88."""
    from concurrent.futures import ThreadPoolExecutor

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    try:
        F.include_dirs()
    except NotAvailable as e:
        pytest.skip(str(e))
    wanted = sorted(set(wanted))
    with ThreadPoolExecutor(max_workers=8) as pool:
        libs = list(pool.map(lambda w: F.build_fmha(w[0], cache, block=w[1]), wanted))
    return dict(zip(wanted, libs))


@pytest.fixture(scope="module")
def fmha_libs(session_build_cache):
    """Library by (dtype, head dim): the tile of search_spaces/attention.py that leads for that head dim. Without a
    GPU only bf16 D = 96 is built (the one sm_90a compile of the CPU tests); with one, both dtypes and D 64/96/128."""
    from fact_ray.search_spaces.attention import fmha_tiles

    wanted = {("bfloat16", 96): CPU_BLOCK}
    if torch.cuda.is_available():
        wanted = {(d, hd): fmha_tiles(hd)[0].block for d in ("bfloat16", "float16") for hd in (64, 96, 128)}
    libs = fmha_libraries(session_build_cache, [(d, block) for (d, _), block in wanted.items()])
    return lambda dtype, head_dim: libs[(dtype, wanted[(dtype, head_dim)])]


@pytest.fixture(scope="module")
def bf16_lib(fmha_libs):
    lib = fmha_libs("bfloat16", 96)
    assert lib.ok, lib.log[-3000:]
    assert lib.source.configs[0].block == CPU_BLOCK
    return lib


@pytest.mark.nvcc
@pytest.mark.slow
def test_fmha_compiles_for_sm90a_with_its_abi(bf16_lib):
    assert {"fr_abi_version", "fr_fmha_supports", "fr_fmha_workspace", "fr_fmha_run"} <= exported_symbols(
        bf16_lib.path)
    assert "code=sm_90a" in bf16_lib.log and "code=sm_80" not in bf16_lib.log
    h = F.load_fmha(bf16_lib)  # dlopen works without a GPU: cudart is static, the driver loads lazily
    assert h.fr_abi_version() == F.FMHA_ABI_VERSION
    assert [h.fr_fmha_supports(c) for c in (0, 1, 2)] == [0, 1, 0]
    with pytest.raises(Exception, match="not an attention library"):
        A.load_attention(bf16_lib)  # the other ABI's loader does not take it for one of its own


def _args(**kw):
    """Contiguous [B, S, H, D] bf16 arguments with 16-byte-aligned fake pointers (never dereferenced: every
    call below is refused before the kernel, or only asks for the workspace size)."""
    B, S, H, D = 2, 512, 8, 96
    strides = {f"{n}_stride_{m}": x for n in "qkvo" for m, x in (("b", S * H * D), ("s", H * D), ("h", D))}
    fields = dict(q=16, k=16, v=16, o=16, B=B, H=H, S_q=S, S_k=S, D=D, scale=D ** -0.5, causal=1, dtype=1,
                  workspace=None, workspace_size=0, H_kv=H, **strides)
    return ctypes.byref(F.FrFmhaArgs(**{**fields, **kw}))


@pytest.mark.nvcc
def test_fmha_run_refuses_what_it_cannot_run_before_touching_cuda(bf16_lib):
    h = F.load_fmha(bf16_lib)
    # The logsumexp buffer, B * H * S_q floats, is the workspace; a refused call needs none.
    assert h.fr_fmha_workspace(_args()) == 2 * 8 * 512 * 4
    assert h.fr_fmha_workspace(_args(D=100)) == 0
    # grouped-query (4 query heads per key/value head) and multi-query calls are good calls: the logsumexp is per
    # query head
    assert h.fr_fmha_workspace(_args(H_kv=2)) == h.fr_fmha_workspace(_args(H_kv=1)) == 2 * 8 * 512 * 4
    invalid = [dict(q=None), dict(o=None), dict(B=0), dict(S_k=0), dict(scale=float("nan")), dict(k_stride_s=-768),
               dict(H_kv=0), dict(H_kv=3),  # no key/value heads; 8 query heads do not share 3 evenly
               dict(), dict(H_kv=2)]  # the last two: good calls without their workspace
    for kw in invalid:
        assert h.fr_fmha_run(_args(**kw)) == F.EINVAL, kw
    assert h.fr_fmha_run(None) == F.EINVAL
    unsupported = [
        dict(D=100),  # not a multiple of 8: example 88's can_implement
        dict(D=128), dict(D=160),  # past this TU's 96-wide head-dim tile
        dict(S_q=77, S_k=77),  # S_q % 8
        dict(dtype=2), dict(dtype=0),  # fp16 is another TU; fp32 no TU at all
        dict(q=24),  # misaligned pointer (TMA wants 16 bytes)
        dict(v_stride_s=100),  # a stride that is not a multiple of 16 bytes
        dict(o_stride_b=1 << 31),  # strides are int in the kernel
        dict(S_k=256),  # causal with fewer keys than queries
        dict(scale=-1.0),  # the softmax scales after taking the max
        dict(B=70000),  # grid.y
    ]
    for kw in unsupported:
        assert h.fr_fmha_run(_args(**kw)) == F.ENOTSUP, kw
    if not F.HAS_FULL:
        assert h.fr_fmha_run(_args(causal=0)) == F.ENOTSUP


# --------------------------------------------------------------------------------------------- GPU numbers


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.sm90
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("B, S", [(1, 512), (2, 136)])  # 136: not a multiple of the 128-query/key tiles
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])  # bhsd: the model's tensors, passed as transposed views
def test_causal_fmha_matches_float64(fmha_libs, dtype, head_dim, B, S, layout):
    lib = fmha_libs(dtype, head_dim)
    assert lib.ok, lib.log[-3000:]
    kernel = F.FmhaKernel(lib)
    H, scale = 3, (None if layout == "bshd" else 0.3)  # None: the default 1/sqrt(D)
    for seed in (0, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        shape = (B, S, H, head_dim) if layout == "bshd" else (B, H, S, head_dim)
        qkv = [torch.randn(shape, device="cuda", generator=g).to(getattr(torch, dtype)) for _ in range(3)]
        q, k, v = qkv if layout == "bshd" else (t.transpose(1, 2) for t in qkv)  # views: strides, no copies
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")  # what is not written stays NaN
        kernel(q, k, v, causal=True, scale=scale, out=out)
        torch.cuda.synchronize()
        assert not out.isnan().any(), "the kernel left output elements unwritten"
        err = rel_err(out, A.reference(q, k, v, causal=True, scale=scale))
        assert err < POLICY[dtype].tolerance, (seed, err)


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.sm90
def test_fmha_non_causal_and_fused_qkv_slices(fmha_libs):
    kernel = F.FmhaKernel(fmha_libs("bfloat16", 96))
    B, S, H, D = 2, 200, 4, 96
    qkv = torch.randn(B, S, 3, H, D, device="cuda").bfloat16()
    q, k, v = (qkv[:, :, i] for i in range(3))  # seq stride 3 * H * D: slices of one projection
    if not F.HAS_FULL:
        with pytest.raises(CannotImplement):
            kernel(q, k, v, causal=False)
        return
    out = kernel(q, k, v, causal=False)  # 200 keys: the last 128-key block is ragged
    assert rel_err(out, A.reference(q, k, v, causal=False)) < Precision.BF16.tolerance


@pytest.mark.gpu
@pytest.mark.nvcc
@pytest.mark.sm90
def test_fused_trial_runs_the_fmha_against_sdpa(fmha_libs):
    from fact_ray.realize.attention_family import AttentionFamily, AttentionProblem

    problem = AttentionProblem(B=2, H=8, S=512, D=96, dtype="bfloat16", causal=True, scale=96 ** -0.5,
                               spelling="sdpa")
    lib = fmha_libs("bfloat16", 96)
    torch_trial, trial = AttentionFamily().trial(problem, lib.source.configs[0], lib, Precision.BF16, "cuda", reps=10)
    assert torch_trial.status == "ok"
    assert trial.status in ("ok", "slower") and trial.rel_err < Precision.BF16.tolerance, trial
