"""The real trial function a GPU `TrialWorker` runs: one candidate config of one problem, verified and timed
beside the PyTorch op in this process.

One call is one candidate, so a hanging or crashing kernel costs exactly its own trial (the worker pool's time
limit and restart handle it). The library arrives as bytes through the object store and is written under the
worker's scratch folder by its content hash, so every GPU node gets the exact bytes that were compiled, without
a shared path; a library already written by this worker process is reused.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from typing import Any

from fact_ray.actors.compile import Compiled
from fact_ray.actors.trial_worker import WorkerContext
from fact_ray.types import GemmProblem, KernelConfig, Precision, Trial


@dataclass(frozen=True)
class TrialResult:
    torch_trial: Trial  # the PyTorch op, verified and timed in the same process, interleaved with the candidate
    trial: Trial  # the candidate

    @property
    def restart_worker(self) -> bool:
        # tune_problem records a launch fault as "crashed" and returns; the CUDA context of this process may be
        # poisoned by it (sticky errors), so the worker is replaced before it runs another candidate.
        return self.trial.status == "crashed" or self.torch_trial.status == "crashed"


def local_library_path(ctx: WorkerContext, data: bytes, digest: str) -> str:
    """Write `data` to the worker's scratch folder under its hash (atomically) and return the path."""
    actual = hashlib.sha256(data).hexdigest()
    if digest and actual != digest:
        # Bytes that are not what was compiled would run a different kernel: refuse, loudly.
        raise RuntimeError(f"library bytes do not match their hash ({actual[:12]} != {digest[:12]})")
    path = os.path.join(ctx.workdir, f"{actual}.so")
    if not os.path.isfile(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


def run_trial(ctx: WorkerContext, problem: Any, config: KernelConfig, policy: Precision,
              compiled: Compiled, data: bytes) -> TrialResult:
    path = local_library_path(ctx, data, compiled.so_sha256)
    library = replace(compiled.library, path=path)
    if not isinstance(problem, GemmProblem):  # attention or a norm: one kernel against the model's own op
        from fact_ray.realize.fused import trial

        return TrialResult(*trial(problem, config, library, policy, ctx.device))
    from fact_ray.realize.tune import tune_problem  # torch and CUDA load on the worker only

    _, trials = tune_problem(problem, [config], [library], policy, ctx.device)
    torch_trial = trials[0]
    trial = next(t for t in trials[1:] if t.candidate_name == config.name)
    return TrialResult(torch_trial, trial)
