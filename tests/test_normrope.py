"""Issue 16's norm and RoPE families on a CPU: discovery of RoPE (HF's apply_rotary_pos_emb and its spellings) and of
Llama's RMSNorm in the suite models, the norm kernel's launch shapes as candidates, configs that round-trip through
the table's JSON, and one real nvcc compile of each template (sm_80 + sm_90a) with its ABI checked before any CUDA
call; the composed Llama traces with both kernels in (fake tensors: running them is the GPU tests' work,
tests/test_normrope_gpu.py)."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fact_ray.capture import LoadedModel, capture, load_model, under_policy
from fact_ray.discover import discover
from fact_ray.fastcall import aten_name
from fact_ray.realize import norm as N
from fact_ray.realize import rope as R
from fact_ray.realize.family import for_match
from fact_ray.types import Arch, NormConfig, Precision, RopeConfig, config_from_dict

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "models"


def suite_matches(name: str, policy: str = "bf16"):
    loaded = under_policy(load_model(str(SUITE / f"{name}.py")), policy)
    captured = capture(loaded)
    return loaded, captured, discover(captured.graph, "sm90", policy)


def ropes_of(module: nn.Module, *inputs):
    matches = discover(capture(LoadedModel(module, inputs, "m", "h")).graph, "sm90", "fp32")
    return [m for m in matches if m.family == "rope"], matches


# --------------------------------------------------------------------------------------------- discovery


def test_llama_block_rope_and_rmsnorm_are_found(small):
    _, _, matches = suite_matches("llama_block")
    ropes = [m for m in matches if m.family == "rope"]
    assert len(ropes) == 2 and len([m for m in matches if m.family == "rmsnorm"]) == 2
    for m in ropes:
        p = dict(m.params)
        # q and k: [B, H, S, D] views of the projection, the [S, D] tables broadcast
        assert (p["form"], p["x_shape"], p["x_stride"], p["cos_shape"]) == ("half", (2, 4, 16, 8), (512, 8, 32, 1),
                                                                            (16, 8))
        assert m.dtype == "bfloat16" and {"mul", "cat", "neg", "add", "chunk"} <= {n.rstrip("_0123456789")
                                                                                for n in m.nodes}
        problem = for_match(m).problem(m, Precision.BF16)
        assert (problem.form, problem.x_shape, problem.sin_shape) == ("half", (2, 4, 16, 8), (16, 8))


def test_hf_llama_apply_rotary_pos_emb_and_llama_rmsnorm_are_found(small, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("FR_LAYERS", "1")
    _, _, matches = suite_matches("hf_llama")
    ropes = sorted((dict(m.params)["x_shape"], dict(m.params)["cos_shape"]) for m in matches if m.family == "rope")
    # q (4 heads) and k (2 KV heads, rotated before repeat_kv) against [1, 1, S, D] tables (cos.unsqueeze(1))
    assert ropes == [((2, 2, 16, 8), (1, 1, 16, 8)), ((2, 4, 16, 8), (1, 1, 16, 8))]
    norms = [m for m in matches if m.family == "rmsnorm"]
    assert len(norms) == 3 and {(m.dtype, len(m.nodes)) for m in norms} == {("bfloat16", 8)}  # upcast form


class Rope(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, x, cos, sin):
        D = x.shape[-1]
        if self.how == "slices":  # HF's rotate_half
            rot = torch.cat((-x[..., D // 2:], x[..., : D // 2]), dim=-1)
        elif self.how == "chunk":
            a, b = x.chunk(2, dim=-1)
            rot = torch.cat((-b, a), dim=-1)
        elif self.how == "split":
            a, b = x.split(D // 2, dim=-1)
            rot = torch.cat([-b, a], dim=-1)
        elif self.how == "interleaved":  # GPT-J's rotate_every_two
            rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        elif self.how == "wrong_sign":  # cat(b, -a) is not the rotation
            a, b = x.chunk(2, dim=-1)
            rot = torch.cat((b, -a), dim=-1)
        elif self.how == "wrong_dim":  # halves of the sequence dim, not of the head dim
            a, b = x.chunk(2, dim=-2)
            rot = torch.cat((-b, a), dim=-2)
        else:
            raise ValueError(self.how)
        return x * cos + rot * sin


@pytest.mark.parametrize("how,form", [("slices", "half"), ("chunk", "half"), ("split", "half"),
                                      ("interleaved", "interleaved")])
def test_rope_spellings(how, form):
    x, cos, sin = torch.randn(2, 3, 8, 16), torch.randn(8, 16), torch.randn(8, 16)
    ropes, matches = ropes_of(Rope(how), x, cos, sin)
    assert len(matches) == 1 and len(ropes) == 1
    assert dict(ropes[0].params)["form"] == form and dict(ropes[0].params)["cos_shape"] == (8, 16)


@pytest.mark.parametrize("how", ["wrong_sign", "wrong_dim"])
def test_what_only_looks_like_rope_is_not_matched(how):
    ropes, _ = ropes_of(Rope(how), torch.randn(2, 3, 8, 16), torch.randn(8, 16), torch.randn(8, 16))
    assert ropes == []


def test_tables_that_do_not_broadcast_to_x_are_not_rope():
    # cos of [2, 3, 8, 16] against x [3, 8, 16]: the product grows x, no rope kernel writes that
    ropes, _ = ropes_of(Rope("chunk"), torch.randn(3, 8, 16), torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    assert ropes == []


# --------------------------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("dtype,cols", [("bfloat16", 4096), ("bfloat16", 768), ("float16", 5120),
                                        ("float32", 1024), ("float32", 16384), ("bfloat16", 16384)])
def test_norm_launch_shapes_hold_the_row_in_registers(dtype, cols):
    vec = 16 // {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    configs = N.norm_candidates(cols, dtype, Arch.SM90, budget=64)
    *rows, general = configs
    assert general.lanes == 0 and general.name == f"norm_{dtype}" and len(rows) >= 2
    for c in rows:
        capacity = c.lanes * c.items * vec
        assert capacity >= cols and c.lanes * (c.items - 1) * vec < cols  # items: just enough vectors
        # stated from the hardware, not from norm.py's constants: a 16-byte vector is 4 registers and a thread
        # keeps at most 64 registers of row; a CUDA block has at most 1024 threads; at least three quarters of the
        # vector slots hold row data
        assert c.items * 4 <= 64, c
        assert c.lanes * c.rows_per_block <= 1024, c
        assert cols / capacity >= 0.75, c
    # some launch shape wastes no slot where the row divides evenly into a warp's vectors
    if (cols // vec) % 32 == 0:
        assert any(c.lanes * c.items * vec == cols for c in rows), rows
    assert len({c.name for c in configs}) == len(configs)
    assert N.norm_candidates(cols, dtype, Arch.SM90, budget=3) == configs[:3]


def test_norm_candidates_for_rows_the_row_kernel_cannot_hold():
    # not whole 16-byte vectors: the general kernel alone
    assert [c.name for c in N.norm_candidates(1001, "float32", Arch.SM90, 8)] == ["norm_float32"]
    # MiniGPT's 768 in bf16: 96 vectors a row, one warp of 3 each first
    first = N.norm_candidates(768, "bfloat16", Arch.SM90, 8)[0]
    assert (first.lanes, first.items) == (32, 3)


def test_norm_family_hints_lead_and_sources_render_one_config_each():
    from fact_ray.realize.norm_family import NormFamily, NormProblem

    fam = NormFamily()
    p = NormProblem(rows=16384, cols=4096, kind="rmsnorm", dtype="bfloat16", eps=1e-6, has_weight=True,
                    has_bias=False)
    configs = fam.candidates(p, Precision.BF16, Arch.SM90, budget=16)
    hinted = fam.candidates(p, Precision.BF16, Arch.SM90, budget=16, hinted=(configs[2].name,))
    assert hinted[0] == configs[2] and sorted(c.name for c in hinted) == sorted(c.name for c in configs)
    # a hint past the budget (the incumbent the table serves) still leads
    assert fam.candidates(p, Precision.BF16, Arch.SM90, budget=2, hinted=(configs[-1].name,)) == [configs[-1],
                                                                                                   configs[0]]
    sources = fam.sources(configs[:2], Arch.SM90)
    assert [s.configs for s in sources] == [(configs[0],), (configs[1],)]
    for s, c in zip(sources, configs):
        assert s.symbols == (N.norm_symbol(c),) and f"constexpr int kLanes = {c.lanes};" in s.code
        assert "{{" not in s.code and f"int {N.norm_symbol(c)}(const fr_norm_args* a)" in s.code


def test_rope_candidates_and_sources():
    from fact_ray.realize.rope_family import RopeFamily, RopeProblem

    p = RopeProblem(x_shape=(8, 32, 2048, 128), x_stride=(2048 * 32 * 128, 128, 32 * 128, 1),
                    cos_shape=(1, 1, 2048, 128), sin_shape=[1, 1, 2048, 128], form="half", dtype="bfloat16")
    assert p.sin_shape == (1, 1, 2048, 128)  # an artifact's JSON lists come back as tuples
    fam = RopeFamily()
    configs = fam.candidates(p, Precision.BF16, Arch.SM90, budget=8)
    assert [(c.threads, c.units) for c in configs] == list(R.LAUNCH_SHAPES)
    (src,) = fam.sources(configs[:1], Arch.SM90)
    assert src.symbols == ("fr_rope_t256_u1_run",) and "constexpr int kThreads = 256;" in src.code
    assert "{{" not in src.code


def test_configs_round_trip_through_stored_json():
    norm = N.norm_config("bfloat16", Arch.SM90, 128, 1, 4)
    rope = R.rope_config("float16", Arch.SM90, 512, 1)
    for cfg in (norm, rope):
        assert config_from_dict(json.loads(json.dumps(cfg.__dict__, default=str))) == cfg
    assert isinstance(config_from_dict({**rope.__dict__}), RopeConfig)
    # a norm config stored before launch shapes were searched is the general kernel
    legacy = {"template": "norm", "name": "norm_float32", "arch": "sm90", "precision": "fp32", "element": "float"}
    old = config_from_dict(legacy)
    assert isinstance(old, NormConfig) and old.lanes == 0 and N.norm_symbol(old) == N.GENERAL_SYMBOL
    with pytest.raises(ValueError, match="launch shape"):
        N.norm_config("float32", Arch.SM90, 48, 1, 2)


def test_the_pipeline_plans_llama_rope_and_rmsnorm_with_their_launch_shapes(small, monkeypatch):
    from fact_ray.realize import pipeline

    monkeypatch.setenv("FR_EMBD", "256")  # rows of 256 bf16: 32 vectors, one warp of one vector each
    _, _, matches = suite_matches("llama_block")
    norm = next(m for m in matches if m.family == "rmsnorm")
    p = pipeline.plan(norm, Precision.BF16, Arch.SM90, budget=16)
    assert p.family == "norm" and [c.name for c in p.configs] == [
        "norm_bfloat16_l32_r4_i1", "norm_bfloat16_l32_r8_i1", "norm_bfloat16"]
    assert all(p.source_of(c.name).configs == (c,) for c in p.configs)
    rope = next(m for m in matches if m.family == "rope")
    p = pipeline.plan(rope, Precision.BF16, Arch.SM90, budget=2, banned=frozenset({"rope_bfloat16_t256_u1"}))
    assert p.family == "rope" and [c.name for c in p.configs] == ["rope_bfloat16_t128_u1", "rope_bfloat16_t512_u1"]
    assert p.problem.x_shape == (2, 4, 16, 64) and p.problem.cos_shape == (16, 64)


# --------------------------------------------------------------------------------------------- real compiles


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    cache = str(tmp_path_factory.mktemp("normrope_cache"))
    norm_cfg = N.norm_candidates(1024, "bfloat16", Arch.SM90, 1)[0]
    return {"norm": N.build_norm("bfloat16", cache, config=norm_cfg),
            "rope": R.build_rope("bfloat16", cache, config=R.rope_config("bfloat16", Arch.SM90, 256, 1))}


@pytest.mark.nvcc
def test_norm_and_rope_compile_for_sm80_and_sm90a_with_their_abis(libs):
    from fact_ray.realize.build import exported_symbols

    for lib, load, version, element in ((libs["norm"], N.load_norm, N.NORM_ABI_VERSION, "fr_norm_element"),
                                        (libs["rope"], R.load_rope, R.ROPE_ABI_VERSION, "fr_rope_element")):
        assert lib.ok, lib.log[-3000:]
        assert {"fr_abi_version", element, lib.source.symbols[0]} <= exported_symbols(lib.path)
        assert "code=sm_80" in lib.log and "code=sm_90a" in lib.log
        handle = load(lib)  # dlopen without a GPU: cudart is static, the driver loads lazily
        assert handle.fr_abi_version() == version and getattr(handle, element)() == 1  # bfloat16


@pytest.mark.nvcc
def test_norm_and_rope_refuse_bad_arguments_before_touching_cuda(libs):
    run = getattr(N.load_norm(libs["norm"]), libs["norm"].source.symbols[0])
    buf = (ctypes.c_float * 64)()
    p = ctypes.addressof(buf)

    def norm_args(**kw):
        a = N.FrNormArgs(x=p, y=p, rows=4, cols=16, ld_x=16, ld_y=16, eps=1e-5, kind=N.KIND["layernorm"])
        for k, v in kw.items():
            setattr(a, k, v)
        return ctypes.byref(a)

    assert run(norm_args(residual=p)) == N.EINVAL  # a residual needs h to write x + r to
    assert run(norm_args(residual=p, h=p, ld_r=16, ld_h=8)) == N.EINVAL  # h's rows would overlap
    assert run(norm_args(kind=N.KIND["rmsnorm"], bias=p)) == N.EINVAL
    assert run(norm_args(eps=math.nan)) == N.EINVAL
    assert run(norm_args(rows=0, residual=p, h=p, ld_r=16, ld_h=16)) == 0  # nothing to do launches nothing

    rope = getattr(R.load_rope(libs["rope"]), libs["rope"].source.symbols[0])

    def rope_args(count=1, D=8, form=0, **kw):
        a = R.FrRopeArgs(count=count, D=D, form=form)
        for slot in a.t:
            slot.x = slot.y = slot.cos = slot.sin = p
            slot.n[:] = (1, 1, 0)  # no rows: a valid call launches nothing
        for k, v in kw.items():
            setattr(a.t[0], k, v)
        return ctypes.byref(a)

    assert rope(rope_args()) == 0 and rope(rope_args(count=2)) == 0
    assert rope(rope_args(count=3)) == R.EINVAL
    assert rope(rope_args(D=7)) == R.EINVAL  # an odd head dim has no pairs
    assert rope(rope_args(form=5)) == R.EINVAL
    assert rope(rope_args(cos=None)) == R.EINVAL


@pytest.mark.nvcc
def test_composed_llama_block_calls_the_norm_and_rope_kernels_and_still_traces(small, libs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fact_ray.compose import KernelChoice, compose, library_for

    loaded, captured, matches = suite_matches("llama_block")
    ours = [m for m in matches if m.family in ("rope", "rmsnorm")]
    winners = {}
    for m in ours:
        lib = libs["rope" if m.family == "rope" else "norm"]
        winners[m.key] = KernelChoice(lib.source.configs[0], lib.path, lib.source.symbols[0], 1.5)
    composed = compose(captured, matches, winners, "bf16", arch="sm90")
    assert len(composed.fact_ray.replacements) == 4 and not composed.fact_ray.fallbacks
    calls = [aten_name(n) for n in composed.graph.nodes if n.op == "call_function"]
    assert not any("rsqrt" in c or "aten.cat" in c for c in calls)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        y = composed(*loaded.inputs)
    assert tuple(y.shape) == (2, 16, 32) and y.dtype == torch.bfloat16
    # An artifact's manifest gives each problem and binding back (what deploy.register_artifact checks)
    from fact_ray.artifact import manifest_of
    from fact_ray.realize.family import for_config

    made = {r.match_key: r for r in composed.fact_ray.replacements}
    for pat in json.loads(json.dumps(manifest_of(composed, allow_unchecked=True)["patterns"])):
        cfg = config_from_dict(pat["config"])
        fam = for_config(cfg)
        problem = fam.problem_type(**pat["problem"])
        assert problem == made[pat["match_key"]].problem and cfg == made[pat["match_key"]].config
        library = library_for(KernelChoice(cfg, made[pat["match_key"]].library_path, pat["symbol"]), pat["sha256"])
        binding = fam.bind(problem, cfg, library, pat["symbol"], bool(pat["kernel"]), pat["sha256"])
        assert (binding.name, binding.kernel) == (pat["op"], pat["kernel"])

