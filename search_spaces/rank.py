"""Orders a space so that its first `budget` configs are the most promising, and varied.

A deliberately simple analytic prior, not a cost model: how much of each tile does useful work (tile fit), how
full the last wave of CTAs is (wave quantization, with clusters rounding the grid up), whether a K split or
stream-K fills an otherwise idle GPU, and a mild preference for tiles with more reuse. Measurement decides; the
order only decides what gets measured first. Families (schedule, math, split) are interleaved with a decaying
bonus so a budget of 16 never spends itself on 16 tile variants of one schedule.
"""

from __future__ import annotations

import math
from collections import defaultdict

from fact_ray.types import Arch, GemmProblem, KernelConfig

SM_COUNT = {Arch.SM80: 108, Arch.SM90: 132}  # A100 and H100/H200
SPLITS = (2, 4, 8, 16, 32, 64)
MIN_K_TILES_PER_SPLIT = 4  # below this a split's pipeline never fills
FAMILY_DECAY = 0.6  # each further pick from a family counts this much less


def split_choices(problem: GemmProblem, tile: tuple[int, int, int], arch: Arch) -> tuple[int, ...]:
    """K splits worth trying: only when the output tiles leave SMs idle and K is long enough to share out.

    E.g. 256x256x524288 with a 128x128 tile is 4 output tiles for 108-132 SMs: splits 8..64.
    """
    if problem.L != 1:
        return ()
    sms = SM_COUNT[arch]
    tiles = math.ceil(problem.M / tile[0]) * math.ceil(problem.N / tile[1])
    k_tiles = math.ceil(problem.K / tile[2])
    if tiles >= sms:
        return ()
    return tuple(s for s in SPLITS
                 if sms // 4 <= tiles * s <= 4 * sms and k_tiles // s >= MIN_K_TILES_PER_SPLIT)


def _prior(cfg: KernelConfig) -> float:
    p = 1.0
    if cfg.arch is Arch.SM90 and cfg.template == "sm80_gemm" and cfg.math_op != "multiply_add_fast_f32" \
            and cfg.opclass != "simt":
        p *= 0.6  # mma.sync on Hopper: kept for coverage, WGMMA first
    if cfg.opclass == "simt":
        p *= 0.9
    if cfg.kernel_schedule.startswith("CpAsync"):
        p *= 0.8
    return p


def score(cfg: KernelConfig, problem: GemmProblem, arch: Arch) -> float:
    tm, tn, tk = cfg.tile
    cm, cn, _ = cfg.cluster
    sms = SM_COUNT[arch]
    tiles_m, tiles_n = math.ceil(problem.M / tm), math.ceil(problem.N / tn)
    k_tiles = math.ceil(problem.K / tk)
    fit = (problem.M * problem.N) / (tiles_m * tm * tiles_n * tn)
    fit_k = problem.K / (k_tiles * tk)
    # Clusters launch whole: the grid rounds up to a multiple of the cluster shape.
    units = math.ceil(tiles_m / cm) * cm * math.ceil(tiles_n / cn) * cn * problem.L * cfg.split_k
    waves = units / sms
    util = waves / math.ceil(waves)
    splits = cfg.split_k
    stream_k = cfg.tile_scheduler == "stream_k" or cfg.swizzle == "StreamK"
    if stream_k and cfg.split_k == 1 and k_tiles >= 2 * MIN_K_TILES_PER_SPLIT:
        # Stream-K shares the MAC loop out over every SM; it pays a fixup per shared tile.
        util = max(util, 0.85)
        if units < sms:
            splits = min(math.ceil(sms / units), k_tiles // MIN_K_TILES_PER_SPLIT)
    split_cost = 1.0 / (1.0 + 0.03 * (splits - 1))  # partial tiles written, read back and reduced in order
    reuse = (tm * tn) / (tm + tn)  # operand loads per MAC fall with this
    size = min(1.0, reuse / 96.0) ** 0.3
    s = _prior(cfg) * fit * math.sqrt(fit_k) * util * split_cost * size
    return float(f"{s:.12g}")  # stable across platforms' last-bit differences


def family(cfg: KernelConfig) -> tuple:
    return (cfg.template, cfg.opclass, cfg.math_op, cfg.kernel_schedule, cfg.epilogue_schedule, cfg.tile_scheduler,
            cfg.swizzle == "StreamK", cfg.split_k > 1)


def order(configs: list[KernelConfig], problem: GemmProblem, arch: Arch) -> list[KernelConfig]:
    """Best-first within each family; families interleaved by score with a decay per pick. Deterministic."""
    queues: dict[tuple, list[tuple[float, KernelConfig]]] = defaultdict(list)
    for cfg in configs:
        queues[family(cfg)].append((score(cfg, problem, arch), cfg))
    for q in queues.values():
        q.sort(key=lambda sc: (-sc[0], sc[1].name))
        q.reverse()  # pop() from the end gives the best
    picks: dict[tuple, int] = defaultdict(int)
    out: list[KernelConfig] = []
    names = sorted(queues, key=repr)  # equal adjusted scores go to the first family in this fixed order
    while names:
        fam = names[0]
        best = queues[fam][-1][0] * FAMILY_DECAY ** picks[fam]
        for f in names[1:]:
            v = queues[f][-1][0] * FAMILY_DECAY ** picks[f]
            if v > best:
                fam, best = f, v
        out.append(queues[fam].pop()[1])
        picks[fam] += 1
        if not queues[fam]:
            names.remove(fam)
    return out
