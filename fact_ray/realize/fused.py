"""What the fused families that are not GEMMs share (attention, realize/attention_family.py; LayerNorm/RMSNorm,
realize/norm_family.py): a few fixed candidates each, tried against the PyTorch op the model already runs:
verified in float64 on fresh seeds, timed interleaved with the op, kept only where it is clearly faster; and a
custom op taking the match's operands as the graph holds them.

`FusedFamily` is the base of such a family: a subclass says how its kernel is called (`kernel_fn`), what the
model's op is (`torch_fn`), how inputs are drawn (`make_inputs`), and its op's schema and fake; the trial and the
op registration are here, once.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sequence

from fact_ray.errors import CannotImplement, first_line
from fact_ray.types import Library, Match, Precision, Trial, TrialStatus, content_hash

POLICY_DTYPE = {Precision.FP32: "float32", Precision.TF32: "float32", Precision.BF16: "bfloat16",
                Precision.FP16: "float16"}


def static_int(match: Match, key: str) -> int:
    try:
        return int(match.param(key))
    except (TypeError, ValueError):
        raise CannotImplement(f"{match.rule}: {key}={match.param(key)!r} is not a static integer") from None


def policy_dtype(match: Match, policy: Precision) -> str:
    """The operand dtype of `policy`; CannotImplement when the model runs another one at this match."""
    dtype = POLICY_DTYPE[Precision(policy)]
    if match.dtype != dtype:
        raise CannotImplement(f"{match.rule}: the model runs {match.dtype} here, the {Precision(policy).value} "
                              f"policy {dtype}")
    return dtype


def operands_of(match: Match) -> dict[str, str]:
    return dict(match.param("operands", ()) or ())


def _rel_err(out: Any, ref: Any) -> tuple[float, float]:
    import torch

    if not bool(torch.isfinite(out).all()):
        return math.nan, math.nan
    diff = out.double() - ref
    norm = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(diff)) / (norm or 1.0), float(diff.abs().max())


class FusedFamily:
    """Base of a fused family; see the module doc. Subclasses set name, serves, templates, stem (op names),
    schema, and implement problem, candidates, sources, operands, kernel_fn, torch_fn, make_inputs, op_functions."""

    name: str = ""
    serves: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    problem_type: type = object
    schema: str = ""  # the custom op's schema

    # ------------------------------------------------------------------ what a subclass says

    def stem(self, problem: Any) -> str:
        return self.name

    def kernel_fn(self, problem: Any, library: Library, poison: bool = False) -> Callable:
        """The kernel as a function of the graph's operands. With `poison` every output starts as NaN, so an
        element the kernel never writes fails verification."""
        raise NotImplementedError

    def torch_fn(self, problem: Any) -> Callable:
        """The PyTorch op the pattern is in the model (the baseline), in whatever dtype it is given."""
        raise NotImplementedError

    def make_inputs(self, problem: Any, device: Any, seed: int) -> tuple:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def accepts(self, config: Any, problem: Any) -> str:
        if getattr(config, "template", None) not in self.templates:
            return f"kernel {config.name} ({config.template}) does not compute {self.name}"
        return ""

    def output_shape(self, problem: Any, first_operand: tuple[int, ...]) -> None:
        return None  # the kernel's output has the graph's own shape

    def op_name(self, config: Any, problem: Any, library_key: str) -> str:
        digest = hashlib.sha256(content_hash(config, problem, library_key).encode()).hexdigest()[:12]
        return f"{self.stem(problem)}_{problem.dtype}_{digest}"

    def _check(self, fn: Callable, problem: Any, policy: Precision, device: Any,
               seeds: Sequence[int]) -> tuple[TrialStatus, str, float, float]:
        """(status, error, worst rel err, worst max abs err) of `fn` against the float64 op on fresh inputs."""
        ref_fn = self.torch_fn(problem)
        worst_rel, worst_abs = 0.0, 0.0
        for seed in seeds:
            inputs = self.make_inputs(problem, device, seed)
            ref = ref_fn(*[x.double() if x is not None else None for x in inputs])
            out = fn(*inputs)
            rel, mx = _rel_err(out, ref)
            if math.isnan(rel) or rel > policy.tolerance:
                why = "non-finite output" if math.isnan(rel) else \
                    f"rel err {rel:.3g} > {policy.tolerance:g} (seed {seed})"
                return TrialStatus.WRONG, why, rel, mx
            worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, mx)
        return TrialStatus.OK, "", worst_rel, worst_abs

    def trial(self, problem: Any, config: Any, library: Library, policy: Precision | str, device: Any,
              seeds: Sequence[int] = (0, 1), reps: int = 50) -> tuple[Trial, Trial]:
        """(the PyTorch op's trial, the kernel's trial): verified in float64, then timed interleaved."""
        import torch

        from fact_ray.errors import CandidateError, CompileError, LaunchError
        from fact_ray.realize.bench import clearly_faster, time_interleaved
        from fact_ray.realize.verify import precision_mode

        policy = Precision(policy)
        device = torch.device(device)
        base = self.torch_fn(problem)
        with torch.no_grad(), precision_mode(policy):
            b_status, b_err, b_rel, b_abs = self._check(base, problem, policy, device, seeds)
            try:
                status, err, rel, mx = self._check(self.kernel_fn(problem, library, poison=True), problem, policy,
                                                   device, seeds)
                # timed through the call a composed module makes (the native op where the dispatcher runs here)
                from fact_ray.realize.dispatch import composed_fused

                kernel = composed_fused(self, problem, config, library)
            except CompileError as e:  # the library did not build (or is not one of ours): that candidate's verdict
                status, err, rel, mx = TrialStatus.COMPILE_ERROR, first_line(e, named=False), math.nan, math.nan
            except LaunchError as e:  # a CUDA error: the worker pool replaces this process (TrialResult)
                status, err, rel, mx = TrialStatus.CRASHED, first_line(e, named=False), math.nan, math.nan
            except CandidateError as e:
                status, err, rel, mx = TrialStatus.CANNOT_IMPLEMENT, first_line(e, named=False), math.nan, math.nan
            inputs = self.make_inputs(problem, device, 12345)
            fns = {"torch": lambda: base(*inputs)}
            if status == TrialStatus.OK:
                fns[config.name] = lambda: kernel(*inputs)
            times = time_interleaved(fns, reps=reps)
        torch_error = "" if b_status.correct else f"the PyTorch op itself misses the {policy.value} policy: {b_err}"
        bt = times["torch"]
        torch_trial = Trial("torch", TrialStatus.OK, error=torch_error, rel_err=b_rel, max_abs_err=b_abs, time=bt,
                            baseline=bt)
        if status != TrialStatus.OK:
            return torch_trial, Trial(config.name, status, error=err, rel_err=rel, max_abs_err=mx)
        own = times[config.name]
        verdict = TrialStatus.OK if clearly_faster(own, bt) else TrialStatus.SLOWER
        return torch_trial, Trial(config.name, verdict, rel_err=rel, max_abs_err=mx, time=own, baseline=bt)

    def register_op(self, problem: Any, config: Any, library: Library) -> tuple[str, Any]:
        """`torch.ops.fact_ray.<name>` calling the kernel, with a fake implementation (shapes and strides only) so
        the composed module traces, exports and compiles without running it. Returns (name, op)."""
        import torch

        name = self.op_name(config, problem, library.key)
        if name in _OPS:  # one op per name and process, whichever instance of the family asks
            return name, _OPS[name]
        real, fake = self.op_functions(problem, self.kernel_fn(problem, library))
        op = torch.library.custom_op(f"fact_ray::{name}", real, mutates_args=(), schema=self.schema)
        op.register_fake(fake)
        _OPS[name] = op
        return name, op

    def native_call(self, problem: Any, kid: str) -> tuple[str, tuple]:
        """The native dispatcher's op for this family (`fact_ray_native.<op>`) and the arguments that follow the
        operands; NotImplementedError for a family the dispatcher does not run (its Python custom op is used)."""
        raise NotImplementedError

    def bind(self, problem: Any, config: Any, library: Library, symbol: str, native: bool,
             digest: str | None = None) -> Any:
        """How a composed graph calls this kernel (a dispatch.Binding): the native op where `native` and the
        dispatcher runs this family, else the Python custom op."""
        from fact_ray.realize import dispatch

        return dispatch.bind_fused(self, library, config, problem, native, digest)

    def op_functions(self, problem: Any, run: Callable) -> tuple[Callable, Callable]:
        """(real, fake) of the custom op: `real` calls `run`, `fake` gives the output's shape and strides only;
        both with the schema's arguments."""
        raise NotImplementedError

    def operands(self, problem: Any) -> tuple:
        raise NotImplementedError


_OPS: dict[str, Any] = {}
