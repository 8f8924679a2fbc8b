"""Which catalog ops may realize a problem under a precision policy on an architecture.

Declarative tables first (policy -> kernel families), then the pruning rules that CUTLASS would otherwise
enforce with a static_assert at compile time or a `can_implement` refusal at run time. Pruning here costs
nothing; a config that fails later costs a compile (tens of seconds on sm90) or a trial.
"""

from __future__ import annotations

from fact_ray.types import Arch, GemmProblem, Precision

from fact_ray.search_spaces.catalog import BaseOp

SM_COUNT = {Arch.SM80: 108, Arch.SM90: 132}  # A100 and H100/H200

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

# Epilogues that need a 3.x fusion operation, and those that read C (the residual, with beta = 1). A residual
# alone is the plain LinearCombination with C loaded, which every epilogue schedule implements.
FUSED_EPILOGUES = {"bias", "bias_act", "bias_residual", "act"}
C_EPILOGUES = {"bias_residual", "residual"}

# Per-thread fp32 accumulators a consumer warpgroup may hold. Consumer threads get at most 232-240 registers
# (setmaxnreg); past 128 accumulators the addresses, fragments and epilogue no longer fit beside them and they
# spill: the H200 measured bf16 256x256x64 cooperative (128x256 per warpgroup = 256 accumulators) at 43 TFLOP/s,
# 0.06x of cuBLAS, and the non-persistent 256x256 (512) at 21 TFLOP/s. 128x256 cooperative and 64x256 ping-pong
# hold exactly 128 (ptxas, bf16 128x256 cooperative: GELU epilogue and residual epilogue, 0 and 20 B spilled).
MAX_ACCUMULATORS = 128
THREADS_PER_WARPGROUP = 128


def family(op: BaseOp) -> tuple[str, str, str]:
    return (op.template, op.opclass, op.math_op)


def policy_allows(op: BaseOp, arch: Arch, policy: Precision) -> bool:
    return op.element == POLICY_ELEMENT[policy] and family(op) in FAMILIES[(arch, policy)]


def layouts_match(op: BaseOp, problem: GemmProblem) -> bool:
    # 2.x ops exist for every layout pair; 3.x validity (tf32 K-major, smem layouts) depends on it. tf32 WGMMA
    # reads both operands K-major from shared memory (no transposing load for 32-bit types), so a float B stored
    # [K, N] (layout "row", e.g. torch.matmul(a, w) and bmm) has no 3.x kernel here and only 2.x mma.sync tf32
    # runs (the H200 measured 0.5x of cuBLAS TF32 on 4096^3). Transposing B once into [N, K] would open the
    # WGMMA path; that belongs to the caller (a later change), not to the space.
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
    if problem.epilogue in C_EPILOGUES:
        # The residual is C (beta = 1): a fused bias needs a TMA epilogue; a residual alone runs on any.
        return not op.c_void and (tma_epilogue or problem.epilogue not in FUSED_EPILOGUES)
    if problem.epilogue in FUSED_EPILOGUES:
        return tma_epilogue and op.c_void  # no C to load: bias and/or activation only
    # Plain GEMM: a TMA epilogue without C, or a NoSmem/Auto epilogue (C typed, never read with beta = 0).
    return op.c_void if tma_epilogue else not op.c_void


def resolve_kernel_schedule(template: str, schedule: str, tile_m: int, tma: bool) -> str:
    """The 3.x kernel schedule the builder really instantiates: KernelScheduleAuto is resolved as
    sm90_gmma_builder.inl does with CUDA >= 12.1 (TMA-able operands: ping-pong for 64-row tiles, else
    cooperative; otherwise the non-persistent cp.async kernel). "" for 2.x kernels."""
    if template != "sm90_gemm":
        return ""
    if schedule in ("", "ScheduleAuto"):
        if not tma:
            return "CpAsyncWarpSpecialized"
        return "TmaWarpSpecializedPingpong" if tile_m == 64 else "TmaWarpSpecializedCooperative"
    return schedule


