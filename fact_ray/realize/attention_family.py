"""The attention family: causal multi-head attention by CUTLASS example 41 (realize/attention.py; in each block
shape that runs the head dim, and under the tf32 policy also with one TF32 product) and, on sm90 for bf16/fp16, the
Hopper FMHA of example 88 (realize/fmha.py) in each tile of its search space (search_spaces/attention.py) that fits
the head dim. Each candidate is tried against the model's own op.

Grouped-query and multi-query attention (K and V with H_kv < H heads, however the model shares them: SDPA's
enable_gqa, or a repeat discovery folded into the match) run on the FMHA only: it reads the un-repeated K and V,
query head h using key/value head h // (H / H_kv). The baseline is the model's own op, repeat included.

Layout: attention patterns see q, k, v as the graph holds them, [B, H, S, D] views of the QKV projection; the
kernel reads [B, S, H, D] through strides, so the op passes `x.transpose(1, 2)` (a view, no copy) and returns its
[B, S, H, D] output as a [B, H, S, D] view: the model's `y.transpose(1, 2).contiguous()` then copies nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fact_ray.errors import CannotImplement
from fact_ray.realize.fused import FusedFamily, operands_of, policy_dtype, static_int
from fact_ray.types import Arch, AttentionConfig, Library, Match, Precision, Source

_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class AttentionProblem:
    """softmax(scale * Q K^T, causal from the top left) V over [B, H, S, D] q, k, v of one dtype."""

    B: int
    H: int
    S: int
    D: int
    dtype: str
    causal: bool
    scale: float
    spelling: str  # "explicit" (matmul, scale, mask, softmax, matmul) | "sdpa" | "sdpa_gqa" (SDPA's enable_gqa)
    tf32: bool = False  # float32 operands may multiply in one TF32 pass (the tf32 policy)
    kv_heads: int = 0  # key/value heads (H_kv, dividing H); 0 as given means H (problems stored before GQA)

    def __post_init__(self) -> None:
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.H)

    @property
    def grouped(self) -> bool:
        return self.kv_heads != self.H


class AttentionFamily(FusedFamily):
    name = "attention"
    serves = ("attention",)
    templates = ("attention_sm80", "fmha_sm90")
    problem_type = AttentionProblem
    schema = "(Tensor q, Tensor k, Tensor v) -> Tensor"

    def stem(self, problem: AttentionProblem) -> str:
        return "attn"

    def problem(self, match: Match, policy: Precision) -> AttentionProblem:
        """The kernel's view of a match; CannotImplement (one line) for what these kernels do not run."""
        policy = Precision(policy)
        dtype = policy_dtype(match, policy)
        B, H, S, D = (static_int(match, k) for k in ("B", "H", "S", "D"))
        if D > 128 or (D * _ELEMENT_BYTES[dtype]) % 16:
            raise CannotImplement(f"{match.rule}: head dim {D} ({dtype}) is not a multiple of 16 bytes up to 128")
        scale = match.param("scale")
        scale = D ** -0.5 if scale is None else float(scale)
        kv_heads = H if match.param("kv_heads") is None else static_int(match, "kv_heads")
        if kv_heads < 1 or H % kv_heads:
            raise CannotImplement(f"{match.rule}: {kv_heads} key/value heads do not divide {H} query heads")
        operands = operands_of(match)
        if not all(operands.get(r) for r in ("q", "k", "v")):
            raise CannotImplement(f"{match.rule}: the match names no q, k or v operand")
        return AttentionProblem(B=B, H=H, S=S, D=D, dtype=dtype, causal=bool(match.param("causal", False)),
                                scale=scale, spelling=str(match.param("spelling", "explicit")),
                                tf32=policy == Precision.TF32, kv_heads=kv_heads)

    def candidates(self, problem: AttentionProblem, policy: Precision, arch: Arch, budget: int,
                   hinted: Sequence[str] = ()) -> list[AttentionConfig]:
        """On Hopper (bf16/fp16) the FMHA (example 88) in each tile of its search space for this head dim, example
        88's 128x128 first; then example 41 in each block shape that runs this head dim (32x128; 64x64 too for head
        dims up to 64), under the tf32 policy also with one TF32 product instead of three (about 3x less tensor
        work, TF32 accuracy). The trials keep the fastest verified one. Grouped-query attention: the FMHA only."""
        from fact_ray.realize import fmha
        from fact_ray.realize.attention import blocks_for, emit_attention
        from fact_ray.search_spaces.attention import fmha_tiles

        p = problem
        configs = []
        if Arch(arch) == Arch.SM90 and fmha.fits(p.dtype, p.D, p.S, p.causal, heads=p.H, kv_heads=p.kv_heads):
            configs += [fmha.emit_fmha(p.dtype, arch, t.block).configs[0] for t in fmha_tiles(p.D)]
        if not p.grouped:
            maths = ("3xtf32", "tf32") if p.tf32 and p.dtype == "float32" else ("3xtf32",)
            configs += [emit_attention([p.dtype], arch, block, math).configs[0]
                        for math in maths for block in blocks_for(p.D)]
        elif not configs:
            raise CannotImplement(f"grouped-query attention ({p.H} query heads over {p.kv_heads} key/value heads) "
                                  f"runs on the Hopper FMHA only: sm90, bf16/fp16, S % 8 == 0 (here "
                                  f"{Arch(arch).value}, {p.dtype}, S={p.S})")
        first = [c for name in hinted for c in configs if c.name == name]
        return (first + [c for c in configs if c not in first])[:max(budget, 0)]

    def sources(self, configs: Sequence[AttentionConfig], arch: Arch) -> list[Source]:
        """One translation unit per config (each holds one kernel for its dtype)."""
        from fact_ray.realize import fmha
        from fact_ray.realize.attention import F32_MATH, _DTYPES, emit_attention

        dtype_of = {element: d for d, (_, element, _) in _DTYPES.items()}
        f32_math = {op: math for math, op in F32_MATH.items()}
        out = []
        for c in configs:
            if c.template == fmha.TEMPLATE:
                src = fmha.emit_fmha(dtype_of[c.element], arch, tuple(c.block))
            else:
                src = emit_attention([dtype_of[c.element]], arch, c.block, f32_math.get(c.math_op, "3xtf32"))
            if src.configs != (c,):
                raise ValueError(f"{c.name}: not a config this family emits (it renders {src.configs[0].name})")
            out.append(src)
        return out

    def operands(self, problem: AttentionProblem) -> tuple[str, ...]:
        return ("q", "k", "v")

    def accepts(self, config: Any, problem: AttentionProblem) -> str:
        from fact_ray.realize.fmha import TEMPLATE as FMHA_TEMPLATE

        why = super().accepts(config, problem)
        if not why and problem.grouped and config.template != FMHA_TEMPLATE:
            why = f"kernel {config.name} reads as many key/value heads as query heads, the model has {problem.kv_heads}"
        return why

    def kernel_fn(self, problem: AttentionProblem, library: Library, poison: bool = False) -> Callable:
        import torch

        from fact_ray.realize.attention import AttentionKernel
        from fact_ray.realize.fmha import TEMPLATE as FMHA_TEMPLATE, FmhaKernel

        # Both take the same call; the library's config says which ABI its .so speaks.
        kind = FmhaKernel if library.source.configs[0].template == FMHA_TEMPLATE else AttentionKernel
        k = kind(library)
        p = problem

        def attention(q, kk, v):
            q, kk, v = q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2)
            out = torch.full(tuple(q.shape), math.nan, dtype=q.dtype, device=q.device) if poison else None
            return k(q, kk, v, causal=p.causal, scale=p.scale, out=out).transpose(1, 2)

        return attention

    def torch_fn(self, problem: AttentionProblem) -> Callable:
        import torch
        import torch.nn.functional as F

        p = problem
        group = p.H // p.kv_heads
        if p.spelling == "sdpa_gqa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=p.causal, scale=p.scale,
                                                                  enable_gqa=True)

        def repeated(t):  # the model's repeat of the key/value heads (the match covered it; the baseline pays it)
            return t.repeat_interleave(group, dim=1) if group > 1 else t

        if p.spelling == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, repeated(k), repeated(v), is_causal=p.causal,
                                                                  scale=p.scale)
        masks: dict[Any, torch.Tensor] = {}

        def explicit(q, k, v):
            k, v = repeated(k), repeated(v)
            s = (q @ k.transpose(-2, -1)) * p.scale
            if p.causal:
                mask = masks.get(q.device)
                if mask is None:
                    mask = masks[q.device] = torch.ones(p.S, p.S, dtype=torch.bool, device=q.device).triu(1)
                s = s.masked_fill(mask, float("-inf"))
            return torch.softmax(s, dim=-1) @ v

        return explicit

    def make_inputs(self, problem: AttentionProblem, device: Any, seed: int) -> tuple:
        import torch

        p = problem
        gen = torch.Generator(device=device).manual_seed(seed)
        # q, k, v as the graph has them: [B, H, S, D] and [B, H_kv, S, D] views of one [B, S, (H + 2 H_kv) * D]
        # projection
        heads = torch.randn(p.B, p.S, p.H + 2 * p.kv_heads, p.D, generator=gen, device=device,
                            dtype=getattr(torch, p.dtype))
        ends = (0, p.H, p.H + p.kv_heads, p.H + 2 * p.kv_heads)
        return tuple(heads[:, :, ends[i]:ends[i + 1]].transpose(1, 2) for i in range(3))

    def native_call(self, problem: AttentionProblem, kid: str) -> tuple[str, tuple]:
        return "attention", (bool(problem.causal), float(problem.scale))

    def op_functions(self, problem: AttentionProblem, run: Callable) -> tuple[Callable, Callable]:
        def real(q, k, v):
            return run(q, k, v)

        def fake(q, k, v):
            B, H, S, D = q.shape
            return q.new_empty((B, S, H, D)).transpose(1, 2)  # the kernel's [B, S, H, D] output, seen as BHSD

        return real, fake
