"""Faults of the compiler (issue 14, item 1 and part of 11): a real nvcc compile whose cicc is killed mid-run
(as the OOM killer does) is the machine's failure: never cached as the candidate's compile error, retried, and
the next build succeeds. A killed run's temp folders and orphaned compiler processes are swept."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from fact_ray.realize import build as B
from fact_ray.search_spaces import space
from fact_ray.realize.emit import symbol
from fact_ray.realize.targets import GENCODE
from fact_ray.types import Arch, GemmProblem, Precision, Source

from ._util import Assassin, processes_under

pytestmark = pytest.mark.faults

# Small, but with enough headers that cicc lives long enough to be caught (a second or two).
SMALL = """
#include <cutlass/numeric_types.h>
#include <cutlass/array.h>
extern "C" __attribute__((visibility("default"))) int fr_abi_version(void) { return 1; }
__global__ void fr_fault_kernel(cutlass::half_t* x) { x[threadIdx.x] = cutlass::half_t(%s); }
"""


def small_source(value: str) -> Source:
    cfg = next(c for c in space(GemmProblem(M=256, N=256, K=256, dtype="float32"), Arch.SM80, Precision.FP32)
               if c.template == "sm80_gemm")
    return Source(name="fault", arch=Arch.SM80, code=SMALL % value, configs=(cfg,), symbols=(symbol(cfg),),
                  flags=(GENCODE["sm_80"],))


@pytest.mark.nvcc
@pytest.mark.recovers
def test_killed_cicc_is_not_cached_and_next_build_succeeds(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    src = small_source("2.0f")
    # No retry first, so the killed attempt itself is what comes back.
    monkeypatch.setattr(B, "MACHINE_RETRIES", 0)
    killer = Assassin(cache, "cicc")
    killer.start()
    lib = B.build(src, str(cache))
    killer.stop()
    assert killer.killed, "cicc was not caught running"
    assert not lib.ok and "not cached" in lib.log and "signal 9" in lib.log
    assert B.read_entry(str(cache), lib.key) is None, "a killed compiler must not be cached as a compile error"
    assert not list(cache.glob("*/.tmp-*")), "the attempt's temp folder is removed"
    again = B.build(src, str(cache))
    assert again.ok and not again.cached and B.read_entry(str(cache), again.key)["ok"]


@pytest.mark.nvcc
@pytest.mark.recovers
def test_killed_cicc_is_retried_within_the_build(tmp_path):
    cache = tmp_path / "cache"
    killer = Assassin(cache, "cicc", times=1)
    killer.start()
    lib = B.build(small_source("3.0f"), str(cache))
    killer.stop()
    assert len(killer.killed) == 1
    assert lib.ok and not lib.cached, "the machine failure was retried and the retry compiled"


def test_machine_failures_are_told_from_compile_errors():
    assert B.machine_failure(-9, "")
    assert B.machine_failure(137, "Killed\n")
    assert B.machine_failure(1, "nvcc error   : 'cicc' died due to signal 9 (Kill signal)")
    assert B.machine_failure(1, "terminate called after throwing an instance of 'std::bad_alloc'")
    assert not B.machine_failure(1, "fault.cu(3): error: identifier \"x\" is undefined")
    assert not B.machine_failure(2, "")


def test_sweep_removes_a_dead_runs_temp_folder_and_kills_its_orphans(tmp_path):
    cache = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the killed driver
    stale = cache / "ab" / ".tmp-abcdef0123456789-x"
    stale.mkdir(parents=True)
    (stale / B.OWNER).write_text(f"{socket.gethostname()} {dead.pid}\n")
    orphan = subprocess.Popen(["sleep", "300"], cwd=stale)  # what an orphaned cicc looks like to the sweep
    live = cache / "cd" / ".tmp-0123456789abcdef-y"
    live.mkdir(parents=True)
    (live / B.OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    other_host = cache / "ef" / ".tmp-fedcba9876543210-z"
    other_host.mkdir(parents=True)
    (other_host / B.OWNER).write_text(f"another-host {dead.pid}\n")
    try:
        removed = B.sweep_stale(cache)
        assert removed == [str(stale)] and not stale.exists()
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert live.exists() and other_host.exists(), "a live build or another host's is never touched"
        assert not processes_under(stale.parent, "sleep")
    finally:
        if orphan.poll() is None:
            orphan.kill()
