"""The SwiGLU family (issue 16) on a CPU: it registers behind the family seam, its candidates enumerate from
search_spaces/swiglu.py, discovery finds SwiGLU in the Llama files, the native dispatcher's `swiglu` op has its
schema and Meta impl, compose rewrites a Llama MLP into one call of it (no edit to compose.py), the space's launch
choices (raster order, swizzle; issue 17) share their tile's kernel and unit, and one swiglu TU holding a config
and a launch variant of it compiles for real with nvcc (sm_90a, ~25-40 s: one kernel). The kernel against float64
and the composed MLP against eager are in test_swiglu_gpu.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fact_ray.capture import capture, load_model, under_policy
from fact_ray.discover import discover
from fact_ray.errors import CannotImplement
from fact_ray.fastcall import aten_name
from fact_ray.realize import family, pipeline
from fact_ray.realize.swiglu_family import SwiGluFamily, SwiGluProblem
from fact_ray.search_spaces import swiglu as space
from fact_ray.types import Arch, Precision

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "models"
CACHE = str(REPO / ".fact-ray" / "build-cache")  # the worktree's own: the dispatcher builds once per torch
# benchmarks/models/llama3_8b_layer.py at CPU size (its docstring's setting)
LLAMA3_SMALL = {"FR_BATCH": "1", "FR_SEQ": "32", "FR_EMBD": "256", "FR_HEADS": "4", "FR_KV_HEADS": "2",
                "FR_HEAD_DIM": "64", "FR_FFN": "512"}


@pytest.fixture
def llama3_small(monkeypatch):
    for k, v in LLAMA3_SMALL.items():
        monkeypatch.setenv(k, v)


def swiglu_matches(path: Path, policy: str = "bf16"):
    captured = capture(under_policy(load_model(str(path)), policy))
    return captured, [m for m in discover(captured.graph, "sm90", policy) if m.family == "swiglu"]


# --------------------------------------------------------------------------------------------- discovery


def test_discovery_finds_swiglu_in_the_llama3_layer(llama3_small):
    _, (m,) = swiglu_matches(SUITE / "llama3_8b_layer.py")
    ops = dict(m.param("operands"))
    assert (ops["b_gate"], ops["b_up"]) == ("p_mlp_gate_proj_weight", "p_mlp_up_proj_weight")
    assert (m.param("M"), m.param("N"), m.param("K"), m.param("has_bias"), m.dtype) == (32, 512, 256, False,
                                                                                        "bfloat16")


def test_discovery_finds_swiglu_in_the_hand_written_block(small):
    _, (m,) = swiglu_matches(SUITE / "llama_block.py")
    assert (m.param("M"), m.param("N"), m.param("K")) == (32, 64, 32)


def test_discovery_finds_swiglu_in_hf_llama(small):
    pytest.importorskip("transformers")
    _, found = swiglu_matches(SUITE / "hf_llama.py")
    assert len(found) == 2 and {(m.param("N"), m.param("K")) for m in found} == {(64, 32)}


# --------------------------------------------------------------------------------------------- the family


def test_the_family_registers_and_serves_swiglu(llama3_small):
    fam = family.by_name("swiglu")
    assert isinstance(fam, SwiGluFamily) and "swiglu" in family.served()
    _, (m,) = swiglu_matches(SUITE / "llama3_8b_layer.py")
    assert family.for_match(m) is fam
    problem = fam.problem(m, Precision.BF16)
    assert problem == SwiGluProblem(M=32, F=512, K=256, dtype="bfloat16", has_bias=False)
    assert fam.operands(problem) == ("a", "b_gate", "b_up", None, None)
    cfg = space.space(32, 512, 256, Precision.BF16, Arch.SM90, budget=1)[0]
    assert family.for_config(cfg) is fam and fam.accepts(cfg, problem) == ""
    assert "computes half_t" in fam.accepts(space.space(32, 512, 256, Precision.FP16, Arch.SM90, 1)[0], problem)
    with pytest.raises(CannotImplement, match="runs bfloat16 here"):  # a bf16 model under the fp16 policy
        fam.problem(m, Precision.FP16)


def test_candidates_enumerate_within_the_budget(llama3_small):
    _, (m,) = swiglu_matches(SUITE / "llama3_8b_layer.py")
    plan = pipeline.plan(m, "bf16", "sm90", budget=5)
    assert plan.family == "swiglu" and len(plan.configs) == 5
    assert all(c.template == "sm90_swiglu" and c.element == "bfloat16_t" for c in plan.configs)
    assert len({c.name for c in plan.configs}) == 5
    # every candidate in exactly one unit, units of one kernel schedule each, for sm_90a only
    held = [c.name for s in plan.sources for c in s.configs]
    assert sorted(held) == sorted(c.name for c in plan.configs)
    assert all(len({c.kernel_schedule for c in s.configs}) == 1 for s in plan.sources)
    assert all(s.flags == ("-gencode=arch=compute_90a,code=sm_90a",) for s in plan.sources)
    for s in plan.sources:
        assert "fr_swiglu::SwiGluEpilogue" in s.code and all(f"{sym}_run" in s.code for sym in s.symbols)
    # hinted names lead; the budget holds; the same plan twice is the same plan (content-named units)
    hinted = plan.configs[3].name
    again = pipeline.plan(m, "bf16", "sm90", budget=2, hinted=(hinted,))
    assert [c.name for c in again.configs] == [hinted, plan.configs[0].name]
    assert [s.name for s in pipeline.plan(m, "bf16", "sm90", budget=5).sources] == [s.name for s in plan.sources]


def test_the_space_orders_by_problem_and_refuses_what_it_cannot_run():
    full = space.space(16384, 14336, 4096, Precision.BF16, Arch.SM90)
    assert all(space.accumulators(c.kernel_schedule, c.tile) <= 128 for c in full)
    assert full[0].tile[1] == 256  # the wide N tile first for the Llama-3-8B MLP
    assert space.space(1, 14336, 4096, Precision.BF16, Arch.SM90)[0].tile[0] == 64  # decode: a 64-row tile
    for args, why in (((8, 16, 32, "bf16", "sm80"), "sm_90a"), ((8, 16, 32, "fp32", "sm90"), "bf16 or fp16"),
                      ((8, 16, 36, "bf16", "sm90"), "multiple of 8")):
        with pytest.raises(CannotImplement, match=why):
            space.space(*args[:3], Precision(args[3]), Arch(args[4]))


# The nine tile points' order at Llama-3-8B's size (M 16384, F 14336, K 4096), as the H200 measured it (issue 16):
# launch choices and new tiles come after it.
LLAMA3_ORDER = ["128x256x64_2x1x1_coop", "64x256x64_2x1x1_pingpong", "128x256x64_1x1x1_coop",
                "256x128x64_1x2x1_coop", "128x128x64_2x1x1_pingpong", "128x128x64_2x1x1_coop",
                "64x128x64_1x1x1_pingpong", "128x128x64_1x1x1_coop", "64x256x64_1x1x1_pingpong"]


def _point(cfg):
    return (cfg.kernel_schedule, cfg.tile, cfg.cluster[:2])


def test_the_space_adds_launch_choices_and_two_tiles_after_the_nine():
    from fact_ray.realize.swiglu import kernel_key
    from fact_ray.search_spaces import rules

    full = space.space(16384, 14336, 4096, Precision.BF16, Arch.SM90)
    assert [c.name.removeprefix("swiglu_sm90_bf16_") for c in full[:9]] == LLAMA3_ORDER
    assert not any(c.raster or c.max_swizzle for c in full[:9])
    assert len({c.name for c in full}) == len(full) == 9 + 2 + 2 * len(rules.RASTER_CHOICES)
    # the best point's launch sweep next: the same kernel (one compile), the profiler's raster x swizzle pairs
    sweep = full[9:9 + len(rules.RASTER_CHOICES)]
    assert {kernel_key(c) for c in sweep} == {kernel_key(full[0])}
    assert [(c.raster, c.max_swizzle) for c in sweep] == list(rules.RASTER_CHOICES)
    assert sweep[-1].name == full[0].name + "_rn_sw4"
    # then the two new tiles (distinct kernels), then the second point's sweep
    more = full[9 + len(rules.RASTER_CHOICES):11 + len(rules.RASTER_CHOICES)]
    assert {_point(c) for c in more} == {(space.COOPERATIVE, (256, 128, 64), (2, 1)),
                                         (space.PINGPONG, (128, 128, 64), (1, 2))}
    assert not any(c.raster or c.max_swizzle for c in more)
    assert {kernel_key(c) for c in full[11 + len(rules.RASTER_CHOICES):]} == {kernel_key(full[1])}
    # a budget of 4 is four distinct compiled kernels, as before
    assert len({kernel_key(c) for c in space.space(16384, 14336, 4096, Precision.BF16, Arch.SM90, 4)}) == 4


def test_the_space_prunes_launch_choices_and_tiles_it_cannot_use(monkeypatch):
    # A grid under two waves of the SMs: raster order hardly changes which operands are re-read, no variants.
    small = space.space(32, 512, 256, Precision.BF16, Arch.SM90)
    assert not any(c.raster or c.max_swizzle for c in small)
    # One M tile: no cluster of two along M (the second CTA would have no rows), five of the eleven tiles go.
    assert len(small) == 6 and all(c.cluster[0] == 1 for c in small)
    decode = space.space(1, 14336, 4096, Precision.BF16, Arch.SM90)
    assert decode and all(c.cluster[0] <= -(-1 // c.tile[0]) for c in decode)
    assert all(c.cluster[1] <= -(-2 * 512 // c.tile[1]) for c in small)
    # Between: a point gets its sweep exactly when its own grid is two waves or more (2 x 132 tiles).
    for M in (1024, 4096):
        configs = space.space(M, 2048, 4096, Precision.BF16, Arch.SM90)
        swept = {_point(c) for c in configs if c.raster or c.max_swizzle}
        for c in configs[:2]:
            tiles = -(-M // c.tile[0]) * -(-2 * 2048 // c.tile[1])
            assert (_point(c) in swept) == (tiles >= 264), (M, c.name, tiles)
    assert any(c.raster for c in space.space(4096, 2048, 4096, Precision.BF16, Arch.SM90))  # 512 tiles of 128x256
    # A new tile point whose accumulators would spill (a 128x256 ping-pong tile: 256 per thread) is pruned.
    monkeypatch.setattr(space, "_MORE_POINTS", space._MORE_POINTS + ((space.PINGPONG, (128, 256, 64), (1, 1), 1.0),))
    full = space.space(16384, 14336, 4096, Precision.BF16, Arch.SM90)
    assert (space.PINGPONG, (128, 256, 64), (1, 1)) not in {_point(c) for c in full}
    assert all(space.accumulators(c.kernel_schedule, c.tile) <= 128 for c in full)


def test_launch_variants_of_one_tile_share_one_kernel_and_one_unit():
    import dataclasses
    import re

    from fact_ray.realize.swiglu import MAX_PER_TU, emit_swiglu, kernel_key, symbol

    full = space.space(16384, 14336, 4096, Precision.BF16, Arch.SM90)
    base = full[0]
    along_m, rn_sw4 = (space.config(Precision.BF16, *_point(base), raster=r, max_swizzle=w)
                       for r, w in (("along_m", 0), ("along_n", 4)))
    (source,) = emit_swiglu([base, along_m, rn_sw4], Arch.SM90)
    assert len(set(source.symbols)) == 3 and len({kernel_key(c) for c in source.configs}) == 1
    # one kernel type (values only), three launch choices
    assert re.search(r"\{\{\s*\w+\s*\}\}", source.code) is None
    specs = re.findall(r"using Cfg = (frsw::Spec<[^;]*>);", source.code)
    assert len(specs) == 3 and len(set(specs)) == 1
    launches = re.findall(r"using Launch = (fr::Launch<[^>]*>);", source.code)
    assert launches == ["fr::Launch<0, 0, 0>", "fr::Launch<1, 0, 0>", "fr::Launch<2, 4, 0>"]
    assert source.code.count("struct Launch {") == 1  # the shared header's, once
    # Unset launch fields leave the key (and the symbol) as before they existed; set, they name another symbol.
    assert all(f'"{f}"' not in kernel_key(base) for f in ("raster", "max_swizzle", "decomposition"))
    assert symbol(base) == "frsw_d0af54f4528d59fe2029"  # the Llama-3-8B winner's symbol before issue 17
    # The whole space: at most MAX_PER_TU kernels a unit, every launch variant in its kernel's unit.
    sources = emit_swiglu(full, Arch.SM90)
    unit_of = {c.name: s.name for s in sources for c in s.configs}
    assert sorted(unit_of) == sorted(c.name for c in full)
    assert all(len({kernel_key(c) for c in s.configs}) <= MAX_PER_TU for s in sources)
    for c in full:
        twin = next(b for b in full[:9] if kernel_key(b) == kernel_key(c)) if c.raster or c.max_swizzle else c
        assert unit_of[c.name] == unit_of[twin.name]
    # a decomposition needs the stream-K scheduler, which these kernels do not take
    with pytest.raises(ValueError, match="stream-K"):
        emit_swiglu([dataclasses.replace(base, decomposition="stream_k")], Arch.SM90)
    with pytest.raises(ValueError, match="launch choice"):
        emit_swiglu([dataclasses.replace(base, raster="diagonal")], Arch.SM90)


def test_packing_interleaves_rows_and_is_cached_per_version():
    from fact_ray.realize.swiglu import pack, packed

    g, u = torch.arange(6.0).view(3, 2), 10 + torch.arange(6.0).view(3, 2)
    assert pack(g, u).tolist() == [[0, 1], [10, 11], [2, 3], [12, 13], [4, 5], [14, 15]]
    assert pack(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])).tolist() == [1, 3, 2, 4]
    w1, b1 = packed(g, u)
    w2, _ = packed(g, u)
    assert b1 is None and w2 is w1  # the same weights, unmodified: the same copy
    g.add_(1.0)  # an in-place update bumps the version: packed again, with the new values
    w3, _ = packed(g, u)
    assert w3 is not w1 and w3[0].tolist() == [1, 2]
    with torch.inference_mode():
        gi, ui = torch.ones(2, 2), torch.zeros(2, 2)
    assert packed(gi, ui)[0] is not packed(gi, ui)[0]  # no version counter: never cached


# --------------------------------------------------------------------------------------------- dispatcher


_STUB = r"""
#include <stddef.h>
extern "C" {
int fr_abi_version(void) { return 1; }
const char* frsw_t_name = "swiglu stub";
size_t frsw_t_workspace(const void*) { return 0; }
int frsw_t_can_implement(const void*) { return 0; }
int frsw_t_run(const void*) { return 0; }
}
"""


@pytest.fixture(scope="module")
def swiglu_stub(tmp_path_factory):
    """A library speaking the GEMM ABI under one symbol, as a swiglu TU does (no nvcc needed)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    tmp = tmp_path_factory.mktemp("swiglu-stub")
    (tmp / "stub.cpp").write_text(_STUB)
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(tmp / "stub.so"), str(tmp / "stub.cpp")], check=True,
                   capture_output=True)
    return str(tmp / "stub.so")


