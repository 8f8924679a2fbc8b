"""The SwiGLU search space: D[M, F] = silu(x @ Wg^T) * (x @ Wu^T) as one sm90 GEMM over the interleaved [2F, K]
weight with the SwiGLU epilogue (realize/swiglu.py) -> ordered KernelConfigs of template `sm90_swiglu`.

Dimensions: CTA tile, cluster and kernel schedule (cooperative or ping-pong, persistent), and the persistent tile
scheduler's launch choices (raster order, max swizzle: rules.RASTER_CHOICES, as the GEMM space has them). The
epilogue takes no shared memory and writes from registers, so there is no epilogue schedule to choose. Tiles hold
at most 128 fp32 accumulators per consumer thread (rules.MAX_ACCUMULATORS: past that the H200 measured spills and
0.06x). Tile points are ordered by how evenly the problem's output tiles fill the SMs times the share of the M
tiles' rows the problem uses, then by the prior of the point (wide N tiles first: the GEMM is 2F wide and its A
rows are re-read once per N tile).

The order, in tiers:
1. the nine tile points of `_POINTS`, ranked: as before launch choices existed, so a budget of up to 9 tries the
   same distinct kernels in the same order (the H200's best of them: 591 TFLOP/s at Llama-3-8B's size);
2. the launch variants of the best-ranked point, where its grid is several waves (rules.several_waves: on a
   shorter grid the raster hardly changes which operands are re-read). They cost no compile (emit_swiglu puts
   them in their kernel's TU, which compiles the kernel once), only trials, and they aim at the last few percent
   to cuBLAS (606 TFLOP/s), which a tile change has not given;
3. the tile points of `_MORE_POINTS`, ranked: new distinct kernels, each a compile, with priors never measured;
4. the launch variants of the next RASTER_POINTS - 1 best-ranked points.
So a budget of 16 (the default) tries the nine kernels, the best one's six launch variants and one new tile.
"""

from __future__ import annotations

from fact_ray.errors import CannotImplement
from fact_ray.types import Arch, KernelConfig, Precision

from fact_ray.search_spaces import rank, rules

TEMPLATE = "sm90_swiglu"
EPILOGUE = "swiglu"
ELEMENTS = {Precision.BF16: "bfloat16_t", Precision.FP16: "half_t"}
_SHORT = {"bfloat16_t": "bf16", "half_t": "f16"}
COOPERATIVE = "TmaWarpSpecializedCooperative"
PINGPONG = "TmaWarpSpecializedPingpong"

# (kernel schedule, CTA tile, cluster M x N, prior): the shapes CUTLASS's profiler runs fastest for bf16 TN GEMMs
# of this size on Hopper, the first ones first.
_POINTS = (
    (COOPERATIVE, (128, 256, 64), (2, 1), 1.00),
    (PINGPONG, (64, 256, 64), (2, 1), 0.98),
    (COOPERATIVE, (128, 256, 64), (1, 1), 0.97),
    (COOPERATIVE, (256, 128, 64), (1, 2), 0.96),
    (PINGPONG, (128, 128, 64), (2, 1), 0.94),
    (COOPERATIVE, (128, 128, 64), (2, 1), 0.92),
    (PINGPONG, (64, 128, 64), (1, 1), 0.88),
    (COOPERATIVE, (128, 128, 64), (1, 1), 0.88),
    (PINGPONG, (64, 256, 64), (1, 1), 0.86),
)
# Tile points added later (issue 17), ranked after the nine above whatever their score: both hold exactly 128
# accumulators per consumer thread and are CUTLASS profiler shapes, but neither has run here yet.
_MORE_POINTS = (
    (COOPERATIVE, (256, 128, 64), (2, 1), 0.93),
    (PINGPONG, (128, 128, 64), (1, 2), 0.90),
)
# How many of the best-ranked tile points get launch variants (rules.RASTER_CHOICES: six each).
RASTER_POINTS = 2


def accumulators(schedule: str, tile: tuple[int, int, int]) -> int:
    """fp32 accumulators per consumer thread: a cooperative tile is split over two warpgroups, a ping-pong tile
    belongs to one."""
    warpgroups = 2 if schedule == COOPERATIVE else 1
    return tile[0] * tile[1] // (warpgroups * rules.THREADS_PER_WARPGROUP)


