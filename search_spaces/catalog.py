"""The CUTLASS kernel catalog, enumerated with cutlass_library's own generator.

`cutlass_library` (pure Python, no GPU) stamps out the GEMM operations CUTLASS itself ships: tiles, warp
counts, stages, instruction shapes, clusters and the (kernel, epilogue, tile scheduler) schedule triples that its
validity rules (`sm90_utils.is_tile_desc_valid`, `get_valid_schedules`, shared-memory limits per arch) accept.
We run the generator functions that matter to fact-ray, keep the ops whose data types we can use, and turn each
into a small frozen `BaseOp`. The manifests are built lazily and cached per process, never at import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

# The toolkit version the generator assumes when it gates features (stream-K needs >= 12.1). fact-ray builds
# with nvcc 13.x; the version used at build time is part of every build key, not of the space.
GENERATOR_CUDA_VERSION = "13.0"

# sm90 instantiation level (cutlass_library digits: schedule pruning, cluster sizes, MMA multipliers, WGMMA
# shapes). 1322: no schedule pruning; clusters 1x1, 1x2, 2x1, 2x2, 1x4, 4x1 (level 2 stopped at two CTAs; the
# 4-CTA clusters multicast an operand to four SMs, which the bf16 targets need); CTA tiles from 64 to
# 256 rows and 16 to 256 columns. About 12,800 ops over every layout, built in ~4 s once per process.
SM90_INSTANTIATION_LEVEL = "1322"

# Our names for the element types (KernelConfig.element) and the torch dtypes they hold.
ELEMENTS = {"f32": "float", "bf16": "bfloat16_t", "f16": "half_t"}
TORCH_DTYPE = {"float": "float32", "bfloat16_t": "bfloat16", "half_t": "float16"}


@dataclass(frozen=True)
class BaseOp:
    """One CUTLASS GEMM operation, reduced to what a KernelConfig needs."""

    template: str  # "sm80_gemm" (2.x device::GemmUniversal) | "sm90_gemm" (3.x CollectiveBuilder)
    name: str  # cutlass_library procedural name (its layout letters follow the library's column-major C)
    element: str  # float | bfloat16_t | half_t (A, B and D; the accumulator is always float)
    opclass: str  # tensorop | simt
    math_op: str  # MathOperation name, e.g. multiply_add_fast_f32
    instruction: tuple[int, int, int]  # (0, 0, 0) on sm90: the builder picks the WGMMA shape
    tile: tuple[int, int, int]
    warps: tuple[int, int, int]
    cluster: tuple[int, int, int]
    stages: int  # 0 on sm90: as many as shared memory allows after the epilogue
    kernel_schedule: str  # KernelScheduleType name (3.x) or ""
    epilogue_schedule: str  # EpilogueScheduleType name (3.x) or ""
    tile_scheduler: str  # "" | "persistent" | "stream_k" (3.x)
    alignment: tuple[int, int, int]  # A, B, C/D in elements
    layout_a: str  # "row" | "col"
    layout_b: str  # "row" (stored [K, N]) | "col" (stored [N, K])
    c_void: bool  # 3.x: C is not loaded at all (no residual possible)
    tma: bool  # 3.x: TMA loads (needs 16-byte aligned strides); False for the cp.async "alignx" kernels


def _manifest(architecture: str, level: str | None):
    from cutlass_library import generator, manifest

    argv = ["--architectures", architecture, "--kernels", "all"]
    if level:
        argv += ["--instantiation-level", level]
    return manifest.Manifest(generator.define_parser().parse_args(argv))


def _gemm_ops(m):
    from cutlass_library.library import OperationKind

    return [op for by_cfg in m.operations.get(OperationKind.Gemm, {}).values() for ops in by_cfg.values() for op in ops]


def _layout(lib, layout) -> str:
    return "row" if layout == lib.LayoutType.RowMajor else "col"


# 3xTF32 tile descriptions beyond the generator's 13 (tile -> (warp layout, stages) pairs), for Hopper, where the
# 2.x 3xTF32 kernels are the fp32-class tensor-core path (the H200 measured 1.34-1.42x over cuBLAS fp32 with
# 128x128x16, warps 4x2, 3 stages). Warp tiles stay 32x64 or 64x32: a 64x64 3xTF32 warp tile holds 128
# accumulators plus big and small A/B fragments and spills (ptxas, sm_90a: 255 registers, 928 B spill stores for
# 128x128x16 w2x2, 128x256x16 w2x4 and 256x128x16 w4x2), and 16 warps of 230-240 registers (128x256 w4x4) do not
# fit the 64K-register file, so 128x256 and 256x128 tiles are absent. Stages up to 5 within sm80's 163 KB.
EXTRA_3XTF32 = {
    (128, 128, 16): (((4, 2, 1), 5), ((2, 4, 1), 3), ((2, 4, 1), 4), ((2, 4, 1), 5)),
    (128, 128, 32): (((4, 2, 1), 4), ((4, 2, 1), 5), ((2, 4, 1), 3), ((2, 4, 1), 4)),
    (64, 128, 32): (((2, 2, 1), 4), ((2, 2, 1), 5)),
    (128, 64, 32): (((2, 2, 1), 4), ((2, 2, 1), 5)),
}
SM80_SMEM_BYTES = 163 * 1024  # cutlass_library.SharedMemPerCC[80]: the 2.x kernels build for sm_80 as well


def _extra_3xtf32(generated: list[BaseOp]) -> list[BaseOp]:
    """EXTRA_3XTF32 variants of the generated 3xTF32 ops (every layout and alignment), named like CUTLASS's own
    with the warp layout appended (`..._128x128_16x5_tn_align4_w2x4`): the procedural name has no warp count."""
    have = {(o.tile, o.warps, o.stages, o.layout_a, o.layout_b, o.alignment) for o in generated}
    seeds: dict[tuple, BaseOp] = {}
    for o in generated:
        if o.math_op == "multiply_add_fast_f32" and o.tile in EXTRA_3XTF32:
            seeds.setdefault((o.tile, o.layout_a, o.layout_b, o.alignment), o)
    out = []
    for (tile, la, lb, align), seed in sorted(seeds.items()):
        tm, tn, tk = tile
        part = f"_{tm}x{tn}_{tk}x{seed.stages}_"
        assert seed.name.count(part) == 1, seed.name
        for warps, stages in EXTRA_3XTF32[tile]:
            if (tile, warps, stages, la, lb, align) in have or stages * (tm + tn) * tk * 4 > SM80_SMEM_BYTES:
                continue
            name = seed.name.replace(part, f"_{tm}x{tn}_{tk}x{stages}_") + f"_w{warps[0]}x{warps[1]}"
            out.append(replace(seed, name=name, warps=warps, stages=stages))
    return out


@functools.lru_cache(maxsize=None)
def ops_2x() -> tuple[BaseOp, ...]:
    """CUTLASS 2.x (sm80) GEMMs: 3xTF32 and SIMT for fp32, 1xTF32 on fp32 data, bf16/fp16 tensor ops."""
    from cutlass_library import generator as G
    from cutlass_library import library as lib

    m = _manifest("80", None)
    G.GenerateSM80_TensorOp_1688_fast_fp32_math(m, GENERATOR_CUDA_VERSION)  # 3xTF32: multiply_add_fast_f32
    G.GenerateSM80_Simt_f32(m, GENERATOR_CUDA_VERSION)
    G.GenerateSM80_TensorOp_1688_fast_math(m, GENERATOR_CUDA_VERSION)  # 1xTF32 on float data (and others, dropped)
    G.GenerateSM80_TensorOp_16816(m, GENERATOR_CUDA_VERSION)  # bf16 / fp16
    keep_math = {
        lib.DataType.f32: {lib.MathOperation.multiply_add, lib.MathOperation.multiply_add_fast_f32},
        lib.DataType.bf16: {lib.MathOperation.multiply_add},
        lib.DataType.f16: {lib.MathOperation.multiply_add},
    }
    out = []
    for op in _gemm_ops(m):
        td = op.tile_description
        mi = td.math_instruction
        if op.gemm_kind != lib.GemmKind.Universal or op.A.element not in keep_math:
            continue
        if mi.math_operation not in keep_math[op.A.element] or mi.element_accumulator != lib.DataType.f32:
            continue
        if op.C.element != op.A.element:  # D in the operands' type (bf16 in, bf16 out)
            continue
        out.append(BaseOp(
            template="sm80_gemm", name=op.procedural_name(),
            element=ELEMENTS[lib.DataTypeNames[op.A.element]],
            opclass="simt" if mi.opcode_class == lib.OpcodeClass.Simt else "tensorop",
            math_op=mi.math_operation.name, instruction=tuple(mi.instruction_shape),
            tile=tuple(td.threadblock_shape), warps=tuple(td.warp_count), cluster=(1, 1, 1), stages=td.stages,
            kernel_schedule="", epilogue_schedule="", tile_scheduler="",
            alignment=(op.A.alignment, op.B.alignment, op.C.alignment),
            layout_a=_layout(lib, op.A.layout), layout_b=_layout(lib, op.B.layout), c_void=False, tma=False,
        ))
    out += _extra_3xtf32(out)
    return tuple(sorted(out, key=lambda o: o.name))


_SCHEDULER = {"Default": "", "Persistent": "persistent", "StreamK": "stream_k"}


@functools.lru_cache(maxsize=None)
def ops_3x() -> tuple[BaseOp, ...]:
    """CUTLASS 3.x (sm90a) GEMMs: bf16/fp16 WGMMA and tf32 WGMMA on float data, TMA and cp.async variants."""
    from cutlass_library import generator as G
    from cutlass_library import library as lib

    m = _manifest("90a", SM90_INSTANTIATION_LEVEL)
    G.GenerateSM90_TensorOp_16b_WGMMA_gemm(m, GENERATOR_CUDA_VERSION)
    G.GenerateSM90_TensorOp_16b_WGMMA_alignx_gemm(m, GENERATOR_CUDA_VERSION)
    G.GenerateSM90_TensorOp_tf32_WGMMA_gemm(m, GENERATOR_CUDA_VERSION)
    G.GenerateSM90_TensorOp_tf32_WGMMA_alignx_gemm(m, GENERATOR_CUDA_VERSION)
    cp_async = {lib.KernelScheduleType.CpAsyncWarpSpecialized, lib.KernelScheduleType.CpAsyncWarpSpecializedPingpong,
                lib.KernelScheduleType.CpAsyncWarpSpecializedCooperative}
    out = []
    for op in _gemm_ops(m):
        td = op.tile_description
        mi = td.math_instruction
        # float A/B (the builder feeds them to tf32 WGMMA), bf16, fp16; tf32-typed tensors are not torch's.
        if op.gemm_kind != lib.GemmKind.Universal3x or op.A.element not in (lib.DataType.f32, lib.DataType.bf16,
                                                                          lib.DataType.f16):
            continue
        if op.B.element != op.A.element or op.D.element != op.A.element or mi.element_accumulator != lib.DataType.f32:
            continue
        if op.C.element not in (lib.DataType.void, op.A.element):
            continue
        # The transposed epilogue computes D^T; our templates write a row-major D directly.
        if op.epilogue_schedule == lib.EpilogueScheduleType.EpilogueTransposed:
            continue
        out.append(BaseOp(
            template="sm90_gemm", name=op.procedural_name(),
            element=ELEMENTS[lib.DataTypeNames[op.A.element]], opclass="tensorop",
            math_op=mi.math_operation.name, instruction=(0, 0, 0),
            tile=tuple(td.threadblock_shape), warps=(1, 1, 1), cluster=tuple(td.cluster_shape), stages=td.stages,
            kernel_schedule=op.kernel_schedule.name, epilogue_schedule=op.epilogue_schedule.name,
            tile_scheduler=_SCHEDULER[op.tile_scheduler.name],
            alignment=(op.A.alignment, op.B.alignment, op.D.alignment),
            layout_a=_layout(lib, op.A.layout), layout_b=_layout(lib, op.B.layout),
            c_void=op.C.element == lib.DataType.void, tma=op.kernel_schedule not in cp_async,
        ))
    return tuple(sorted(out, key=lambda o: o.name))
