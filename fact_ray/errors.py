"""Typed errors.

`UserError` and its subclasses are what a user can cause (bad file, untraceable model, no GPU, unreachable
service): the CLI prints their message as one line and exits with `exit_code`. Everything else is a bug and
propagates with its traceback.

`CandidateError` and its subclasses mark one candidate invalid (compile error, cannot implement, wrong answer):
the narrow set a tuner catches; a trial records it and the run goes on.
"""

from __future__ import annotations

import re


class FactRayError(Exception):
    """Base of all fact-ray errors."""


class UserError(FactRayError):
    exit_code = 2


class ModelNotFound(UserError):
    pass


class ModelInvalid(UserError):
    """The file or factory does not provide what KernelBench format needs (Model, get_inputs, ...)."""


class ModelRaised(UserError):
    """Building or running the user's model raised."""


class CaptureError(UserError):
    """Neither torch.export nor FX symbolic tracing could capture the model."""


class UnsupportedDtype(UserError):
    pass


class UnknownArch(UserError):
    pass


class UnknownPolicy(UserError):
    pass


class ConfigError(UserError):
    pass


class NotAvailable(UserError):
    """A command whose issue has not landed, or a step this machine cannot do (no GPU, no nvcc)."""

    exit_code = 3


class ServiceUnreachable(UserError):
    """Ray cluster, tracking server or table storage not reachable or not writable."""


class TableError(UserError):
    """The pattern table cannot be read or written (schema version, permissions)."""


class CandidateError(FactRayError):
    """One candidate is invalid; the trial records it, the run goes on."""

    status = "failed"


class CompileError(CandidateError):
    status = "compile_error"

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class CannotImplement(CandidateError):
    status = "cannot_implement"


class WrongAnswer(CandidateError):
    status = "wrong"


class RunNotFound(UserError):
    """A run id given to `fact-ray compare` (or similar) is not in the tracking store."""


class LaunchError(CandidateError, RuntimeError):
    """A compiled kernel's run entry point returned a failure status (or the launch faulted): the trial is
    recorded as crashed. Also a RuntimeError, since to a caller outside tuning it is a failed launch."""

    status = "crashed"


class ComposeError(UserError):
    """A graph cannot be rewritten to the chosen kernels (overlapping matches, a missing node, an interior value
    used outside its subgraph, an unsupported family), or a composed module failed its end-to-end check."""


class ArtifactError(UserError):
    """A composition artifact cannot be saved or loaded here: damaged or missing files, or an arch, toolchain or
    model that differs from the one it was made for."""


class InferenceOnly(UserError, RuntimeError):
    """A composed module was called with autograd on (grad mode with an input or a parameter that requires grad):
    its kernels have no backward, so it refuses at the call instead of failing (or warning) in `backward()`."""


class DispatchUnavailable(NotAvailable):
    """The native dispatcher extension (realize/dispatch.py) cannot be built or loaded here: no C++ compiler,
    no CUDA headers for a CUDA build of torch, a compile error. One line, with the build log's path."""


def first_line(what: BaseException | str, limit: int = 300, *, named: bool = True) -> str:
    """The one line a person reads first, cut to `limit` characters. For an exception: the first line of its
    message, after its type unless `named` is False (our own typed errors say what happened without it); the type
    alone when the message is empty. For a log (a compiler's): its first line that says "error", else its first
    line. Every one-line error fact-ray shows or records is made here."""
    if isinstance(what, BaseException):
        lines = [ln.strip() for ln in str(what).splitlines() if ln.strip()]
        kind = type(what).__name__
        text = (f"{kind}: {lines[0]}" if named else lines[0]) if lines else kind
    else:
        lines = [ln.strip() for ln in what.splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.search(r"\berror\b", ln, re.IGNORECASE)]
        text = (errors or lines or ["(empty log)"])[0]
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"