def test_the_native_swiglu_op_schema_meta_and_refusals(swiglu_stub):
    from fact_ray.realize import dispatch

    dispatch.load(CACHE)
    native = torch.ops.fact_ray_native
    assert str(native.swiglu.default._schema) == ("fact_ray_native::swiglu(Tensor a, Tensor b_gate, Tensor b_up, "
                                                  "Tensor? bias_gate, Tensor? bias_up, str kernel) -> Tensor")
    problem = SwiGluProblem(M=16, F=48, K=64, dtype="bfloat16", has_bias=True)
    kid = dispatch.register_swiglu(swiglu_stub, "frsw_t", problem)
    bf = dict(device="meta", dtype=torch.bfloat16)
    x, w, b = torch.empty(2, 8, 64, **bf), torch.empty(48, 64, **bf), torch.empty(48, **bf)
    y = native.swiglu(x, w, w, b, b, kid)
    assert y.shape == (2, 8, 48) and y.dtype == torch.bfloat16 and y.is_contiguous()
    assert native.swiglu(x, w, w, None, None, kid).shape == (2, 8, 48)  # one kernel, with or without biases
    with pytest.raises(ValueError, match="both biases or neither"):
        native.swiglu(x, w, w, b, None, kid)
    with pytest.raises(RuntimeError, match="K"):
        native.swiglu(x, torch.empty(48, 32, **bf), torch.empty(48, 32, **bf), b, b, kid)
    with pytest.raises(ValueError, match="is a swiglu kernel"):
        native.gemm(x, w, b, None, kid)
    with pytest.raises(NotImplementedError, match="runs on cuda tensors"):
        native.swiglu(torch.randn(8, 64).bfloat16(), torch.randn(48, 64).bfloat16(),
                      torch.randn(48, 64).bfloat16(), torch.randn(48).bfloat16(), torch.randn(48).bfloat16(), kid)