def kernel_schedule(op: BaseOp) -> str:
    return resolve_kernel_schedule(op.template, op.kernel_schedule, op.tile[0], op.tma)


def epilogue_schedule(op: BaseOp) -> str:
    """The 3.x epilogue schedule instantiated: EpilogueScheduleAuto is NoSmemWarpSpecialized (sm90_builder.inl)."""
    if op.template != "sm90_gemm":
        return ""
    return "NoSmemWarpSpecialized" if op.epilogue_schedule in ("", "ScheduleAuto") else op.epilogue_schedule


def accumulators_per_thread(op: BaseOp) -> int:
    """fp32 accumulators each consumer thread holds in a 3.x kernel: cooperative kernels split the CTA tile's M
    over two consumer warpgroups, ping-pong and the non-persistent kernels give one warpgroup the whole tile.
    0 for 2.x ops (their warp tiles come from CUTLASS's own or register-checked tile descriptions)."""
    if op.template != "sm90_gemm":
        return 0
    tm, tn, _ = op.tile
    rows = tm // 2 if "Cooperative" in kernel_schedule(op) else tm
    return rows * tn // THREADS_PER_WARPGROUP


def registers_fit(op: BaseOp) -> bool:
    return accumulators_per_thread(op) <= MAX_ACCUMULATORS


def scheduler_fits(op: BaseOp, problem: GemmProblem) -> bool:
    """cp.async (non-TMA) 3.x kernels under the stream-K scheduler give wrong results when K is not a multiple
    of the tile's K and a work unit starts mid-K (measured on an H200, November 2026: bf16, K=766 and 1022, rel.
    error 4e-2..9e-2, in both stream-K and split-K decompositions; TMA kernels and 2.x split-K were exact).
    CUTLASS's can_implement does not catch it, so the space never offers that pairing."""
    if op.template == "sm90_gemm" and not op.tma and op.tile_scheduler == "stream_k":
        return problem.K % op.tile[2] == 0
    return True


# The smallest CTA extent the pruning by shape keeps whatever the problem (3.x WGMMA tiles start at 64 rows).
MIN_USEFUL_TILE = 64


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tile_fits_shape(op: BaseOp, problem: GemmProblem) -> bool:
    """No tile larger than the problem needs: a CTA extent above the problem's own (rounded up to a power of two,
    at least MIN_USEFUL_TILE) only computes padding, and a smaller tile of the space covers the same output. Nor
    a cluster longer than the grid along a mode: the launch rounds the grid up to whole clusters, and the extra
    CTAs hold SMs without work."""
    tm, tn, _ = op.tile
    if tm > max(MIN_USEFUL_TILE, _pow2_ceil(problem.M)) or tn > max(MIN_USEFUL_TILE, _pow2_ceil(problem.N)):
        return False
    return cluster_fits(op.tile, op.cluster, problem.M, problem.N)