def check(M: int, F: int, K: int, policy: Precision, arch: Arch) -> str:
    """The element type for this problem, or CannotImplement (one line) for what these kernels do not run."""
    policy, arch = Precision(policy), Arch(arch)
    if arch is not Arch.SM90:
        raise CannotImplement(f"swiglu kernels are sm_90a (WGMMA) only, not {arch.value}")
    if policy not in ELEMENTS:
        raise CannotImplement(f"swiglu kernels run bf16 or fp16 operands, not the {policy.value} policy")
    if min(M, F, K) < 1:
        raise CannotImplement(f"swiglu extents must be positive, got M={M} F={F} K={K}")
    if K % 8:  # TMA: 16-byte rows of x and of the weights
        raise CannotImplement(f"swiglu needs K a multiple of 8 (16-byte rows for TMA), got K={K}")
    if max(M, 2 * F, K) > 2**31 - 1:
        raise CannotImplement(f"swiglu extents over CUTLASS's 32-bit range: M={M} 2F={2 * F} K={K}")
    return ELEMENTS[policy]


def config(policy: Precision, schedule: str, tile: tuple[int, int, int], cluster: tuple[int, int], raster: str = "",
           max_swizzle: int = 0) -> KernelConfig:
    policy = Precision(policy)
    element = ELEMENTS[policy]
    kind = "coop" if schedule == COOPERATIVE else "pingpong"
    name = (f"swiglu_sm90_{_SHORT[element]}_{tile[0]}x{tile[1]}x{tile[2]}_{cluster[0]}x{cluster[1]}x1_{kind}"
            + rules.launch_suffix(raster, max_swizzle))
    return KernelConfig(template=TEMPLATE, name=name, arch=Arch.SM90, precision=policy, element=element,
                        opclass="tensorop", math_op="multiply_add", instruction=(64, tile[1], 16), tile=tile,
                        cluster=(cluster[0], cluster[1], 1), stages=0, kernel_schedule=schedule,
                        epilogue_schedule="", tile_scheduler="persistent", alignment=(8, 8, 1),
                        layout_a="row", layout_b="col", epilogue=EPILOGUE, activation="silu",
                        raster=raster, max_swizzle=max_swizzle)


def space(M: int, F: int, K: int, policy: Precision, arch: Arch, budget: int | None = None) -> list[KernelConfig]:
    """Configs for silu(x[M, K] @ Wg^T) * (x @ Wu^T) with F outputs per row, most promising first (the tiers of
    the module's docstring)."""
    check(M, F, K, policy, arch)
    sms = rank.SM_COUNT[Arch(arch)]

    def tiles(point) -> int:
        tile = point[1]
        return -(-M // tile[0]) * -(-2 * F // tile[1])

    def score(point) -> float:
        tile, prior = point[1], point[3]
        used = M / (-(-M // tile[0]) * tile[0])  # rows of the last M tile past the problem are wasted (M = 1: decode)
        return rank.wave_fill(tiles(point), sms) * used * prior

    def ranked(points) -> list:
        # no cluster longer than the grid (at decode size, M = 1, one M tile: a 2x1 cluster would hold twice the
        # SMs for the same output), as the GEMM space
        fitting = [p for p in points if accumulators(p[0], p[1]) <= rules.MAX_ACCUMULATORS
                   and rules.cluster_fits(p[1], p[2], M, 2 * F)]
        return sorted(fitting, key=score, reverse=True)  # stable: equal scores keep the table's order

    def launches(point) -> list[KernelConfig]:
        if not rules.several_waves(tiles(point), arch):
            return []
        return [config(policy, *point[:3], raster=r, max_swizzle=w) for r, w in rules.RASTER_CHOICES]

    first = ranked(_POINTS)
    configs = [config(policy, *p[:3]) for p in first]
    configs += [c for p in first[:1] for c in launches(p)]
    configs += [config(policy, *p[:3]) for p in ranked(_MORE_POINTS)]
    configs += [c for p in first[1:RASTER_POINTS] for c in launches(p)]
    return configs if budget is None else configs[:max(budget, 0)]
