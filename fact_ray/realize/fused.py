"""Fused families that are not GEMMs: causal attention (CUTLASS example 41; on sm90 also example 88) and row
LayerNorm/RMSNorm (ours).

The GEMM families search a space of configurations; these have a few fixed candidates (attention: example 41 in
its block shapes for the head dim, with one TF32 product as well under the tf32 policy, and the Hopper FMHA for
bf16/fp16 on sm90; norms: our one-pass kernel), each tried against the PyTorch op the model already runs:
verified in float64 on fresh seeds, timed interleaved with the op, kept only where it is clearly faster.

Layout: attention patterns see q, k, v as the graph holds them, [B, H, S, D] views of the QKV projection; the
kernel reads [B, S, H, D] through strides, so the op passes `x.transpose(1, 2)` (a view, no copy) and returns its
[B, S, H, D] output as a [B, H, S, D] view: the model's `y.transpose(1, 2).contiguous()` then copies nothing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fact_ray.errors import CannotImplement, first_line
from fact_ray.types import Arch, KernelConfig, Library, Match, Precision, Source, Trial, content_hash

FUSED_FAMILIES = ("attention", "layernorm", "rmsnorm")
_POLICY_DTYPE = {Precision.FP32: "float32", Precision.TF32: "float32", Precision.BF16: "bfloat16",
                 Precision.FP16: "float16"}
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
    spelling: str  # "explicit" (matmul, scale, mask, softmax, matmul) | "sdpa"
    tf32: bool = False  # float32 operands may multiply in one TF32 pass (the tf32 policy)


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


FusedProblem = AttentionProblem | NormProblem


def _int(match: Match, key: str) -> int:
    try:
        return int(match.param(key))
    except (TypeError, ValueError):
        raise CannotImplement(f"{match.rule}: {key}={match.param(key)!r} is not a static integer") from None


def problem_of(match: Match, policy: Precision | str) -> FusedProblem:
    """The kernel's view of a match; CannotImplement (one line) for what these kernels do not run."""
    policy = Precision(policy)
    if match.family not in FUSED_FAMILIES:
        raise CannotImplement(f"{match.rule}: family {match.family!r} is not attention or a norm")
    dtype = _POLICY_DTYPE[policy]
    if match.dtype != dtype:
        raise CannotImplement(f"{match.rule}: the model runs {match.dtype} here, the {policy.value} policy "
                              f"{dtype}")
    operands = dict(match.param("operands", ()) or ())
    if match.family == "attention":
        B, H, S, D = (_int(match, k) for k in ("B", "H", "S", "D"))
        if D > 128 or (D * _ELEMENT_BYTES[dtype]) % 16:
            raise CannotImplement(f"{match.rule}: head dim {D} ({dtype}) is not a multiple of 16 bytes up to 128")
        scale = match.param("scale")
        scale = D ** -0.5 if scale is None else float(scale)
        if not all(operands.get(r) for r in ("q", "k", "v")):
            raise CannotImplement(f"{match.rule}: the match names no q, k or v operand")
        return AttentionProblem(B=B, H=H, S=S, D=D, dtype=dtype, causal=bool(match.param("causal", False)),
                                scale=scale, spelling=str(match.param("spelling", "explicit")),
                                tf32=policy == Precision.TF32)
    if not operands.get("x"):
        raise CannotImplement(f"{match.rule}: the match names no x operand")
    return NormProblem(rows=_int(match, "rows"), cols=_int(match, "cols"), kind=match.family, dtype=dtype,
                       eps=float(match.param("eps", 1e-5)), has_weight=bool(operands.get("weight")),
                       has_bias=bool(operands.get("bias")))


def sources_for(problem: FusedProblem, arch: Arch) -> list[Source]:
    """The translation unit(s) holding this problem's kernel (one config each, for `arch`)."""
    if isinstance(problem, AttentionProblem):
        from fact_ray.realize import fmha
        from fact_ray.realize.attention import blocks_for, emit_attention

        # Example 41 in each block shape that runs this head dim (32x128; 64x64 too for head dims up to 64); under
        # the tf32 policy also with one TF32 product instead of three (about 3x less tensor work, TF32 accuracy).
        maths = ("3xtf32", "tf32") if problem.tf32 and problem.dtype == "float32" else ("3xtf32",)
        sources = [emit_attention([problem.dtype], arch, block, math)
                   for math in maths for block in blocks_for(problem.D)]
        # On Hopper the FMHA (example 88) is a second candidate: the trial keeps the faster verified one.
        p = problem
        if Arch(arch) == Arch.SM90 and fmha.fits(p.dtype, p.D, p.S, p.causal):
            sources.append(fmha.emit_fmha(problem.dtype, arch))
        return sources
    from fact_ray.realize.norm import emit_norm

    return [emit_norm(problem.dtype, arch)]