def test_compose_rewrites_the_llama_mlp_into_one_swiglu_call(llama3_small, swiglu_stub, tmp_path):
    """compose.py, unedited, asks the registry: the gate and up GEMMs, the SiLU and the product become one
    `fact_ray_native.swiglu` call on the graph's own operands, which traces through its Meta impl."""
    from fact_ray.compose import KernelChoice, compose
    from fact_ray.realize import dispatch

    dispatch.load(CACHE)
    captured, (m,) = swiglu_matches(SUITE / "llama3_8b_layer.py")
    cfg = space.space(32, 512, 256, Precision.BF16, Arch.SM90, budget=1)[0]
    composed = compose(captured, [m], {m.key: KernelChoice(cfg, swiglu_stub, "frsw_t")}, "bf16")
    (rep,) = composed.fact_ray.replacements
    assert rep.op == "fact_ray_native.swiglu" and rep.family == "swiglu" and rep.kernel
    calls = [n for n in composed.graph.nodes if n.op == "call_function" and "fact_ray_native" in str(n.target)]
    assert len(calls) == 1 and calls[0].args[-1] == rep.kernel
    targets = {aten_name(n) for n in composed.graph.nodes if n.op == "call_function"}
    assert not any("silu" in t for t in targets)  # the SiLU went into the kernel
    linears = [n for n in composed.graph.nodes if "linear" in aten_name(n)]
    assert len(linears) == 5  # q, k, v, o, down: gate and up are gone
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():  # composed modules are inference-only
        out = composed(torch.empty(1, 32, 256, dtype=torch.bfloat16))
    assert tuple(out.shape) == (1, 32, 256)