def cluster_fits(tile: tuple[int, ...], cluster: tuple[int, ...], M: int, N: int) -> bool:
    """No cluster longer than the grid of `tile`s over an M x N output along either mode (a cluster of one always
    fits)."""
    return all(c == 1 or c <= -(-extent // t) for c, t, extent in zip(cluster[:2], tile[:2], (M, N)))


def usable(op: BaseOp, problem: GemmProblem, arch: Arch, policy: Precision) -> bool:
    return (policy_allows(op, arch, policy) and layouts_match(op, problem) and alignment_fits(op, problem)
            and epilogue_fits(op, problem) and scheduler_fits(op, problem) and registers_fit(op)
            and tile_fits_shape(op, problem))


# 2.x threadblock swizzles (GemmIdentityThreadblockSwizzle<N>) tried for a grid of at least one wave.
SM80_SWIZZLES = (8, 4, 2, 1)
# 3.x persistent/stream-K launch choices beside the scheduler's own (heuristic raster, swizzle 1): the profiler's
# raster x swizzle sweep, thinned to the pairs that change which tiles run together.
RASTER_CHOICES = (("along_m", 0), ("along_n", 0), ("", 2), ("", 8), ("along_m", 4), ("along_n", 4))
# Below this many waves of output tiles the raster order hardly changes which operands are re-read.
RASTER_MIN_WAVES = 2


def persistent(op: BaseOp) -> bool:
    """A 3.x kernel whose grid is persistent (cooperative and ping-pong kernels, or the stream-K scheduler):
    only those take a raster order and swizzle."""
    return op.template == "sm90_gemm" and (op.tile_scheduler == "stream_k" or
                                          kernel_schedule(op) in PERSISTENT_SCHEDULES)


PERSISTENT_SCHEDULES = {"TmaWarpSpecializedCooperative", "TmaWarpSpecializedPingpong",
                        "CpAsyncWarpSpecializedCooperative", "CpAsyncWarpSpecializedPingpong"}


def rasters(op: BaseOp, problem: GemmProblem, arch: Arch) -> bool:
    """Whether raster/swizzle variants of `op` are worth a place in the space: a persistent 3.x kernel whose
    explicit schedule names it (Auto twins are dropped by widest_alignment_only) over several waves of tiles."""
    if not persistent(op) or op.kernel_schedule in ("", "ScheduleAuto"):
        return False
    return several_waves(-(-problem.M // op.tile[0]) * -(-problem.N // op.tile[1]) * problem.L, arch)


def several_waves(tiles: int, arch: Arch) -> bool:
    """Whether a persistent grid of `tiles` output tiles is long enough for its raster order and swizzle to
    change which operands stay in L2 (RASTER_MIN_WAVES waves or more)."""
    return tiles >= RASTER_MIN_WAVES * SM_COUNT[arch]


def launch_suffix(raster: str, max_swizzle: int, decomposition: str = "") -> str:
    """The name suffix of a config's 3.x launch choices ("" for the scheduler's own), e.g. `_rn_sw4`."""
    suffix = f"_r{raster.removeprefix('along_')}" if raster else ""
    if max_swizzle:
        suffix += f"_sw{max_swizzle}"
    if decomposition:
        suffix += f"_{decomposition.replace('_', '')}"
    return suffix


def stream_k_helps(op: BaseOp, problem: GemmProblem, arch: Arch) -> bool:
    """A stream-K op on a grid whose last wave leaves a quarter of the SMs idle or more (or less than one wave),
    with K long enough to share: where forcing stream-K units can beat the scheduler's heuristic."""
    if op.tile_scheduler != "stream_k" or problem.L != 1:
        return False
    sms = SM_COUNT[arch]
    tiles = -(-problem.M // op.tile[0]) * -(-problem.N // op.tile[1])
    waves = tiles / sms
    fill = waves / -(-tiles // sms)
    return fill < 0.75 and problem.K >= 8 * op.tile[2]



def widest_alignment_only(ops: list[BaseOp]) -> list[BaseOp]:
    """Of ops that compile to the same kernel but for their alignment, keep the widest that fits; narrower ones
    are strictly slower. Auto schedules count as what they resolve to, and an explicit twin is kept over the
    Auto op (ScheduleAuto/ScheduleAuto is cooperative or ping-pong with the NoSmem epilogue: the same kernel).

    On sm90, the cp.async ("alignx") kernels are kept only where no TMA kernel fits the problem's alignment.
    """
    any_tma = any(op.tma for op in ops if op.template == "sm90_gemm")
    best: dict[tuple, BaseOp] = {}
    for op in ops:
        if op.template == "sm90_gemm" and any_tma and not op.tma:
            continue
        key = (op.template, op.opclass, op.math_op, op.tile, op.warps, op.cluster, op.stages, kernel_schedule(op),
               epilogue_schedule(op), op.tile_scheduler, op.c_void, op.tma)
        kept = best.get(key)
        if kept is None or _preference(op) > _preference(kept):
            best[key] = op
    return sorted(best.values(), key=lambda o: o.name)


def _preference(op: BaseOp) -> tuple:
    return (op.alignment, op.kernel_schedule not in ("", "ScheduleAuto") or op.template != "sm90_gemm", op.name)