def op_name(config: KernelConfig, problem: FusedProblem, library_key: str) -> str:
    stem = "attn" if isinstance(problem, AttentionProblem) else problem.kind
    digest = hashlib.sha256(content_hash(config, problem, library_key).encode()).hexdigest()[:12]
    return f"{stem}_{problem.dtype}_{digest}"


# --------------------------------------------------------------------------------------------- callables


def kernel_fn(problem: FusedProblem, library: Library, poison: bool = False) -> Callable:
    """The kernel as a function of the graph's operands: attention(q, k, v), norm(x, weight, bias). With `poison`
    every output starts as NaN, so an element the kernel never writes fails verification."""
    import torch

    def fresh(shape: tuple, like: Any) -> Any:
        return torch.full(shape, math.nan, dtype=like.dtype, device=like.device) if poison else None

    if isinstance(problem, AttentionProblem):
        from fact_ray.realize.attention import AttentionKernel
        from fact_ray.realize.fmha import TEMPLATE as FMHA_TEMPLATE, FmhaKernel

        # Both take the same call; the library's config says which ABI its .so speaks.
        kind = FmhaKernel if library.source.configs[0].template == FMHA_TEMPLATE else AttentionKernel
        k = kind(library)
        p = problem

        def attention(q, kk, v):
            q, kk, v = q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2)
            out = fresh(tuple(q.shape), q)
            return k(q, kk, v, causal=p.causal, scale=p.scale, out=out).transpose(1, 2)

        return attention
    from fact_ray.realize.norm import NormKernel

    n = NormKernel(library)

    def norm(x, weight=None, bias=None):
        out = fresh(tuple(x.shape), x)
        if problem.kind == "layernorm":
            return n.layer_norm(x, weight, bias, eps=problem.eps, out=out)
        return n.rms_norm(x, weight, eps=problem.eps, out=out)

    return norm


def torch_fn(problem: FusedProblem) -> Callable:
    """The PyTorch op the pattern is in the model (the baseline), in whatever dtype it is given."""
    import torch
    import torch.nn.functional as F

    if isinstance(problem, AttentionProblem):
        p = problem
        if p.spelling == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=p.causal, scale=p.scale)
        masks: dict[Any, torch.Tensor] = {}

        def explicit(q, k, v):
            s = (q @ k.transpose(-2, -1)) * p.scale
            if p.causal:
                mask = masks.get(q.device)
                if mask is None:
                    mask = masks[q.device] = torch.ones(p.S, p.S, dtype=torch.bool, device=q.device).triu(1)
                s = s.masked_fill(mask, float("-inf"))
            return torch.softmax(s, dim=-1) @ v

        return explicit
    if problem.kind == "layernorm":
        return lambda x, weight=None, bias=None: F.layer_norm(x, (problem.cols,), weight, bias, problem.eps)

    def rms(x, weight=None, bias=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + problem.eps)
        return y * weight if weight is not None else y

    return rms


def make_inputs(problem: FusedProblem, device: Any, seed: int) -> tuple:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, problem.dtype)
    if isinstance(problem, AttentionProblem):
        p = problem
        # q, k, v as the graph has them: [B, H, S, D] views of a [B, S, 3 * H * D] projection
        qkv = torch.randn(p.B, p.S, 3, p.H, p.D, generator=gen, device=device, dtype=dt)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    x = torch.randn(problem.rows, problem.cols, generator=gen, device=device, dtype=dt)
    w = (1 + 0.1 * torch.randn(problem.cols, generator=gen, device=device, dtype=dt)) if problem.has_weight else None
    b = 0.1 * torch.randn(problem.cols, generator=gen, device=device, dtype=dt) if problem.has_bias else None
    return x, w, b


# --------------------------------------------------------------------------------------------- trial


def _rel_err(out: Any, ref: Any) -> tuple[float, float]:
    import torch

    if not bool(torch.isfinite(out).all()):
        return math.nan, math.nan
    diff = out.double() - ref
    norm = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(diff)) / (norm or 1.0), float(diff.abs().max())


