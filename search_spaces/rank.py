"""Orders a space so that its first `budget` configs are the most promising, and varied.

A deliberately simple analytic prior, not a cost model: how much of each tile does useful work (tile fit), how
full the last wave of CTAs is (wave quantization, with clusters rounding the grid up), whether a K split or
stream-K fills an otherwise idle GPU and what its serialized fixups cost, whether a tile reuses its operands
enough to outrun L2 (cluster multicast counted), and priors for schedules that measurements on an H200 (November
2026, benchmarks/gemm.py) and CUTLASS's own profiler favour. Measurement decides; the order only decides what
gets measured first. The pick is greedy with three decays (family, output tile, compiled kernel), so a budget of
16 never spends itself on 16 tile variants of one schedule, nor on one kernel under several epilogue schedules.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from typing import Sequence

from fact_ray.types import Arch, GemmProblem, KernelConfig

from fact_ray.search_spaces import rules

SM_COUNT = rules.SM_COUNT  # A100 and H100/H200
SPLITS = (2, 4, 8, 16, 32, 64)
MIN_K_TILES_PER_SPLIT = 4  # below this a split's pipeline never fills
FAMILY_DECAY = 0.9  # each further pick from a family (template, kernel schedule, split) counts this much less,
TILE_DECAY = 0.92  # ... from one output tile and cluster of that family (other warps, stages or tile K),
SHAPE_DECAY = 0.5  # ... and from one instance shape (the same kernel under another epilogue, swizzle or split)

# One serialized split-K fixup (the partial tile written, then read back in K order by the next split) in K
# elements of the MAC loop it costs. Calibrated on the H200's 3xTF32 128x128 tile at K = 524288 (notes §9: 64
# splits took 1.18x of 32), scaled by how much faster each math runs per byte of fixup.
FIXUP_K = {"fp32": 32, "simt": 32, "tf32": 128, "16bit": 256}

# Operand reuse (MACs per element loaded by a CTA, cluster multicast counted) at which a tile stops waiting on
# L2: peak math rate times element size, relative to Hopper's bf16 WGMMA. tf32 WGMMA has half the rate on twice
# the bytes, so needs as much; 3xTF32 (three mma.sync per product) and SIMT need far less.
REUSE_NEEDED = {
    (Arch.SM90, "16bit"): 96, (Arch.SM90, "tf32"): 96, (Arch.SM90, "mma_sync"): 64,
    (Arch.SM90, "fp32"): 24, (Arch.SM90, "simt"): 16,
    (Arch.SM80, "16bit"): 48, (Arch.SM80, "tf32"): 48, (Arch.SM80, "mma_sync"): 48,
    (Arch.SM80, "fp32"): 16, (Arch.SM80, "simt"): 12,
}

# Schedule priors. Hopper: persistent cooperative kernels first (CUTLASS's Auto pick for tiles of 128+ rows),
# ping-pong close behind, the non-persistent kernel and cp.async kernels later. A TMA epilogue stores through
# shared memory in whole lines; NoSmem stores straight from registers. Stream-K pays a small scheduling cost
# where the data-parallel grid already fills the GPU (H200: 0.94-0.98x of its data-parallel twin on large GEMMs).
KERNEL_PRIOR = {
    "TmaWarpSpecializedCooperative": 1.0, "TmaWarpSpecializedPingpong": 0.95, "TmaWarpSpecialized": 0.7,
    "CpAsyncWarpSpecializedCooperative": 0.7, "CpAsyncWarpSpecializedPingpong": 0.7, "CpAsyncWarpSpecialized": 0.65,
}
NOSMEM_EPILOGUE_PRIOR = 0.97
STREAM_K_PRIOR = 0.95  # 3.x only: 2.x stream-K 3xTF32 ran 1.00-1.03x of its data-parallel twin on the H200
SIMT_PRIOR = 0.65  # H200: fp32 SIMT ran 0.98x of cuBLAS where 3xTF32 ran 1.34-1.42x
MMA_SYNC_ON_HOPPER_PRIOR = 0.6  # 16-bit and tf32 mma.sync on sm90: kept for coverage, WGMMA first
SWIZZLE_PRIOR = {"Identity8": 1.0, "Identity4": 0.995, "Identity2": 0.99, "Identity1": 0.985, "StreamK": 1.0, "": 1.0}
# 3.x launch choices beside the scheduler's defaults (raster order, swizzle, forced stream-K): unmeasured here, so
# they follow their default twin; measurements (the learned ranker) move them up where they win.
LAUNCH_PRIOR = 0.99
# Clusters of four CTAs: not yet measured on our H200 (the 2-CTA ones were), so they follow the 2-CTA clusters.
# A GPC holds 16-18 SMs, so at most 32 clusters of 4 (128 SMs of 132) run at once on an H100/H200
# (cudaOccupancyMaxActiveClusters); `score` counts the SMs a cluster size can occupy.
CLUSTER4_PRIOR = 0.95
CLUSTER_SMS = {(Arch.SM90, 4): 128, (Arch.SM90, 8): 128}


def output_tiles(problem: GemmProblem, tile: tuple[int, int, int]) -> int:
    """CTA output tiles of one batch entry."""
    return math.ceil(problem.M / tile[0]) * math.ceil(problem.N / tile[1])


def wave_fill(units: int, sms: int) -> float:
    """Busy share of the SMs over the waves `units` CTAs take (1.0: every wave full)."""
    waves = units / sms
    return waves / math.ceil(waves)


def split_choices(problem: GemmProblem, tile: tuple[int, int, int], arch: Arch) -> tuple[int, ...]:
    """K splits worth trying, best SM fill first: only when the output tiles leave SMs idle and K is long enough
    to share out. Ties go to fewer splits (fewer fixups).

    E.g. 256x256x524288 on 132 SMs: a 128x128 tile gives 4 output tiles, so 32 and 64 splits (128 and 256 CTAs,
    one and two full waves) come before 16; a 64x64 tile gives 16, so 8 and 16 splits come first.
    """
    if problem.L != 1:
        return ()
    sms = SM_COUNT[arch]
    tiles = output_tiles(problem, tile)
    k_tiles = math.ceil(problem.K / tile[2])
    if tiles >= sms:
        return ()
    ok = [s for s in SPLITS if sms // 4 <= tiles * s <= 4 * sms and k_tiles // s >= MIN_K_TILES_PER_SPLIT]
    return tuple(sorted(ok, key=lambda s: (-round(wave_fill(tiles * s, sms), 6), s)))


def math_class(cfg: KernelConfig) -> str:
    if cfg.element in ("bfloat16_t", "half_t"):
        return "16bit"
    if cfg.opclass == "simt":
        return "simt"
    return "fp32" if cfg.math_op == "multiply_add_fast_f32" else "tf32"


def _reuse_class(cfg: KernelConfig, arch: Arch) -> str:
    cls = math_class(cfg)
    if arch is Arch.SM90 and cfg.template == "sm80_gemm" and cls in ("16bit", "tf32"):
        return "mma_sync"
    return cls


def kernel_schedule(cfg: KernelConfig) -> str:
    """The kernel schedule the 3.x builder instantiates; the builder takes TMA for Auto when both operands'
    vectors are 16 bytes."""
    size = 4 if cfg.element in ("float", "tfloat32_t") else 2
    tma = min(cfg.alignment[0], cfg.alignment[1]) * size >= 16
    return rules.resolve_kernel_schedule(cfg.template, cfg.kernel_schedule, cfg.tile[0], tma)


def split_efficiency(cfg: KernelConfig, problem: GemmProblem, splits: int) -> float:
    """MAC-loop share of a split kernel's time: each split runs K/splits, the `splits` fixups of a tile run one
    after another, so the overhead grows as splits^2 / K."""
    if splits <= 1:
        return 1.0
    return 1.0 / (1.0 + splits * splits * FIXUP_K[math_class(cfg)] / problem.K)


def _prior(cfg: KernelConfig, arch: Arch) -> float:
    p = 1.0
    if cfg.template == "sm90_gemm":
        p *= KERNEL_PRIOR.get(kernel_schedule(cfg), 0.7)
        if cfg.epilogue_schedule not in ("TmaWarpSpecialized", "TmaWarpSpecializedCooperative"):
            p *= NOSMEM_EPILOGUE_PRIOR
    elif arch is Arch.SM90 and _reuse_class(cfg, arch) == "mma_sync":
        p *= MMA_SYNC_ON_HOPPER_PRIOR
    if cfg.opclass == "simt":
        p *= SIMT_PRIOR
    if cfg.raster or cfg.max_swizzle or cfg.decomposition:
        p *= LAUNCH_PRIOR
    if cfg.cluster[0] * cfg.cluster[1] >= 4:
        p *= CLUSTER4_PRIOR
    return p * SWIZZLE_PRIOR.get(cfg.swizzle, 1.0)


def score(cfg: KernelConfig, problem: GemmProblem, arch: Arch) -> float:
    tm, tn, tk = cfg.tile
    cm, cn, _ = cfg.cluster
    sms = CLUSTER_SMS.get((arch, cm * cn), SM_COUNT[arch])
    tiles_m, tiles_n = math.ceil(problem.M / tm), math.ceil(problem.N / tn)
    k_tiles = math.ceil(problem.K / tk)
    fit = (problem.M * problem.N) / (tiles_m * tm * tiles_n * tn)
    fit_k = problem.K / (k_tiles * tk)
    # Clusters launch whole: the grid rounds up to a multiple of the cluster shape, and the CTAs past the edge
    # occupy SMs without doing work.
    grid = math.ceil(tiles_m / cm) * cm * math.ceil(tiles_n / cn) * cn
    fit *= tiles_m * tiles_n / grid
    units = grid * problem.L * cfg.split_k
    util = wave_fill(units, sms)
    splits = cfg.split_k
    prior = _prior(cfg, arch)
    stream_k = cfg.tile_scheduler == "stream_k" or cfg.swizzle == "StreamK"
    if stream_k and cfg.split_k == 1:
        if (util < 0.85 or cfg.decomposition == "stream_k") and k_tiles >= 2 * MIN_K_TILES_PER_SPLIT:
            # Stream-K shares the MAC loop out over every SM; it pays a fixup per shared tile.
            util = 0.85
            if units < sms:
                splits = max(1, min(math.ceil(sms / units), k_tiles // MIN_K_TILES_PER_SPLIT))
        elif cfg.template == "sm90_gemm":
            prior *= STREAM_K_PRIOR
    # Operand reuse per CTA: cluster peers along N share A's tile by multicast, those along M share B's.
    reuse = (tm * tn) / (tm / cn + tn / cm)
    bandwidth = min(1.0, reuse / REUSE_NEEDED[(arch, _reuse_class(cfg, arch))]) ** 0.5
    on_chip = min(1.0, (tm * tn) / (tm + tn) / 64.0) ** 0.2  # small tiles pay more shared-memory traffic per MAC
    if cfg.template == "sm90_gemm":
        # A warpgroup issues m64nNk16 WGMMAs with N = the tile's N (up to 256): shared-memory bytes per MAC
        # fall with N, (64 + N) / (64 N); 256 is best.
        n = min(tn, 256)
        on_chip *= ((64 + 256) / (64 * 256) / ((64 + n) / (64 * n))) ** 0.5
    else:
        # mma.sync: each warp reloads its A and B fragments from shared memory; 32x64 and 64x32 warp tiles (the
        # largest that do not spill under 3xTF32) reuse them best, 32x32 reloads a third more per MAC.
        wm, wn = tm // cfg.warps[0], tn // cfg.warps[1]
        on_chip *= min(1.0, (wm * wn) / (wm + wn) / (32 * 64 / 96)) ** 0.5
    s = prior * fit * math.sqrt(fit_k) * util * split_efficiency(cfg, problem, splits) * bandwidth * on_chip
    return float(f"{s:.12g}")  # stable across platforms' last-bit differences


def family(cfg: KernelConfig) -> tuple:
    """Kernels of one kind: the diversity the greedy pick spreads over (CUTLASS generation, kernel schedule, K
    split or not). The math (3xTF32 or SIMT) is left out: within one policy their scores already say which is
    faster, and a family of its own would pull the slow one forward."""
    return (cfg.template, kernel_schedule(cfg), cfg.split_k > 1)


def tile_key(cfg: KernelConfig) -> tuple:
    """One output tile: configs equal here differ in cluster, warps, stages, tile K, schedulers or swizzles (so a
    small budget spans tile shapes before it spans the six cluster shapes of one tile)."""
    return family(cfg) + (cfg.opclass, cfg.math_op, cfg.tile[:2])


def shape(cfg: KernelConfig) -> tuple:
    """One compiled kernel, up to its epilogue schedule: configs equal here differ only in that or the split."""
    return tile_key(cfg) + (cfg.cluster, cfg.tile, cfg.warps, cfg.stages, cfg.tile_scheduler, cfg.swizzle)


# The greedy pick runs for this many configs; the rest follow by their decayed scores at that point. Budgets
# stop far earlier (256 at most), and past a few hundred picks every family has decayed so far that the greedy
# only reshuffles the tail while its lazy heap re-scores a whole family per pick (16 s for 2,700 configs).
ORDER_HEAD = 512


def order(configs: list[KernelConfig], problem: GemmProblem, arch: Arch,
          scores: Sequence[float] | None = None) -> list[KernelConfig]:
    """Greedy: each step takes the config with the best score after decays for the picks its family, its output
    tile and its compiled kernel already have. Deterministic (ties by name). Adjusted scores only fall as picks
    accumulate, so a lazily re-scored heap gives the same order as rescanning everything each step.

    `scores` (higher is better, one per config) replaces the analytic `score`: a learned or external model ranks,
    the decays still spread the picks.
    """
    if scores is None:
        base = [score(c, problem, arch) for c in configs]
    else:
        if len(scores) != len(configs):
            raise ValueError(f"{len(scores)} scores for {len(configs)} configs")
        base = [float(s) for s in scores]
    keys = [(family(c), tile_key(c), shape(c)) for c in configs]
    picks: dict[tuple, int] = defaultdict(int)

    def adjusted(i: int) -> float:
        fam, tile, shp = keys[i]
        return base[i] * FAMILY_DECAY ** picks[fam] * TILE_DECAY ** picks[tile] * SHAPE_DECAY ** picks[shp]

    heap = [(-adjusted(i), c.name, i) for i, c in enumerate(configs)]
    heapq.heapify(heap)
    out: list[int] = []
    while heap and len(out) < ORDER_HEAD:
        neg, name, i = heapq.heappop(heap)
        now = adjusted(i)
        if now < -neg:
            heapq.heappush(heap, (-now, name, i))
            continue
        out.append(i)
        for key in keys[i]:
            picks[key] += 1
    rest = sorted((-adjusted(i), name, i) for _, name, i in heap)
    return [configs[i] for i in out] + [configs[i] for _, _, i in rest]