# --------------------------------------------------------------------------------------------- one real compile


@pytest.mark.nvcc
@pytest.mark.slow
def test_one_swiglu_unit_compiles_for_sm90a(llama3_small, tmp_path):
    """The plan's first config and a launch variant of it (raster along N, swizzle 4) in one unit: built through
    the pipeline, both entry points exported, one GEMM kernel compiled for the two."""
    import dataclasses

    from fact_ray.realize.build import exported_symbols
    from fact_ray.realize.swiglu import emit_swiglu
    from test_search_wide import gemm_kernels  # the library's launched kernels, from its device stubs

    _, (m,) = swiglu_matches(SUITE / "llama3_8b_layer.py")
    plan = pipeline.plan(m, "bf16", "sm90", budget=1)
    base = plan.configs[0]
    variant = space.config(Precision.BF16, base.kernel_schedule, base.tile, base.cluster[:2], raster="along_n",
                           max_swizzle=4)
    configs = (base, variant)
    plan = dataclasses.replace(plan, configs=configs, sources=tuple(emit_swiglu(configs, Arch.SM90)))
    assert len(plan.sources) == 1 and len(set(plan.sources[0].symbols)) == 2
    seen = []

    class Hooks(pipeline.Hooks):
        def compiled(self, run, built):
            seen.append(built)

    (run,) = pipeline.realize([plan], pipeline.LocalExecutor(str(tmp_path / "cache"), jobs=1), Precision.BF16,
                              Arch.SM90, Hooks())
    (built,) = seen
    assert built.ok, built.library.log[-3000:]
    assert run.trials == [] and run.winner is None  # no GPU here: built, not tried
    exported = exported_symbols(built.library.path)
    for sym in plan.sources[0].symbols:
        assert {f"{sym}_run", f"{sym}_workspace", f"{sym}_can_implement", "fr_abi_version"} <= exported
    assert len(gemm_kernels(built.library.path)) == 1
