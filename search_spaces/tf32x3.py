"""Hopper's fp32-class tensor-core GEMM ("tf32x3", template `sm90_tf32x3`): its configs, best first.

The kernel (fact_ray/realize/templates/sm90_tf32x3.cu.in) splits A and B on every call into TF32-exact hi/lo
parts concatenated along K ([Ahi|Ahi|Alo] x [Bhi;Blo;Bhi]) and runs one TF32 WGMMA GEMM over 3K with the FP8-style
two-level accumulation ("promotion": the tensor cores sum a group of G k-tiles, fp32 FADDs sum the groups), which
keeps the error at ~6e-7 where a plain TF32 chain over 3K errs 1e-5..4e-3. Only for sm90 and the fp32 policy.

Evidence: fp32 research round 1 on an H200 (benchmarks/fp32_research/NOTES.md and round1.log). GEMM-only speedup
over cuBLAS fp32 at square 4096^3 / bmm 128x512x2048x1024 / qkv 65536x2304x768 / proj 65536x768x3072, all
cooperative kernels with tile K 32; end to end, splits included, the best reached 2.28x / 1.40x / 2.27x / 2.08x.
Ping-pong (1.0-1.5x) and 128x256 tiles (spills) were slower and are left out; 256x256x524288 (4 output tiles)
reached only 0.97x gemm-only with stream-K, and the split pass alone costs 2/3 of cuBLAS there, so a problem whose
predicted end-to-end speedup is low does not put this family first (`leads`).

The promotion is encoded in KernelConfig.kernel_schedule as "TF32x3PromotedG<G>[Stagger]" (G k-tiles per group;
Stagger: the two consumer warpgroups promote half a group apart); the kernel schedule itself is always the
cooperative TMA warp-specialized one, the epilogue schedule its TMA epilogue.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from fact_ray.types import Arch, GemmProblem, KernelConfig, Precision

from fact_ray.search_spaces import rank

TEMPLATE = "sm90_tf32x3"
EPILOGUE_SCHEDULE = "TmaWarpSpecializedCooperative"
MATH_OP = "multiply_add_fast_f32"  # cutlass_library's name for 3xTF32 emulation of fp32
# A and B are read by the split pass, any alignment; D (and a residual C) go through the TMA epilogue: 16 bytes.
ALIGNMENT = (1, 1, 4)
MAX_K3 = 2**31 - 1  # the concatenated K is a 32-bit CUTLASS extent

_SCHEDULE = re.compile(r"^TF32x3PromotedG([1-9][0-9]*)(Stagger)?$")


def schedule_name(group: int, stagger: bool) -> str:
    """kernel_schedule for a promotion group of `group` k-tiles, staggered or not."""
    if group < 1:
        raise ValueError(f"promotion group must be >= 1, got {group}")
    return f"TF32x3PromotedG{group}" + ("Stagger" if stagger else "")


def promotion(kernel_schedule: str) -> tuple[int, bool]:
    """(group, stagger) from a tf32x3 kernel_schedule; ValueError for anything else."""
    m = _SCHEDULE.match(kernel_schedule)
    if m is None:
        raise ValueError(f"not a tf32x3 kernel schedule: {kernel_schedule!r} (want TF32x3PromotedG<n>[Stagger])")
    return int(m.group(1)), m.group(2) is not None


@dataclass(frozen=True)
class Variant:
    """One kernel shape of the family, with what round 1 measured for it (GEMM-only speedup, rel. error)."""

    tile: tuple[int, int, int]
    cluster: tuple[int, int, int]
    group: int
    stagger: bool
    scheduler: str  # "persistent" | "stream_k"
    evidence: str


# Round-1 order, best first on the four shapes with plenty of tiles (square, bmm, qkv, proj).
VARIANTS = (
    Variant((128, 128, 32), (2, 1, 1), 4, True, "persistent", "2.47 2.45 2.52 2.69, 6e-7: best end to end"),
    Variant((128, 192, 32), (1, 1, 1), 4, True, "persistent", "2.08 2.34 2.52 2.80, 6e-7"),
    Variant((128, 128, 32), (1, 1, 1), 2, False, "persistent", "2.09 2.39 2.14 2.56, 4e-7"),
    Variant((128, 128, 32), (1, 1, 1), 4, True, "stream_k", "1.89 2.49 2.07 2.36; 256x256x524288 0.97"),
    Variant((128, 128, 32), (1, 1, 1), 8, True, "persistent", "2.01 2.63 2.12 2.80, 1.3e-6"),
    Variant((128, 128, 32), (1, 1, 1), 4, False, "persistent", "1.92 2.46 2.13 2.74, 7e-7"),
    # Not measured: the 2x1 cluster (TMA multicast of B) lifted 128x128 by 5-20% over 1x1.
    Variant((128, 192, 32), (2, 1, 1), 4, True, "persistent", "unmeasured"),
    Variant((128, 128, 32), (1, 1, 1), 1, False, "persistent", "1.89 1.95 2.02 2.10, 2-5e-7: most accurate"),
    Variant((128, 128, 64), (1, 1, 1), 1, False, "persistent", "1.87 1.82 1.91 2.04, 3-4e-7"),
)

# A tile whose useful share of the padded output (cluster rounding included) is below this goes last.
MIN_TILE_FIT = 0.8

# The end-to-end model behind `leads` (H200 ceilings of measuring.md; ratios, not predictions of time):
FP32_FLOPS = 51e12  # cuBLAS fp32 SIMT
KCAT_FLOPS = 380e12  # the K-concatenated TF32 GEMM (round 1: 2.5-2.8x fp32 on 3x the FLOPs)
SPLIT_BYTES_PER_ELEMENT = 16  # read 4, write 3 x 4
SPLIT_BW = 3.9e12  # K-contiguous split (round 1: 3.86-3.90 TB/s)
TRANSPOSE_BW = 2.7e12  # split that transposes (B stored [K, N]; round 1: 2.72 TB/s)
STREAM_K_EFFICIENCY = 0.45  # few output tiles: 256x256x524288 ran 0.97x fp32 where the FLOPs allow 2.2x
LAUNCH_S = 4e-6  # each split is one more launch
LEAD_MIN_SPEEDUP = 1.2  # below this the 2.x 3xTF32 kernels (1.3-1.5x in round 1) go first


def padded_k(problem: GemmProblem) -> int:
    """K of each split part: K rounded up to 4 (zero-padded), so every TMA row stays 16-byte aligned."""
    return -(-problem.K // 4) * 4


def fits(problem: GemmProblem, arch: Arch) -> bool:
    """Whether the template can run the problem at all: sm90, float32, D rows 16-byte aligned, 32-bit K3."""
    return (Arch(arch) is Arch.SM90 and problem.dtype == "float32" and problem.N % ALIGNMENT[2] == 0
            and 3 * padded_k(problem) <= MAX_K3)


def predicted_speedup(problem: GemmProblem, arch: Arch = Arch.SM90) -> float:
    """End-to-end speedup over cuBLAS fp32 that the round-1 model predicts (the split pass on every call).

    Within ~20% of round 1: square 2.1 (measured 2.28), qkv 2.2 (2.27), proj 1.8 (2.08), bmm 1.3 (1.40),
    256x256x524288 0.6 (0.48). It compares against cuBLAS at its peak, so it undersells problems of less than one
    wave of output tiles (e.g. 1024^3: 0.75), where the family then follows the 2.x kernels.
    """
    p = problem
    sms = rank.SM_COUNT[Arch(arch)]
    kp = padded_k(p)
    t_fp32 = 2 * p.L * p.M * p.N * p.K / FP32_FLOPS
    units = rank.output_tiles(p, (128, 128, 32)) * p.L
    efficiency = rank.wave_fill(units, sms) if units >= sms else STREAM_K_EFFICIENCY
    t_gemm = 2 * p.L * p.M * p.N * 3 * kp / (KCAT_FLOPS * efficiency)
    l_a = p.L  # A is always batched (B may be broadcast and is then split once)
    l_b = 1 if p.broadcast_b else p.L
    bw_a = SPLIT_BW if p.layout_a == "row" else TRANSPOSE_BW
    bw_b = SPLIT_BW if p.layout_b == "col" else TRANSPOSE_BW
    t_split = SPLIT_BYTES_PER_ELEMENT * (l_a * p.M * kp / bw_a + l_b * p.N * kp / bw_b) + 2 * LAUNCH_S
    return t_fp32 / (t_gemm + t_split)


def leads(problem: GemmProblem, arch: Arch) -> bool:
    """Whether the family goes before the 2.x 3xTF32 kernels in the fp32 space of `arch`."""
    return fits(problem, arch) and predicted_speedup(problem, arch) >= LEAD_MIN_SPEEDUP


def tile_fit(problem: GemmProblem, tile: tuple[int, int, int], cluster: tuple[int, int, int]) -> float:
    """Useful share of the output the grid covers; clusters launch whole, so the grid rounds up to them."""
    tm, tn, _ = tile
    tiles_m, tiles_n = math.ceil(problem.M / tm), math.ceil(problem.N / tn)
    grid_m = math.ceil(tiles_m / cluster[0]) * cluster[0]
    grid_n = math.ceil(tiles_n / cluster[1]) * cluster[1]
    return problem.M * problem.N / (grid_m * tm * grid_n * tn)


def tf32x3_configs(problem: GemmProblem, arch: Arch, budget: int | None = None) -> list[KernelConfig]:
    """The family's configs for `problem` on `arch` under the fp32 policy, best first; [] where it cannot run.

    Order: round 1's (VARIANTS); tiles that waste over a fifth of the output go last; where the output has
    fewer tiles than the GPU has SMs, the stream-K variant comes first, followed by its K splits.
    """
    arch = Arch(arch)
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not fits(problem, arch):
        return []
    few_tiles = rank.output_tiles(problem, (128, 128, 32)) * problem.L < rank.SM_COUNT[arch]

    def key(iv: tuple[int, Variant]) -> tuple:
        i, v = iv
        first = few_tiles and v.scheduler == "stream_k"
        return (not first, tile_fit(problem, v.tile, v.cluster) < MIN_TILE_FIT, i)

    out: list[KernelConfig] = []
    for _, v in sorted(enumerate(VARIANTS), key=key):
        out.append(_config(v, problem, arch, split_k=1))
        if v.scheduler == "stream_k" and few_tiles:
            concatenated = dataclasses.replace(problem, K=3 * padded_k(problem))
            out += [_config(v, problem, arch, split_k=s) for s in rank.split_choices(concatenated, v.tile, arch)]
    return out if budget is None else out[:budget]


def _config(v: Variant, problem: GemmProblem, arch: Arch, split_k: int) -> KernelConfig:
    tm, tn, tk = v.tile
    name = (f"tf32x3_sm90_{tm}x{tn}x{tk}_{v.cluster[0]}x{v.cluster[1]}x1_g{v.group}{'s' if v.stagger else ''}_"
            f"{'streamk' if v.scheduler == 'stream_k' else 'persistent'}_a{problem.layout_a}_b{problem.layout_b}"
            f"_{problem.epilogue}")
    if problem.activation != "none":
        name += f"_{problem.activation}"
    if split_k > 1:
        name += f"_splitk{split_k}"
    return KernelConfig(
        template=TEMPLATE, name=name, arch=arch, precision=Precision.FP32, element="float", opclass="tensorop",
        math_op=MATH_OP, instruction=(0, 0, 0), tile=v.tile, cluster=v.cluster, stages=0,
        kernel_schedule=schedule_name(v.group, v.stagger), epilogue_schedule=EPILOGUE_SCHEDULE,
        tile_scheduler=v.scheduler, swizzle="", split_k=split_k, alignment=ALIGNMENT,
        layout_a=problem.layout_a, layout_b=problem.layout_b, epilogue=problem.epilogue,
        activation=problem.activation,
    )
