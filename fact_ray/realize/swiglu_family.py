"""The SwiGLU family: `silu(x @ Wg^T [+ bg]) * (x @ Wu^T [+ bu])` (the first half of a Llama MLP) as one sm90 GEMM
with a SiLU-times-up epilogue (realize/swiglu.py), so the [M, 2F] intermediate never goes to memory. Candidates
come from search_spaces/swiglu.py; each is tried against the model's own op (two GEMMs, then silu * up), which
stays whenever no kernel is verified and clearly faster.

Its op takes the match's operands as the graph holds them, `(a, b_gate, b_up, bias_gate, bias_up)`: the native
dispatcher's `fact_ray_native.swiglu` (which interleaves the weights once per weight tensor and version) or, off
the native path, a Python custom op over `SwiGluKernel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from fact_ray.errors import CannotImplement
from fact_ray.realize.fused import FusedFamily, operands_of, policy_dtype, static_int
from fact_ray.types import Arch, KernelConfig, Library, Match, Precision, Source


@dataclass(frozen=True)
class SwiGluProblem:
    """D[M, F] = silu(A[M, K] @ Wg[F, K]^T + bg) * (A @ Wu[F, K]^T + bu); M folds every leading dim of A."""

    M: int
    F: int
    K: int
    dtype: str
    has_bias: bool = False


def narrowed(library: Library, config: Any) -> Library:
    """`library` seen as holding `config` alone (its symbol first): a swiglu TU holds several configs, and the
    fused family's kernel_fn and op registration read the library's first one."""
    from fact_ray.realize.kernel import symbol_of

    source = replace(library.source, configs=(config,), symbols=(symbol_of(library, config),))
    return replace(library, source=source)


class SwiGluFamily(FusedFamily):
    name = "swiglu"
    serves = ("swiglu",)
    templates = ("sm90_swiglu",)
    problem_type = SwiGluProblem
    schema = ("(Tensor a, Tensor b_gate, Tensor b_up, Tensor? bias_gate=None, Tensor? bias_up=None) -> Tensor")

    def problem(self, match: Match, policy: Precision) -> SwiGluProblem:
        dtype = policy_dtype(match, policy)
        if str(match.param("layout_a", "row")) != "row" or str(match.param("layout_b", "col")) != "col":
            raise CannotImplement(f"{match.rule}: swiglu kernels take a row-major x and nn.Linear-layout weights "
                                  f"([F, K]), not a={match.param('layout_a')} b={match.param('layout_b')}")
        batches = static_int(match, "L") if match.param("L") is not None else 1
        if batches != 1:
            raise CannotImplement(f"{match.rule}: a batched swiglu (L={match.param('L')}) is not implemented")
        operands = operands_of(match)
        missing = [r for r in ("a", "b_gate", "b_up") if not operands.get(r)]
        if missing:
            raise CannotImplement(f"{match.rule}: the match names no {' or '.join(missing)} operand")
        has_bias = bool(match.param("has_bias", False))
        if has_bias and not (operands.get("bias_gate") and operands.get("bias_up")):
            raise CannotImplement(f"{match.rule}: the match names no gate and up biases")
        return SwiGluProblem(M=static_int(match, "M"), F=static_int(match, "N"), K=static_int(match, "K"),
                             dtype=dtype, has_bias=has_bias)

    def candidates(self, problem: SwiGluProblem, policy: Precision, arch: Arch, budget: int,
                   hinted: Sequence[str] = ()) -> list[KernelConfig]:
        from fact_ray.search_spaces import swiglu as space

        full = space.space(problem.M, problem.F, problem.K, policy, arch)
        first = [c for name in hinted for c in full if c.name == name]
        return (first + [c for c in full if c not in first])[:max(budget, 0)]

    def sources(self, configs: Sequence[KernelConfig], arch: Arch) -> list[Source]:
        from fact_ray.realize.swiglu import emit_swiglu

        return emit_swiglu(configs, arch)

    def accepts(self, config: Any, problem: SwiGluProblem) -> str:
        why = super().accepts(config, problem)
        if why:
            return why
        if config.element != {"bfloat16": "bfloat16_t", "float16": "half_t"}.get(problem.dtype):
            return f"kernel {config.name} computes {config.element}, the pattern {problem.dtype}"
        return ""

    def operands(self, problem: SwiGluProblem) -> tuple[Optional[str], ...]:
        bias = problem.has_bias
        return ("a", "b_gate", "b_up", "bias_gate" if bias else None, "bias_up" if bias else None)

    # ------------------------------------------------------------------ the kernel and the model's op

    def kernel_fn(self, problem: SwiGluProblem, library: Library, poison: bool = False) -> Callable:
        import torch

        from fact_ray.realize.swiglu import SwiGluKernel

        kernel = SwiGluKernel(library, library.source.configs[0])

        def swiglu(a, b_gate, b_up, bias_gate=None, bias_up=None):
            out = None
            if poison:
                out = torch.full(tuple(a.shape[:-1]) + (problem.F,), math.nan, dtype=a.dtype, device=a.device)
            return kernel(a, b_gate, b_up, bias_gate, bias_up, out=out)

        return swiglu

    def torch_fn(self, problem: SwiGluProblem) -> Callable:
        from fact_ray.realize.swiglu import reference

        return reference

    def make_inputs(self, problem: SwiGluProblem, device: Any, seed: int) -> tuple:
        import torch

        p = problem
        gen = torch.Generator(device=device).manual_seed(seed)
        dt = getattr(torch, p.dtype)

        def draw(*shape: int, scale: float = 1.0):
            return (scale * torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)).to(dt)

        # Linear-like scales: x ~ N(0, 1), weights ~ N(0, 1/K), so the projections are O(1) and SiLU is in its
        # curved range rather than its linear tail.
        x, wg, wu = draw(p.M, p.K), draw(p.F, p.K, scale=p.K ** -0.5), draw(p.F, p.K, scale=p.K ** -0.5)
        bg, bu = (draw(p.F, scale=0.1), draw(p.F, scale=0.1)) if p.has_bias else (None, None)
        return x, wg, wu, bg, bu

    def trial(self, problem: SwiGluProblem, config: Any, library: Library, policy: Precision | str, device: Any,
              seeds: Sequence[int] = (0, 1), reps: int = 50):
        if library.ok:
            library = narrowed(library, config)
        return super().trial(problem, config, library, policy, device, seeds, reps)

    # ------------------------------------------------------------------ ops

    def register_op(self, problem: SwiGluProblem, config: Any, library: Library) -> tuple[str, Any]:
        return super().register_op(problem, config, narrowed(library, config))

    def bind(self, problem: SwiGluProblem, config: Any, library: Library, symbol: str, native: bool,
             digest: Optional[str] = None) -> Any:
        from fact_ray.realize import dispatch

        if native:
            return dispatch.bind_swiglu(library, problem, symbol, digest)
        return dispatch.bind_fused(self, library, config, problem, False, digest)

    def op_functions(self, problem: SwiGluProblem, run: Callable) -> tuple[Callable, Callable]:
        def real(a, b_gate, b_up, bias_gate=None, bias_up=None):
            return run(a, b_gate, b_up, bias_gate, bias_up)

        def fake(a, b_gate, b_up, bias_gate=None, bias_up=None):
            return a.new_empty(tuple(a.shape[:-1]) + (problem.F,))

        return real, fake
