"""The Ray executor of the realization pipeline (fact_ray.realize.pipeline): the build step as compile tasks on the
cluster's CPUs (actors/compile.py), the trial step as one call per candidate on the GPU trial workers
(actors/trial_worker.py: time limits, a crashed or hung worker replaced). The pipeline itself, its plans and its
selection are the same as `fact-ray tune`'s in-process executor's."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from fact_ray.realize.pipeline import Built, TrialCall, TrialDone
from fact_ray.types import Precision, Source, Trial

log = logging.getLogger("fact_ray.farm")


class RayExecutor:
    """`pool` None: no GPU in the cluster, so the pipeline stops after the build."""

    def __init__(self, cache_dir: str, nvcc: str, *, max_in_flight: int = 0, pool: Any = None,
                 shared: str = "") -> None:
        self.cache_dir, self.nvcc, self.max_in_flight, self.pool = cache_dir, nvcc, max_in_flight, pool
        self.shared = shared  # a shared build cache's URI (fact_ray.shared_cache), "" for none
        self.can_trial = pool is not None

    def build(self, sources: Sequence[Source], on_done: Callable[[Built], None]) -> list[Built]:
        from fact_ray.actors.compile import compile_all

        def built(o: Any) -> Built:
            return Built(o.source, o.library, lost=o.lost, handle=o)

        if not sources:
            return []
        outcomes = compile_all(list(sources), self.cache_dir, self.nvcc, max_in_flight=self.max_in_flight,
                               on_done=lambda o: on_done(built(o)), shared=self.shared)
        return [built(o) for o in outcomes]

    def trials(self, calls: Sequence[TrialCall], policy: Precision, on_done: Callable[[TrialDone], None]) -> None:
        from fact_ray.actors.trial_worker import TrialOutcome

        def outcome(out: TrialOutcome) -> None:
            cfg = calls[out.index].config
            where = {"slot": out.worker, "host": out.host}  # which GPU ran it (MLflow shows the spread)
            if out.done:
                on_done(TrialDone(out.index, out.value.trial, out.value.torch_trial, **where))
                return
            if out.detail:
                # Not a candidate's verdict but an exception in our own trial code (or a CUDA fault): the trial is
                # recorded and the worker replaced, and the traceback is shown, never swallowed.
                log.warning("trial of %s on %s raised unexpectedly (worker replaced):\n%s", cfg.name,
                            out.host or "a worker", out.detail)
            on_done(TrialDone(out.index, Trial(cfg.name, out.status, error=out.error), **where))

        args = [(c.family(), c.plan.problem, c.config, policy, c.built.handle.meta_ref, c.built.handle.so_ref)
                for c in calls]
        self.pool.run(args, outcome)
