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
from fact_ray.types import Precision, Trial, TrialStatus


@dataclass(frozen=True)
class TrialResult:
    torch_trial: Trial  # the PyTorch op, verified and timed in the same process, interleaved with the candidate
    trial: Trial  # the candidate

    @property
    def restart_worker(self) -> bool:
        # tune_problem records a launch fault as "crashed" and returns; the CUDA context of this process may be
        # poisoned by it (sticky errors), so the worker is replaced before it runs another candidate.
        return TrialStatus.CRASHED in (self.trial.status, self.torch_trial.status)


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


def run_trial(ctx: WorkerContext, family: Any, problem: Any, config: Any, policy: Precision,
              compiled: Compiled, data: bytes) -> TrialResult:
    """`family`'s trial of one config (the same function `fact-ray tune` runs in its own process). The family
    object travels with the call, so a family registered only in the driver (a plug-in, a test's) runs here too."""
    path = local_library_path(ctx, data, compiled.so_sha256)
    library = replace(compiled.library, path=path)
    return TrialResult(*family.trial(problem, config, library, policy, ctx.device))
