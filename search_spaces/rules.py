"""Which catalog ops may realize a problem under a precision policy on an architecture.

Declarative tables first (policy -> kernel families), then the pruning rules that CUTLASS would otherwise
enforce with a static_assert at compile time or a `can_implement` refusal at run time. Pruning here costs
nothing; a config that fails later costs a compile (tens of seconds on sm90) or a trial.
"""

from __future__ import annotations

from fact_ray.types import Arch, GemmProblem, Precision

from fact_ray.search_spaces.catalog import BaseOp

# Operand element per policy (A, B and D hold it; accumulation is always fp32).
POLICY_ELEMENT = {
    Precision.FP32: "float",
    Precision.TF32: "float",
    Precision.BF16: "bfloat16_t",
    Precision.FP16: "half_t",
}

# (template, opclass, math_op) families each policy allows, per target arch. fp32 policy: fp32-class accuracy
# only, i.e. 3xTF32 (multiply_add_fast_f32) or SIMT, never 1xTF32; sm90's CollectiveBuilder has no 3xTF32, so on
# Hopper the 2.x kernels are compiled for sm_90a as well. tf32 policy: 1xTF32 (2.x tensor ops on float data run
# tf32 mma; 3.x float operands run tf32 WGMMA). bf16/fp16: tensor ops. On sm90 the 2.x families stay in the
# space with a lower prior (see rank.py): mma.sync runs on Hopper, and they cover alignments TMA cannot.
_FP32_CLASS = {("sm80_gemm", "tensorop", "multiply_add_fast_f32"), ("sm80_gemm", "simt", "multiply_add")}
_SM80_TENSOR = {("sm80_gemm", "tensorop", "multiply_add")}
_SM90_TENSOR = {("sm90_gemm", "tensorop", "multiply_add")}
FAMILIES = {
    (Arch.SM80, Precision.FP32): _FP32_CLASS,
    (Arch.SM90, Precision.FP32): _FP32_CLASS,
    (Arch.SM80, Precision.TF32): _SM80_TENSOR,
    (Arch.SM90, Precision.TF32): _SM90_TENSOR | _SM80_TENSOR,
    (Arch.SM80, Precision.BF16): _SM80_TENSOR,
    (Arch.SM90, Precision.BF16): _SM90_TENSOR | _SM80_TENSOR,
    (Arch.SM80, Precision.FP16): _SM80_TENSOR,
    (Arch.SM90, Precision.FP16): _SM90_TENSOR | _SM80_TENSOR,
}

# 3.x epilogue schedules that accept fusion operations (Auto and NoSmem static_assert on anything else).
TMA_EPILOGUES = {"TmaWarpSpecialized", "TmaWarpSpecializedCooperative"}

FUSED_EPILOGUES = {"bias", "bias_act", "bias_residual"}


def family(op: BaseOp) -> tuple[str, str, str]:
    return (op.template, op.opclass, op.math_op)


def policy_allows(op: BaseOp, arch: Arch, policy: Precision) -> bool:
    return op.element == POLICY_ELEMENT[policy] and family(op) in FAMILIES[(arch, policy)]


def layouts_match(op: BaseOp, problem: GemmProblem) -> bool:
    # 2.x ops exist for every layout pair; 3.x validity (tf32 K-major, smem layouts) depends on it.
    return op.layout_a == problem.layout_a and op.layout_b == problem.layout_b


def alignment_fits(op: BaseOp, problem: GemmProblem) -> bool:
    """Every strided extent a vector access spans must be a multiple of that access (CUTLASS's can_implement)."""
    align_a, align_b, align_c = op.alignment
    a_extent = problem.K if problem.layout_a == "row" else problem.M  # the contiguous dimension of A's storage
    b_extent = problem.K if problem.layout_b == "col" else problem.N
    return a_extent % align_a == 0 and b_extent % align_b == 0 and problem.N % align_c == 0


def epilogue_fits(op: BaseOp, problem: GemmProblem) -> bool:
    """Pairs epilogues with schedules that implement them, and C's element with whether C is read."""
    if op.template == "sm80_gemm":
        # 2.x: every epilogue is a functor choice in the template (bias through C, or the broadcast epilogue).
        return True
    tma_epilogue = op.epilogue_schedule in TMA_EPILOGUES
    if problem.epilogue == "bias_residual":
        return tma_epilogue and not op.c_void  # the residual is C (beta = 1) in a fused epilogue
    if problem.epilogue in FUSED_EPILOGUES:
        return tma_epilogue and op.c_void  # no C to load: bias (and activation) only
    # Plain GEMM: a TMA epilogue without C, or a NoSmem/Auto epilogue (C typed, never read with beta = 0).
    return op.c_void if tma_epilogue else not op.c_void


def scheduler_fits(op: BaseOp, problem: GemmProblem) -> bool:
    """cp.async (non-TMA) 3.x kernels under the stream-K scheduler give wrong results when K is not a multiple
    of the tile's K and a work unit starts mid-K (measured on an H200, November 2026: bf16, K=766 and 1022, rel.
    error 4e-2..9e-2, in both stream-K and split-K decompositions; TMA kernels and 2.x split-K were exact).
    CUTLASS's can_implement does not catch it, so the space never offers that pairing."""
    if op.template == "sm90_gemm" and not op.tma and op.tile_scheduler == "stream_k":
        return problem.K % op.tile[2] == 0
    return True


def usable(op: BaseOp, problem: GemmProblem, arch: Arch, policy: Precision) -> bool:
    return (policy_allows(op, arch, policy) and layouts_match(op, problem) and alignment_fits(op, problem)
            and epilogue_fits(op, problem) and scheduler_fits(op, problem))


def widest_alignment_only(ops: list[BaseOp]) -> list[BaseOp]:
    """Of ops identical but for their alignment, keep the widest that fits; narrower ones are strictly slower.

    On sm90, the cp.async ("alignx") kernels are kept only where no TMA kernel fits the problem's alignment.
    """
    any_tma = any(op.tma for op in ops if op.template == "sm90_gemm")
    best: dict[tuple, BaseOp] = {}
    for op in ops:
        if op.template == "sm90_gemm" and any_tma and not op.tma:
            continue
        key = (op.template, op.opclass, op.math_op, op.tile, op.warps, op.cluster, op.stages, op.kernel_schedule,
               op.epilogue_schedule, op.tile_scheduler, op.c_void, op.tma)
        kept = best.get(key)
        if kept is None or (op.alignment, op.name) > (kept.alignment, kept.name):
            best[key] = op
    return sorted(best.values(), key=lambda o: o.name)
