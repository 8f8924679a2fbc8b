"""The Hopper FMHA's tile space (realize/fmha.py, template fmha_sm90): which (queries, keys, head-dim) tiles to
try for a head dim, pruned to those that fit the head dim, shared memory and the consumer warp groups' registers.

Written as data plus three pruning rules, so that a reader sees why a tile is absent:

- the head-dim tile is the smallest of HEAD_DIM_TILES that holds the head dim (a 96-wide tile at D = 96, not
  example 88's 128: padding wastes a quarter of the tensor work there);
- the query tile is 64 rows per consumer warp group (one WGMMA M), so it fixes the warp groups; the kernel hands
  out the register file as example 88 does (registers per consumer thread below), and the score, probability and
  output fragments of one tile must fit in it with room for the softmax state and addresses;
- Q (all of its rows) and `stages` K/V buffers must fit the sm90 shared-memory budget; stages are as many as fit,
  at most example 88's 5, and at least 4 (K and V share one pipeline: 4 stages keep two K/V pairs in flight).

Nothing here imports torch or CUTLASS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

HEAD_DIM_TILES = (64, 96, 128)
Q_TILES = (128, 192)  # 2 or 3 consumer warp groups of 64 queries
K_TILES = (128, 64, 192)  # the first is example 88's own for head dim 128: it leads the candidates
DEFAULT = (128, 128)  # (queries, keys): the tile example 88 measures best at head dims 64-128
ROWS_PER_WARP_GROUP = 64
MAX_STAGES, MIN_STAGES = 5, 4
# sm90's opt-in shared memory per block (232448 bytes) less what the pipelines' barriers and alignment take.
SMEM_BUDGET = 232448 - 2048
# Registers per consumer thread, as example 88's kernel divides the file: 64K registers over (warp groups + 1) x
# 128 threads, the producer keeping 24 (kernel/fmha_kernel_tma_warpspecialized.hpp, MmaRegisterRequirement).
REGISTERS = {2: 240, 3: 160}
# Per thread, beyond the fragments: softmax row max/sum, predicates, addresses (an estimate, on the safe side).
REGISTER_OVERHEAD = 40


@dataclass(frozen=True)
class FmhaTile:
    q: int  # queries per block
    k: int  # keys per inner step
    head_dim: int  # head-dim tile
    warp_groups: int  # consumer warp groups (q / 64)
    stages: int  # K/V pipeline stages

    @property
    def block(self) -> tuple[int, int, int]:
        return self.q, self.k, self.head_dim


def head_dim_tile(head_dim: int) -> Optional[int]:
    """The smallest head-dim tile holding `head_dim`; None past the largest."""
    return next((t for t in HEAD_DIM_TILES if head_dim <= t), None)


def stages_for(q: int, k: int, head_dim: int, element_bytes: int = 2) -> int:
    """K/V stages that fit beside Q in shared memory (at most MAX_STAGES; below MIN_STAGES the tile is invalid)."""
    q_bytes = q * head_dim * element_bytes
    return max(0, min(MAX_STAGES, (SMEM_BUDGET - q_bytes) // (k * head_dim * element_bytes)))


def why_invalid(q: int, k: int, head_dim: int) -> str:
    """"" when the tile (q, k, head_dim) is one to try, else why not (one line)."""
    if head_dim not in HEAD_DIM_TILES:
        return f"head-dim tile {head_dim} is not one of {HEAD_DIM_TILES}"
    if q % ROWS_PER_WARP_GROUP or q // ROWS_PER_WARP_GROUP not in REGISTERS:
        return f"{q} queries is not 2 or 3 consumer warp groups of {ROWS_PER_WARP_GROUP}"
    if k % 16 or not 16 <= k <= 256:
        return f"{k} keys is not a WGMMA N (a multiple of 16 up to 256)"
    budget = REGISTERS[q // ROWS_PER_WARP_GROUP]
    # fp32 scores (k / 2 per thread of a warp group's 64 rows), their 16-bit probabilities (k / 4), fp32 output
    need = k // 2 + k // 4 + head_dim // 2 + REGISTER_OVERHEAD
    if need > budget:
        return f"{q}x{k}x{head_dim} needs about {need} registers per consumer thread, {budget} are there"
    if stages_for(q, k, head_dim) < MIN_STAGES:
        return f"{q}x{k}x{head_dim} fits {stages_for(q, k, head_dim)} K/V stages in shared memory, {MIN_STAGES} wanted"
    return ""


def tile(q: int, k: int, head_dim: int) -> FmhaTile:
    """The tile (q, k, head_dim) with its warp groups and stages; ValueError (one line) for an invalid one."""
    why = why_invalid(q, k, head_dim)
    if why:
        raise ValueError(f"FMHA tile {q}x{k}x{head_dim}: {why}")
    return FmhaTile(q, k, head_dim, q // ROWS_PER_WARP_GROUP, stages_for(q, k, head_dim))


def fmha_tiles(head_dim: int) -> tuple[FmhaTile, ...]:
    """Every valid tile for `head_dim`, in the order to try them: example 88's 128x128 first, then by query tile
    and K_TILES' order. Empty past the largest head-dim tile."""
    dt = head_dim_tile(head_dim)
    if dt is None:
        return ()
    order = [DEFAULT] + [(q, k) for q in Q_TILES for k in K_TILES if (q, k) != DEFAULT]
    return tuple(tile(q, k, dt) for q, k in order if not why_invalid(q, k, dt))
