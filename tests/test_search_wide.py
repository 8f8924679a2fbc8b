"""The wider GEMM space (issue 17): 4-CTA clusters, raster order and swizzle, forced stream-K, 2.x swizzles, and the
pruning by shape; and one real compile of the new dimensions: one sm90a kernel (cooperative, stream-K scheduler,
2x2 cluster) under three launch choices in one translation unit, compiled once (about 45 s of nvcc).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest

from fact_ray.realize import build as B
from fact_ray.realize.emit import emit, kernel_key, symbol
from fact_ray.search_spaces import catalog, rank, rules, space
from fact_ray.types import Arch, GemmProblem, Precision

SQUARE = GemmProblem(M=4096, N=4096, K=4096, dtype="bfloat16")
LARGE_K = GemmProblem(M=256, N=256, K=524288, dtype="bfloat16")
SKINNY = GemmProblem(M=64, N=4096, K=4096, dtype="bfloat16")


def test_space_enumerates_the_new_dimensions():
    sq = space(SQUARE, Arch.SM90, Precision.BF16)
    sm90 = [c for c in sq if c.template == "sm90_gemm"]
    clusters = {c.cluster for c in sm90}
    assert {(2, 2, 1), (1, 4, 1), (4, 1, 1), (1, 2, 1), (2, 1, 1), (1, 1, 1)} <= clusters
    assert {rank.kernel_schedule(c) for c in sm90} >= {"TmaWarpSpecializedCooperative", "TmaWarpSpecializedPingpong"}
    assert {c.epilogue_schedule for c in sm90} >= {"TmaWarpSpecialized", "TmaWarpSpecializedCooperative",
                                                  "NoSmemWarpSpecialized"}
    launch = {(c.raster, c.max_swizzle) for c in sm90}
    assert launch >= {("", 0), *rules.RASTER_CHOICES}
    # Every raster variant has its default twin: the same kernel (one compile), another symbol.
    twins = {kernel_key(c) for c in sm90 if not c.raster and not c.max_swizzle}
    for c in sm90:
        if c.raster or c.max_swizzle:
            assert kernel_key(c) in twins and rules.persistent(_op_of(c))
    assert {c.swizzle for c in sq if c.template == "sm80_gemm"} >= {"Identity8", "Identity4", "Identity2",
                                                                    "Identity1"}
    assert len({c.name for c in sq}) == len(sq), "names stay unique"

    lk = space(LARGE_K, Arch.SM90, Precision.BF16)
    forced = [c for c in lk if c.decomposition == "stream_k"]
    assert forced and all(c.tile_scheduler == "stream_k" and c.split_k == 1 for c in forced)
    assert any(c.split_k > 1 and c.tile_scheduler == "stream_k" for c in lk), "3.x split-K stays"
    # One output tile per few SMs: no raster variants where the grid is under two waves.
    assert not any(c.raster or c.max_swizzle for c in lk)


def _op_of(cfg):
    return next(o for o in catalog.ops_3x() if cfg.name.startswith(o.name + "_"))


def test_space_prunes_by_shape_and_validity():
    skinny = space(SKINNY, Arch.SM90, Precision.BF16)
    assert skinny
    # M = 64: no CTA taller than 64 rows, no cluster taller than the one-tile grid along M.
    assert all(c.tile[0] <= 64 and c.cluster[0] == 1 for c in skinny)
    # The unpruned catalog has them, so the rule (not the catalog) removed them.
    assert any(o.tile[0] > 64 for o in catalog.ops_3x())
    assert any(o.cluster[0] > 1 for o in catalog.ops_3x())
    lk = space(LARGE_K, Arch.SM90, Precision.BF16)
    # 256 x 256 output: at most 256 wide, and a 4-CTA cluster only where the grid has 4 tiles along that mode.
    for c in lk:
        assert c.tile[0] <= 256 and c.tile[1] <= 256
        assert c.cluster[0] <= -(-256 // c.tile[0]) and c.cluster[1] <= -(-256 // c.tile[1])
    # The validity rules still hold over the wider space: no spilling accumulators, no Auto twins, no
    # cp.async stream-K where K is not a multiple of the tile's K.
    for c in space(SQUARE, Arch.SM90, Precision.BF16):
        if c.template == "sm90_gemm":
            rows = c.tile[0] // 2 if "Cooperative" in rank.kernel_schedule(c) else c.tile[0]
            assert rows * c.tile[1] // 128 <= rules.MAX_ACCUMULATORS
            assert c.kernel_schedule not in ("", "ScheduleAuto")
    odd = GemmProblem(M=4096, N=4096, K=4092, dtype="bfloat16")  # K % 8 != 0: only cp.async 3.x kernels fit
    odd_space = [c for c in space(odd, Arch.SM90, Precision.BF16) if c.template == "sm90_gemm"]
    assert odd_space and not any(c.tile_scheduler == "stream_k" and odd.K % c.tile[2] for c in odd_space)


def test_emit_refuses_launch_choices_a_kernel_cannot_take():
    sq = space(SQUARE, Arch.SM90, Precision.BF16)
    coop = next(c for c in sq if c.template == "sm90_gemm" and c.tile_scheduler == "" and not c.raster
                and rank.kernel_schedule(c) == "TmaWarpSpecializedCooperative")
    with pytest.raises(ValueError, match="stream-K"):
        emit([dataclasses.replace(coop, decomposition="stream_k")], Arch.SM90)
    with pytest.raises(ValueError, match="launch choice"):
        emit([dataclasses.replace(coop, raster="diagonal")], Arch.SM90)
    sm80 = next(c for c in sq if c.template == "sm80_gemm")
    with pytest.raises(ValueError, match="no launch choices"):
        emit([dataclasses.replace(sm80, raster="along_m")], Arch.SM90)
    # The launch choices change the symbol (another entry point), not the kernel; unset, the symbol is what it
    # was before they existed (a stored winner still finds its kernel).
    along = dataclasses.replace(coop, raster="along_n", max_swizzle=4)
    assert symbol(along) != symbol(coop) and kernel_key(along) == kernel_key(coop)
    assert all(f'"{f}"' not in kernel_key(coop) for f in ("raster", "max_swizzle", "decomposition"))


def _launch_variants():
    """One cooperative stream-K kernel with a 2x2 cluster (both new here) under three launch choices."""
    lk = space(GemmProblem(M=1024, N=1024, K=65536, dtype="bfloat16"), Arch.SM90, Precision.BF16)
    base = next(c for c in lk if c.template == "sm90_gemm" and c.tile_scheduler == "stream_k" and c.split_k == 1
                and c.cluster == (2, 2, 1) and not c.decomposition and c.tile == (128, 128, 64)
                and c.epilogue_schedule == "TmaWarpSpecializedCooperative")
    forced = next(c for c in lk if c.decomposition == "stream_k" and kernel_key(c) == kernel_key(base))
    rastered = dataclasses.replace(base, name=base.name + "_rn_sw4", raster="along_n", max_swizzle=4)
    return base, forced, rastered


@pytest.fixture(scope="module")
def launch_tu():
    (source,) = emit(_launch_variants(), Arch.SM90)
    return source


@pytest.fixture(scope="module")
def launch_library(launch_tu, tmp_path_factory):
    return B.build(launch_tu, str(tmp_path_factory.mktemp("launch-build")))


@pytest.mark.nvcc
@pytest.mark.slow
def test_new_dimensions_render_and_compile_one_kernel(launch_tu, launch_library):
    source, lib = launch_tu, launch_library
    assert len(set(source.symbols)) == 3
    assert re.search(r"\{\{\s*\w+\s*\}\}", source.code) is None
    gemms = re.findall(r"using Gemm = typename (fr90::Device<fr90::SpecOf<Cfg, [^>]*>>)::type;", source.code)
    assert len(gemms) == 3 and len(set(gemms)) == 1
    structs = re.findall(r"struct Cfg \{(.*?)\};", source.code, re.S)
    assert len(structs) == 3 and len(set(structs)) == 1, "the kernel's values are the same in all three"
    launches = re.findall(r"using Launch = (fr::Launch<[^>]*>);", source.code)
    assert sorted(launches) == ["fr::Launch<0, 0, 0>", "fr::Launch<0, 0, 1>", "fr::Launch<2, 4, 0>"]
    assert lib.ok, lib.log[-4000:]
    exported = B.exported_symbols(lib.path)
    assert {f"{s}_{part}" for s in source.symbols for part in ("workspace", "can_implement", "run")} <= exported
    # One kernel compiled for three launch choices: the library's host-side launch stubs (local symbols named
    # `__device_stub__<mangled kernel>`, with their length in front) name one GEMM kernel.
    assert len(gemm_kernels(lib.path)) == 1


def gemm_kernels(path: str) -> set[str]:
    """The mangled GEMM kernels a library launches, from its device stubs' static locals (`_ZZL<n>__device_stub_`
    `_<kernel>...`: n is the length of the stub's name). An sm80 TU of five configs, two sharing an instance, shows
    four; one sm90 config, one."""
    listing = subprocess.run(["nm", path], capture_output=True, text=True, check=True).stdout
    found = set()
    for m in re.finditer(r"L(\d+)(__device_stub__\w+)", listing):
        name = m.group(2)[: int(m.group(1))]
        if len(name) == int(m.group(1)) and "GemmUniversal" in name:
            found.add(name)
    return found

@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.nvcc
def test_launch_variants_compute_the_gemm(launch_library):
    """Each launch choice (default, forced stream-K, raster along N with swizzle 4) runs and computes the GEMM; the
    default one also in its split-K mode."""
    from test_emit_build import _run_gemm  # the ABI-level runner of the real-template tests

    assert launch_library.ok, launch_library.log[-4000:]
    problem = GemmProblem(M=1024, N=1024, K=16384, dtype="bfloat16")
    base, forced, rastered = _launch_variants()
    for cfg, split in ((base, 1), (forced, 1), (rastered, 1), (base, 4)):
        err = _run_gemm(launch_library, cfg, problem, split_k=split)
        assert err < 1e-2, (cfg.name, split, err)
