"""Is a candidate correct? (measuring.md, "Correctness")

A candidate is `fn(a, b, bias, residual, out) -> None` that writes its result into `out` (a `GemmKernel` called
with `out=` fits; `as_candidate` adapts a function that returns its result, such as the torch op).

For every draw (torch.rand per seed, as KernelBench's inputs, plus one torch.randn draw for signed data with
cancellation) at the problem's real shapes, in the policy's dtype:
  * the reference is `torch_op` in float64 on the same device, over the very same (rounded) inputs;
  * the output is filled with NaN before each run, so an element the candidate never writes fails;
  * the candidate runs twice on the same inputs; a difference beyond rounding means a race;
  * relative Frobenius error within the policy's tolerance, and on the rand draws KernelBench's
    `torch.allclose(atol = rtol = policy.allclose_tol)` as well.

The allclose check is not applied to the randn draw: there, outputs near zero make an elementwise atol of 1e-2
unreachable for 1xTF32 even for cuBLAS (K = 768 gives an absolute error of about 1e-2 on values near 0), while
KernelBench itself checks on its rand inputs. The Frobenius tolerance applies to every draw.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from fact_ray.realize.kernel import has_bias, has_residual, operand_shapes, torch_dtype, torch_op
from fact_ray.types import GemmProblem, Precision

Candidate = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor],
                     None]

# Seed of the one randn draw, apart from the rand seeds so that the two never share a stream.
RANDN_SEED = 1_000_003


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rel_err: float  # worst relative Frobenius error over all draws and runs
    max_abs_err: float  # worst max elementwise error
    allclose_ok: bool  # KernelBench's allclose on every rand draw
    reason: str = ""  # why not ok, one line


@contextlib.contextmanager
def precision_mode(policy: Precision | str) -> Iterator[None]:
    """PyTorch's own matmuls and convolutions under the policy: TF32 only under tf32 (fp32 means fp32-class
    accuracy), the previous settings restored after. Baselines, kept ops and benchmarks all run inside it."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = Precision(policy) == Precision.TF32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def policy_dtype(policy: Precision) -> torch.dtype:
    """The dtype of inputs and outputs under a policy: bf16/fp16 for those, fp32 otherwise."""
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(Precision(policy), torch.float32)


def as_candidate(fn: Callable) -> Candidate:
    """Adapt `fn(a, b, bias, residual) -> Tensor` to the write-into-out convention."""

    def candidate(a, b, bias, residual, out):
        out.copy_(fn(a, b, bias, residual))

    return candidate


def make_inputs(problem: GemmProblem, dtype: torch.dtype, device: torch.device | str, seed: int,
                dist: str = "rand") -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                             Optional[torch.Tensor]]:
    """Fresh (a, b, bias, residual) at the problem's shapes, drawn in fp32 from `seed` and rounded to `dtype`."""
    shapes = operand_shapes(problem)
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    draw = {"rand": torch.rand, "randn": torch.randn}[dist]

    def one(shape):
        if shape is None:
            return None
        return draw(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    a, b = one(shapes["a"]), one(shapes["b"])
    bias = one(shapes["bias"]) if has_bias(problem) else None
    residual = one(shapes["residual"]) if has_residual(problem) else None
    return a, b, bias, residual


def race_threshold(dtype: torch.dtype, scale: float) -> float:
    """Largest run-to-run difference that rounding explains: a reordered fp32 accumulation (stream-K's
    nondeterministic reduction) plus one or two units in the last place of the output type, relative to the
    output's magnitude. A race (an unwritten tile, a missing split) differs by far more."""
    return (2 * torch.finfo(dtype).eps + 64 * torch.finfo(torch.float32).eps) * scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verify(candidate_fn: Candidate, problem: GemmProblem, policy: Precision, device: torch.device | str,
           seeds: Sequence[int] = (0, 1, 2)) -> VerifyResult:
    """Check `candidate_fn` against the float64 reference on fresh inputs; see the module docstring.

    Exceptions of the candidate (CannotImplement, LaunchError, ...) propagate: the caller records them.
    """
    policy = Precision(policy)
    device = torch.device(device)
    dtype = policy_dtype(policy)
    if torch_dtype(problem.dtype) != dtype:
        raise ValueError(f"problem dtype {problem.dtype} does not match policy {policy.value} "
                         f"({str(dtype).removeprefix('torch.')})")
    tol, atol = policy.tolerance, policy.allclose_tol
    reference = torch_op(problem)
    out_shape = operand_shapes(problem)["out"]
    worst_rel, worst_abs, allclose_ok = 0.0, 0.0, True
    draws = [("rand", s) for s in seeds] + [("randn", RANDN_SEED)]

    def result(ok: bool, reason: str = "") -> VerifyResult:
        return VerifyResult(ok, worst_rel, worst_abs, allclose_ok, reason)

    for dist, seed in draws:
        where = f"{dist} seed {seed}"
        inputs = make_inputs(problem, dtype, device, seed, dist)
        ref = reference(*(None if t is None else t.to(torch.float64) for t in inputs))
        ref_norm = float(torch.linalg.vector_norm(ref))
        if not torch.isfinite(ref).all():
            return result(False, f"reference is not finite ({where})")
        runs = []
        for _ in range(2):
            out = torch.full(out_shape, float("nan"), dtype=dtype, device=device)
            candidate_fn(*inputs, out)
            _sync(device)
            runs.append(out)
        for out in runs:
            bad = int((~torch.isfinite(out)).sum())
            if bad:
                worst_rel = worst_abs = float("inf")
                return result(False, f"{bad} of {out.numel()} outputs not finite: unwritten or NaN ({where})")
            diff = out.to(torch.float64) - ref
            rel = float(torch.linalg.vector_norm(diff)) / (ref_norm or 1.0)
            max_abs = float(diff.abs().max()) if diff.numel() else 0.0
            worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, max_abs)
            if rel > tol:
                return result(False, f"rel err {rel:.2e} > {tol:.0e} for {policy.value} ({where})")
            if dist == "rand" and not torch.allclose(out.to(torch.float64), ref, rtol=atol, atol=atol):
                allclose_ok = False
                return result(False, f"allclose(atol=rtol={atol:.0e}) fails: max abs err {max_abs:.2e} ({where})")
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        spread = float((runs[0].to(torch.float64) - runs[1].to(torch.float64)).abs().max()) if ref.numel() else 0.0
        if spread > race_threshold(dtype, scale):
            return result(False, f"racy: two runs on the same inputs differ by {spread:.2e} "
                                 f"(rounding allows {race_threshold(dtype, scale):.2e}; {where})")
    return result(True)
