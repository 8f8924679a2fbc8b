"""A real compile fan-out with nvcc on a local multi-node Ray cluster (head + 2 one-CPU worker nodes), one of
which is removed in the middle: every translation unit still ends accounted for (built, failed to compile with
its log, or retried elsewhere), and the bytes of every built unit are still fetchable (Ray reconstructs those
that lived on the removed node)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
from dataclasses import replace

import pytest
import ray
from ray.cluster_utils import Cluster

from fact_ray.actors.compile import compile_all
from fact_ray.realize.emit import emit
from fact_ray.realize.norm import emit_norm
from fact_ray.search_spaces import space
from fact_ray.types import Arch, GemmProblem, Precision

pytestmark = [pytest.mark.nvcc, pytest.mark.slow]


def _sources():
    """A short unit and a long one first, so that the node removed when the short one is in is mid-compile (the
    long one, an sm80 GEMM, 10-30 s on a 2-core machine), then a unit that cannot compile and another short one:
    the work left for the surviving node. The short ones are LayerNorm units (a few seconds each)."""
    problem = GemmProblem(M=256, N=256, K=128)
    (long,) = emit([space(problem, Arch.SM80, Precision.FP32, 16)[0]], Arch.SM80)
    short, other = emit_norm("float32"), emit_norm("bfloat16")
    broken = replace(short, name=short.name + "_broken", code=short.code + "\n#error planted compile error\n")
    return [short, long, broken, other]


@pytest.fixture
def cluster(monkeypatch):
    # Ray's test Cluster publishes its address in <Ray's temp folder>/ray_current_cluster, where any ray.init()
    # without an address on this machine would join it (another pytest-xdist worker's farm run, for one). A temp
    # folder of its own keeps it to this test; short, as the sockets inside must fit AF_UNIX's 107 bytes.
    tmp = tempfile.mkdtemp(prefix="fr-ray-")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 2**20,
                                                      "include_dashboard": False})
    try:
        workers = [c.add_node(num_cpus=1, object_store_memory=100 * 2**20) for _ in range(2)]
        ray.init(address=c.address, logging_level="ERROR")
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_compile_fan_out_survives_a_node_removed_mid_run(cluster, tmp_path):
    c, workers = cluster
    sources = _sources()
    removed: dict[str, object] = {}
    done_before: list = []
    lock = threading.Lock()

    def on_done(o):
        with lock:
            done_before.append(o)
            if removed:
                return
            # The first unit is in: the other worker node is mid-compile now (the long unit). Take it away.
            victim = next(w for w in workers if w.node_id != o.node_id)
            removed["id"], removed["at"] = victim.node_id, time.monotonic()
            c.remove_node(victim, allow_graceful=False)

    outcomes = compile_all(sources, str(tmp_path / "cache"), "nvcc", max_retries=3, on_done=on_done)
    assert removed, "no unit finished"

    # Every unit accounted for, in source order, each exactly once.
    assert [o.source.name for o in outcomes] == [s.name for s in sources]
    assert len(done_before) == len(sources)
    broken = outcomes[2]
    assert not broken.ok and not broken.lost and "planted compile error" in broken.library.log
    good = [o for i, o in enumerate(outcomes) if i != 2]
    for o in good:
        # A node death is not a result: with a live node left, the unit was retried there and built.
        assert o.ok, (o.source.name, o.lost, o.library.log[-500:])
        data = ray.get(o.so_ref, timeout=180)  # reconstructed by Ray when its copy lived on the removed node
        assert len(data) > 100_000 and hashlib.sha256(data).hexdigest() == o.so_sha256
    survivor = next(w.node_id for w in workers if w.node_id != removed["id"])
    # The run went on after the removal, on the surviving node. (A unit the removed node finished just before
    # it went may still report that node: its result was already on its way.)
    assert any(o.node_id == survivor for o in done_before[1:])
    # The long unit, in flight on whichever node went (or not yet started), ends built on the one that stayed.
    assert outcomes[1].node_id == survivor
