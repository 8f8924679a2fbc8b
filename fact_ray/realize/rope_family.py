"""The rope family: rotary position embedding (`x * cos + rot(x) * sin`, HF's `apply_rotary_pos_emb` per tensor in
the rotate_half form, or the interleaved form) by our kernel (realize/rope.py), tried against the model's own ops.

A match is one rotated tensor (q, or k): a match has one output. The kernel's ABI takes q and k in one launch
(`RopeKernel.apply_qk`), which composing two matches into one call would use; today each match is its own call.
The candidates are launch shapes (threads a block, units a thread), one library each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from fact_ray.errors import CannotImplement
from fact_ray.realize.fused import FusedFamily, operands_of, policy_dtype
from fact_ray.types import Arch, Library, Match, Precision, RopeConfig, Source


@dataclass(frozen=True)
class RopeProblem:
    """y = x * cos + rot(x) * sin over x of `x_shape` (strides `x_stride`: e.g. a [B, H, S, D] view of a
    [B, S, H * D] projection), cos and sin of their own shapes broadcast to x's."""

    x_shape: tuple[int, ...]
    x_stride: tuple[int, ...]
    cos_shape: tuple[int, ...]
    sin_shape: tuple[int, ...]
    form: str  # half | interleaved
    dtype: str

    def __post_init__(self) -> None:  # an artifact's JSON gives lists back
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(int(v) for v in value))


class RopeFamily(FusedFamily):
    name = "rope"
    serves = ("rope",)
    templates = ("rope",)
    problem_type = RopeProblem
    schema = "(Tensor x, Tensor cos, Tensor sin) -> Tensor"

    def problem(self, match: Match, policy: Precision) -> RopeProblem:
        dtype = policy_dtype(match, policy)
        operands = operands_of(match)
        if not all(operands.get(r) for r in ("x", "cos", "sin")):
            raise CannotImplement(f"{match.rule}: the match names no x, cos or sin operand")
        shape = tuple(int(v) for v in match.param("x_shape", ()))
        if not 1 <= len(shape) <= 4 or shape[-1] % 2:
            raise CannotImplement(f"{match.rule}: x of shape {shape}: rope kernels take 1 to 4 dims, an even last")
        return RopeProblem(x_shape=shape, x_stride=tuple(int(v) for v in match.param("x_stride", ())),
                           cos_shape=tuple(int(v) for v in match.param("cos_shape", ())),
                           sin_shape=tuple(int(v) for v in match.param("sin_shape", ())),
                           form=str(match.param("form", "half")), dtype=dtype)

    def candidates(self, problem: RopeProblem, policy: Precision, arch: Arch, budget: int,
                   hinted: Sequence[str] = ()) -> list[RopeConfig]:
        from fact_ray.realize.rope import LAUNCH_SHAPES, rope_candidates

        configs = rope_candidates(problem.dtype, arch, len(LAUNCH_SHAPES))
        lead = [c for name in hinted for c in configs if c.name == name]
        return (lead + [c for c in configs if c not in lead])[:max(budget, 0)]

    def sources(self, configs: Sequence[RopeConfig], arch: Arch) -> list[Source]:
        from fact_ray.realize.rope import DTYPE_OF_ELEMENT, emit_rope

        return [emit_rope(DTYPE_OF_ELEMENT[c.element], arch, c) for c in configs]

    def operands(self, problem: RopeProblem) -> tuple:
        return ("x", "cos", "sin")

    def kernel_fn(self, problem: RopeProblem, library: Library, poison: bool = False) -> Callable:
        import torch

        from fact_ray.realize.rope import RopeKernel

        k = RopeKernel(library)

        def rope(x, cos, sin):
            out = torch.full_like(x, math.nan) if poison else None
            return k.apply(x, cos, sin, problem.form, out=out)

        return rope

    def torch_fn(self, problem: RopeProblem) -> Callable:
        from fact_ray.realize.rope import rotate

        return lambda x, cos, sin: x * cos + rotate(x, problem.form) * sin

    def make_inputs(self, problem: RopeProblem, device: Any, seed: int) -> tuple:
        import torch

        p = problem
        gen = torch.Generator(device=device).manual_seed(seed)
        dt = getattr(torch, p.dtype)
        span = 1 + sum((n - 1) * s for n, s in zip(p.x_shape, p.x_stride))  # x as the graph lays it out
        x = torch.randn(span, generator=gen, device=device, dtype=dt).as_strided(p.x_shape, p.x_stride)
        angles = [torch.rand(shape, generator=gen, device=device) * 2 * math.pi
                  for shape in (p.cos_shape, p.sin_shape)]
        return x, angles[0].cos().to(dt), angles[1].sin().to(dt)

    def native_call(self, problem: RopeProblem, kid: str) -> tuple[str, tuple]:
        return "rope", (problem.form,)

    def op_functions(self, problem: RopeProblem, run: Callable) -> tuple[Callable, Callable]:
        import torch

        def real(x, cos, sin):
            return run(x, cos, sin)

        def fake(x, cos, sin):
            return torch.empty_like(x)  # the kernel writes x's layout

        return real, fake
