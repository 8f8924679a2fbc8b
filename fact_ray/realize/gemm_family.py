"""The GEMM family: plain, bias, bias + activation, bias + residual and batched GEMMs, realized by three templates
(CUTLASS 2.x `sm80_gemm`, 3.x `sm90_gemm`, and our fp32-class `sm90_tf32x3`), whose configs come from the search
spaces of `fact_ray.search_spaces` and whose C++ comes from realize/emit.py.

Its trial runs one config against the PyTorch op (cuBLAS) with realize/gemm_trial.py's `tune_problem`; its op is
realize/kernel.py's `GemmKernel` behind a custom op taking (a, b, bias, residual).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from fact_ray.realize.problem import FAMILY_EPILOGUE
from fact_ray.types import Arch, GemmProblem, KernelConfig, Library, Match, Precision, Source, Trial

# The Match.family values it realizes: those realize/problem.py maps to an epilogue.
SERVES = tuple(FAMILY_EPILOGUE)
# Timed rounds of a screening trial (the full trial picks 10-100 from a pilot run): enough to rank candidates
# 10% apart, a fifth of a full trial's GPU time or less.
SCREEN_REPS = 10


class GemmFamily:
    name = "gemm"
    serves = SERVES
    templates = ("sm80_gemm", "sm90_gemm", "sm90_tf32x3")
    problem_type = GemmProblem

    def problem(self, match: Match, policy: Precision) -> GemmProblem:
        from fact_ray.realize.problem import problem_from_match

        return problem_from_match(match, policy)

    takes_ranker = True  # candidates() orders by a search_spaces.rankers ranker when given one

    def candidates(self, problem: GemmProblem, policy: Precision, arch: Arch, budget: int,
                   hinted: Sequence[str] = (), ranker: Any = None) -> list[KernelConfig]:
        from fact_ray.search_spaces import space

        if not hinted:
            return list(space(problem, arch, policy, budget, ranker))
        full = space(problem, arch, policy, ranker=ranker)
        first = [c for name in hinted for c in full if c.name == name]
        return (first + [c for c in full if c.name not in set(hinted)])[:budget]

    def sources(self, configs: Sequence[KernelConfig], arch: Arch) -> list[Source]:
        from fact_ray.realize.emit import emit

        return emit(configs, arch)

    def trial(self, problem: GemmProblem, config: KernelConfig, library: Library, policy: Precision,
              device: Any) -> tuple[Trial, Trial]:
        from fact_ray.realize.gemm_trial import tune_problem  # torch and CUDA load on the GPU worker only

        _, trials = tune_problem(problem, [config], [library], policy, device)
        return trials[0], next(t for t in trials[1:] if t.candidate_name == config.name)

    def screen(self, problem: GemmProblem, config: KernelConfig, library: Library, policy: Precision,
               device: Any) -> tuple[Trial, Trial]:
        """Successive halving's cheap trial: verified on one seed (a wrong kernel is still caught), timed in
        SCREEN_REPS interleaved rounds beside the PyTorch op. Survivors get the full `trial`."""
        from fact_ray.realize.gemm_trial import tune_problem

        _, trials = tune_problem(problem, [config], [library], policy, device, seeds=(0,), reps=SCREEN_REPS)
        return trials[0], next(t for t in trials[1:] if t.candidate_name == config.name)

    def operands(self, problem: GemmProblem) -> tuple[Optional[str], ...]:
        from fact_ray.realize.kernel import has_bias, has_residual

        return ("a", "b", "bias" if has_bias(problem) else None, "residual" if has_residual(problem) else None)

    def accepts(self, config: Any, problem: GemmProblem) -> str:
        if getattr(config, "template", None) not in self.templates:
            return f"kernel {config.name} ({config.template}) is not a GEMM"
        built_for = (config.epilogue, config.activation, config.layout_a, config.layout_b)
        p = problem
        if built_for != (p.epilogue, p.activation, p.layout_a, p.layout_b):
            return (f"kernel {config.name} computes epilogue {config.epilogue} ({config.activation}, "
                    f"{config.layout_a}/{config.layout_b}), the pattern needs {p.epilogue} ({p.activation}, "
                    f"{p.layout_a}/{p.layout_b})")
        return ""

    def register_op(self, problem: GemmProblem, config: KernelConfig, library: Library) -> tuple[str, Any]:
        from fact_ray.realize.kernel import GemmKernel, op_name, register_op

        op = register_op(GemmKernel(library, config, problem), problem)
        return op_name(config, problem, library.key), op

    def bind(self, problem: GemmProblem, config: KernelConfig, library: Library, symbol: str, native: bool,
             digest: Optional[str] = None) -> Any:
        from fact_ray.realize import dispatch

        return dispatch.bind_gemm(library, config, problem, symbol, native, digest)

    def output_shape(self, problem: GemmProblem, first_operand: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        from fact_ray.realize.kernel import output_shape

        return tuple(output_shape(problem, first_operand))
