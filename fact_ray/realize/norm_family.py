"""The norm family: our row LayerNorm / RMSNorm kernel (realize/norm.py), tried against the model's own op. The
candidates are the row kernel's launch shapes that hold the problem's row in registers (threads per row, rows per
block, vectors per thread), then the general kernel, which runs any row; one library each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from fact_ray.errors import CannotImplement
from fact_ray.realize.fused import FusedFamily, operands_of, policy_dtype, static_int
from fact_ray.types import Arch, Library, Match, NormConfig, Precision, Source


@dataclass(frozen=True)
class NormProblem:
    """LayerNorm or RMSNorm over the last `cols` elements of each of `rows` rows."""

    rows: int
    cols: int
    kind: str  # layernorm | rmsnorm
    dtype: str
    eps: float
    has_weight: bool
    has_bias: bool


class NormFamily(FusedFamily):
    name = "norm"
    serves = ("layernorm", "rmsnorm")
    templates = ("norm",)
    problem_type = NormProblem
    schema = "(Tensor x, Tensor? weight=None, Tensor? bias=None) -> Tensor"

    def stem(self, problem: NormProblem) -> str:
        return problem.kind

    def problem(self, match: Match, policy: Precision) -> NormProblem:
        dtype = policy_dtype(match, policy)
        operands = operands_of(match)
        if not operands.get("x"):
            raise CannotImplement(f"{match.rule}: the match names no x operand")
        return NormProblem(rows=static_int(match, "rows"), cols=static_int(match, "cols"), kind=match.family,
                           dtype=dtype, eps=float(match.param("eps", 1e-5)), has_weight=bool(operands.get("weight")),
                           has_bias=bool(operands.get("bias")))

    def candidates(self, problem: NormProblem, policy: Precision, arch: Arch, budget: int,
                   hinted: Sequence[str] = ()) -> list[NormConfig]:
        from fact_ray.realize.norm import norm_candidates

        configs = norm_candidates(problem.cols, problem.dtype, arch, budget=64)  # all of them: a hint may be last
        named = {c.name: c for c in configs}
        lead = [named[h] for h in hinted if h in named]
        return (lead + [c for c in configs if c not in lead])[:max(budget, 0)]

    def sources(self, configs: Sequence[NormConfig], arch: Arch) -> list[Source]:
        from fact_ray.realize.norm import DTYPE_OF_ELEMENT, emit_norm

        return [emit_norm(DTYPE_OF_ELEMENT[c.element], arch, c) for c in configs]

    def operands(self, problem: NormProblem) -> tuple:
        return ("x", "weight" if problem.has_weight else None, "bias" if problem.has_bias else None)

    def kernel_fn(self, problem: NormProblem, library: Library, poison: bool = False) -> Callable:
        import torch

        from fact_ray.realize.norm import NormKernel

        n = NormKernel(library)

        def norm(x, weight=None, bias=None):
            out = torch.full(tuple(x.shape), math.nan, dtype=x.dtype, device=x.device) if poison else None
            if problem.kind == "layernorm":
                return n.layer_norm(x, weight, bias, eps=problem.eps, out=out)
            return n.rms_norm(x, weight, eps=problem.eps, out=out)

        return norm

    def torch_fn(self, problem: NormProblem) -> Callable:
        import torch
        import torch.nn.functional as F

        if problem.kind == "layernorm":
            return lambda x, weight=None, bias=None: F.layer_norm(x, (problem.cols,), weight, bias, problem.eps)

        def rms(x, weight=None, bias=None):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + problem.eps)
            return y * weight if weight is not None else y

        return rms

    def make_inputs(self, problem: NormProblem, device, seed: int) -> tuple:
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        dt = getattr(torch, problem.dtype)
        x = torch.randn(problem.rows, problem.cols, generator=gen, device=device, dtype=dt)
        w = (1 + 0.1 * torch.randn(problem.cols, generator=gen, device=device, dtype=dt)) if problem.has_weight \
            else None
        b = 0.1 * torch.randn(problem.cols, generator=gen, device=device, dtype=dt) if problem.has_bias else None
        return x, w, b

    def native_call(self, problem: NormProblem, kid: str) -> tuple[str, tuple]:
        return "norm", (float(problem.eps), problem.kind)

    def op_functions(self, problem: NormProblem, run: Callable) -> tuple[Callable, Callable]:
        import torch

        def real(x, weight=None, bias=None):
            return run(x, weight, bias)

        def fake(x, weight=None, bias=None):
            return torch.empty_like(x, memory_format=torch.contiguous_format)

        return real, fake
