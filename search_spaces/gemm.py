"""The GEMM-family search space: problem x arch x policy -> ordered KernelConfigs.

Dimensions: CTA tile, warp layout and stages (2.x), cluster (up to 4 CTAs along a mode, 2x2) and kernel/epilogue
schedule (3.x: ping-pong, cooperative, non-persistent; TMA or no-smem epilogue), tile scheduler (persistent,
stream-K) with its decomposition (heuristic, forced stream-K, split-K) and its raster order and swizzle (3.x),
2.x threadblock swizzle (identity 8, 4, 2, 1, stream-K), K split, math op. Everything but the K split changes the
emitted C++; the split is a run-time argument, so configs differing only by it share one compiled instance (emit
dedups them), and 3.x launch choices (raster, swizzle, decomposition) share one compiled kernel per TU. 3.x tiles whose accumulators would spill are pruned (rules.registers_fit).
"""

from __future__ import annotations

from typing import Any

from fact_ray.errors import CannotImplement
from fact_ray.types import Arch, GemmProblem, KernelConfig, Precision

from fact_ray.search_spaces import catalog, rank, rules, tf32x3

EPILOGUES = ("none", "bias", "bias_act", "bias_residual", "act", "residual")
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
ACT_EPILOGUES = ("bias_act", "act")  # the epilogues that apply an activation (and need one)


def check_problem(problem: GemmProblem, policy: Precision) -> None:
    """Raise CannotImplement (one line) for a problem no GEMM template here can express."""
    if min(problem.M, problem.N, problem.K, problem.L) < 1:
        raise CannotImplement(f"GEMM extents must be positive, got M={problem.M} N={problem.N} K={problem.K} "
                              f"L={problem.L}")
    want = catalog.TORCH_DTYPE[rules.POLICY_ELEMENT[policy]]
    if problem.dtype != want:
        raise CannotImplement(f"policy {policy.value} runs {want} operands, the problem holds {problem.dtype}")
    if problem.layout_a not in ("row", "col") or problem.layout_b not in ("row", "col"):
        raise CannotImplement(f"unknown operand layouts a={problem.layout_a!r} b={problem.layout_b!r}")
    if problem.epilogue not in EPILOGUES:
        raise CannotImplement(f"no GEMM epilogue {problem.epilogue!r} (have {', '.join(EPILOGUES)})")
    if problem.activation not in ACTIVATIONS:
        raise CannotImplement(f"no epilogue activation {problem.activation!r} (have {', '.join(ACTIVATIONS)})")
    if (problem.activation != "none") != (problem.epilogue in ACT_EPILOGUES):
        raise CannotImplement(f"activation {problem.activation!r} does not go with epilogue {problem.epilogue!r}")


def space(problem: GemmProblem, arch: Arch, policy: Precision, budget: int | None = None,
          ranker: Any = None) -> list[KernelConfig]:
    """Configs that can realize `problem` on `arch` under `policy`, most promising first.

    `ranker` (search_spaces.rankers: a learned cost model, NVIDIA's heuristics) scores the CUTLASS configs in
    place of the analytic prior where it knows the problem; the tf32x3 family keeps its measured place.
    An empty list means no CUTLASS kernel here fits (e.g. an odd K in bf16): the PyTorch op stays.
    """
    arch, policy = Arch(arch), Precision(policy)
    check_problem(problem, policy)
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    ops = catalog.ops_2x() + (catalog.ops_3x() if arch is Arch.SM90 else ())
    fitting = rules.widest_alignment_only([op for op in ops if rules.usable(op, problem, arch, policy)])
    configs = [cfg for op in fitting for cfg in _variants(op, problem, arch, policy)]
    scores = ranker.scores(problem, configs, arch) if ranker is not None and configs else None
    ordered = rank.order(configs, problem, arch, scores)
    if arch is Arch.SM90 and policy is Precision.FP32:
        ordered = _with_tf32x3(problem, arch, ordered, budget)
    return ordered if budget is None else ordered[:budget]