def _check(fn: Callable, problem: FusedProblem, policy: Precision, device: Any,
           seeds: Sequence[int]) -> tuple[str, str, float, float]:
    """(status, error, worst rel err, worst max abs err) of `fn` against the float64 op on fresh inputs."""
    ref_fn = torch_fn(problem)
    worst_rel, worst_abs = 0.0, 0.0
    for seed in seeds:
        inputs = make_inputs(problem, device, seed)
        ref = ref_fn(*[x.double() if x is not None else None for x in inputs])
        out = fn(*inputs)
        rel, mx = _rel_err(out, ref)
        if math.isnan(rel) or rel > policy.tolerance:
            why = "non-finite output" if math.isnan(rel) else \
                f"rel err {rel:.3g} > {policy.tolerance:g} (seed {seed})"
            return "wrong", why, rel, mx
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, mx)
    return "ok", "", worst_rel, worst_abs


def trial(problem: FusedProblem, config: KernelConfig, library: Library, policy: Precision | str, device: Any,
          seeds: Sequence[int] = (0, 1), reps: int = 50) -> tuple[Trial, Trial]:
    """(the PyTorch op's trial, the kernel's trial): verified in float64, then timed interleaved."""
    import torch

    from fact_ray.errors import CandidateError, CompileError, LaunchError
    from fact_ray.realize.bench import clearly_faster, time_interleaved
    from fact_ray.realize.verify import precision_mode

    policy = Precision(policy)
    device = torch.device(device)
    base = torch_fn(problem)
    with torch.no_grad(), precision_mode(policy):
        b_status, b_err, b_rel, b_abs = _check(base, problem, policy, device, seeds)
        try:
            status, err, rel, mx = _check(kernel_fn(problem, library, poison=True), problem, policy, device, seeds)
            # timed through the call a composed module makes (the native op where the dispatcher runs here)
            from fact_ray.realize.dispatch import composed_fused

            kernel = composed_fused(problem, config, library)
        except CompileError as e:  # the library did not build (or is not one of ours): that candidate's verdict
            status, err, rel, mx = "compile_error", first_line(e, named=False), math.nan, math.nan
        except LaunchError as e:  # a CUDA error: the worker pool replaces this process (TrialResult)
            status, err, rel, mx = "crashed", first_line(e, named=False), math.nan, math.nan
        except CandidateError as e:
            status, err, rel, mx = "cannot_implement", first_line(e, named=False), math.nan, math.nan
        inputs = make_inputs(problem, device, 12345)
        fns = {"torch": lambda: base(*inputs)}
        if status == "ok":
            fns[config.name] = lambda: kernel(*inputs)
        times = time_interleaved(fns, reps=reps)
    torch_error = "" if b_status == "ok" else f"the PyTorch op itself misses the {policy.value} policy: {b_err}"
    bt = times["torch"]
    torch_trial = Trial("torch", "ok", error=torch_error, rel_err=b_rel, max_abs_err=b_abs, time=bt, baseline=bt)
    if status != "ok":
        return torch_trial, Trial(config.name, status, error=err, rel_err=rel, max_abs_err=mx)
    own = times[config.name]
    return torch_trial, Trial(config.name, "ok" if clearly_faster(own, bt) else "slower", rel_err=rel,
                              max_abs_err=mx, time=own, baseline=bt)


# --------------------------------------------------------------------------------------------- custom ops

_OPS: dict[str, Any] = {}
_SCHEMA = {"attention": "(Tensor q, Tensor k, Tensor v) -> Tensor",
           "norm": "(Tensor x, Tensor? weight=None, Tensor? bias=None) -> Tensor"}


def roles(problem: FusedProblem) -> tuple[str, ...]:
    """The match operands the op takes, in order."""
    return ("q", "k", "v") if isinstance(problem, AttentionProblem) else ("x", "weight", "bias")


def register_op(config: KernelConfig, problem: FusedProblem, library: Library) -> tuple[str, Any]:
    """`torch.ops.fact_ray.<name>` calling the kernel, with a fake implementation (shapes and strides only) so
    the composed module traces, exports and compiles without running it. Returns (name, op)."""
    import torch

    name = op_name(config, problem, library.key)
    if name in _OPS:
        return name, _OPS[name]
    run = kernel_fn(problem, library)
    if isinstance(problem, AttentionProblem):
        def real(q, k, v):
            return run(q, k, v)

        def fake(q, k, v):
            B, H, S, D = q.shape
            return q.new_empty((B, S, H, D)).transpose(1, 2)  # the kernel's [B, S, H, D] output, seen as BHSD
        schema = _SCHEMA["attention"]
    else:
        def real(x, weight=None, bias=None):
            return run(x, weight, bias)

        def fake(x, weight=None, bias=None):
            return torch.empty_like(x, memory_format=torch.contiguous_format)
        schema = _SCHEMA["norm"]
    op = torch.library.custom_op(f"fact_ray::{name}", real, mutates_args=(), schema=schema)
    op.register_fake(fake)
    _OPS[name] = op
    return name, op
