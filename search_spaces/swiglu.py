"""The SwiGLU search space: D[M, F] = silu(x @ Wg^T) * (x @ Wu^T) as one sm90 GEMM over the interleaved [2F, K]
weight with the SwiGLU epilogue (realize/swiglu.py) -> ordered KernelConfigs of template `sm90_swiglu`.

Dimensions: CTA tile, cluster and kernel schedule (cooperative or ping-pong, persistent). The epilogue takes no
shared memory and writes from registers, so there is no epilogue schedule to choose. Tiles hold at most 128 fp32
accumulators per consumer thread (rules.MAX_ACCUMULATORS: past that the H200 measured spills and 0.06x). Ordered
by how evenly the problem's output tiles fill the SMs times the share of the M tiles' rows the problem uses, then
by the prior of the point (wide N tiles first: the GEMM is 2F wide and its A rows are re-read once per N tile).
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


def config(policy: Precision, schedule: str, tile: tuple[int, int, int], cluster: tuple[int, int]) -> KernelConfig:
    policy = Precision(policy)
    element = ELEMENTS[policy]
    kind = "coop" if schedule == COOPERATIVE else "pingpong"
    name = (f"swiglu_sm90_{_SHORT[element]}_{tile[0]}x{tile[1]}x{tile[2]}_{cluster[0]}x{cluster[1]}x1_{kind}")
    return KernelConfig(template=TEMPLATE, name=name, arch=Arch.SM90, precision=policy, element=element,
                        opclass="tensorop", math_op="multiply_add", instruction=(64, tile[1], 16), tile=tile,
                        cluster=(cluster[0], cluster[1], 1), stages=0, kernel_schedule=schedule,
                        epilogue_schedule="", tile_scheduler="persistent", alignment=(8, 8, 1),
                        layout_a="row", layout_b="col", epilogue=EPILOGUE, activation="silu")


def space(M: int, F: int, K: int, policy: Precision, arch: Arch, budget: int | None = None) -> list[KernelConfig]:
    """Configs for silu(x[M, K] @ Wg^T) * (x @ Wu^T) with F outputs per row, most promising first."""
    check(M, F, K, policy, arch)
    points = [p for p in _POINTS if accumulators(p[0], p[1]) <= rules.MAX_ACCUMULATORS]
    sms = rank.SM_COUNT[Arch(arch)]

    def score(point) -> float:
        _, tile, _, prior = point
        m_tiles = -(-M // tile[0])
        used = M / (m_tiles * tile[0])  # rows of the last M tile past the problem are wasted (M = 1: decode)
        return rank.wave_fill(m_tiles * -(-2 * F // tile[1]), sms) * used * prior

    ordered = sorted(points, key=score, reverse=True)  # stable: equal scores keep the table's order
    configs = [config(policy, s, t, c) for s, t, c, _ in ordered]
    return configs if budget is None else configs[:max(budget, 0)]