def _with_tf32x3(problem: GemmProblem, arch: Arch, ordered: list[KernelConfig],
                 budget: int | None) -> list[KernelConfig]:
    """Hopper, fp32 policy: the tf32x3 family (2.1-2.3x over cuBLAS fp32 end to end in round 1 of the fp32
    research) before the 2.x 3xTF32 kernels (1.3-1.5x; the catalog holds none of their 64x64 warp tiles, which
    spill on sm_90a and ran 0.64-0.70x), unless its model predicts that the split pass eats the gain
    (tf32x3.leads: e.g. 256x256x524288, where 2.x split-K wins); there it goes after them."""
    family = tf32x3.tf32x3_configs(problem, arch, budget)
    return family + ordered if tf32x3.leads(problem, arch) else ordered + family


def _variants(op: catalog.BaseOp, problem: GemmProblem, arch: Arch, policy: Precision) -> list[KernelConfig]:
    if op.template == "sm80_gemm":
        out = [_config(op, problem, arch, policy, swizzle="Identity8", split_k=1)]
        # A narrower raster for 3xTF32 (Hopper's fp32-class path) where the grid is several waves: which CTAs
        # share L2-resident A rows and B columns changes with it.
        if op.opclass == "tensorop" and rank.output_tiles(problem, op.tile) * problem.L >= rank.SM_COUNT[arch]:
            out += [_config(op, problem, arch, policy, swizzle=f"Identity{w}", split_k=1)
                    for w in rules.SM80_SWIZZLES if w != 8]
        out += [_config(op, problem, arch, policy, swizzle="Identity8", split_k=s)
                for s in rank.split_choices(problem, op.tile, arch)]
        # 2.x stream-K (ThreadblockSwizzleStreamK selects GemmUniversalStreamk): tensor ops, unbatched, and not
        # with the broadcast epilogue, which has no stream-K kernel in device::GemmUniversalWithBroadcast.
        if op.opclass == "tensorop" and problem.L == 1 and problem.epilogue != "bias_residual":
            out.append(_config(op, problem, arch, policy, swizzle="StreamK", split_k=1))
        return out
    out = [_config(op, problem, arch, policy, swizzle="", split_k=1)]
    if op.tile_scheduler == "stream_k":  # 3.x K splits go through the stream-K scheduler's SplitK mode
        out += [_config(op, problem, arch, policy, swizzle="", split_k=s)
                for s in rank.split_choices(problem, op.tile, arch)]
        # Forced stream-K units where the data-parallel grid leaves SMs idle: the scheduler's heuristic keeps
        # data-parallel when the last wave is fuller than its threshold, which is not always the faster choice.
        if rules.stream_k_helps(op, problem, arch):
            out.append(_config(op, problem, arch, policy, swizzle="", split_k=1, decomposition="stream_k"))
    if rules.rasters(op, problem, arch):
        # Raster order and swizzle of a persistent grid of several waves: which CTAs run together, so which A
        # rows and B columns stay in L2. The kernel is the same; emit compiles it once per TU for all of them.
        out += [_config(op, problem, arch, policy, swizzle="", split_k=1, raster=r, max_swizzle=w)
                for r, w in rules.RASTER_CHOICES]
    return out


def _config(op: catalog.BaseOp, problem: GemmProblem, arch: Arch, policy: Precision, *, swizzle: str,
            split_k: int, raster: str = "", max_swizzle: int = 0, decomposition: str = "") -> KernelConfig:
    suffix = f"_{problem.epilogue}"
    if problem.activation != "none":
        suffix += f"_{problem.activation}"
    if swizzle == "StreamK":
        suffix += "_streamk"
    elif swizzle.startswith("Identity") and swizzle != "Identity8":
        suffix += f"_swizzle{swizzle.removeprefix('Identity')}"
    if split_k > 1:
        suffix += f"_splitk{split_k}"
    suffix += rules.launch_suffix(raster, max_swizzle, decomposition)
    return KernelConfig(
        template=op.template, name=op.name + suffix, arch=arch, precision=policy, element=op.element,
        opclass=op.opclass, math_op=op.math_op, instruction=op.instruction, tile=op.tile, warps=op.warps,
        cluster=op.cluster, stages=op.stages, kernel_schedule=op.kernel_schedule,
        epilogue_schedule=op.epilogue_schedule, tile_scheduler=op.tile_scheduler, swizzle=swizzle,
        split_k=split_k, alignment=op.alignment, layout_a=problem.layout_a, layout_b=problem.layout_b,
        epilogue=problem.epilogue, activation=problem.activation, raster=raster, max_swizzle=max_swizzle,
        decomposition=decomposition,
    )
