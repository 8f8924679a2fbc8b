"""Emission from templates, the content-addressed nvcc cache, and real compiles of each template.

Cache behaviour is shown on a tiny translation unit (a real nvcc run of a few seconds); the real-template tests
compile one TU of each CUTLASS generation (about 25 s for a 2.x TU of 6 instances for sm80+sm90a, 45 s for a
fused sm90a 3.x) into a session-wide cache and check the exported C ABI. The GPU test runs those libraries
against torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import stat
from pathlib import Path

import pytest

from fact_ray.errors import NotAvailable
from fact_ray.realize import build as B
from fact_ray.realize.emit import COMPILE_FIELDS, MAX_PER_TU, emit, kernel_key, render, symbol
from fact_ray.realize.targets import AMPERE_AND_HOPPER
from fact_ray.search_spaces import space
from fact_ray.types import Arch, GemmProblem, Precision, Source


FP32_LONG_K = GemmProblem(M=256, N=256, K=524288, dtype="float32")
BF16_GELU = GemmProblem(M=1024, N=768, K=512, dtype="bfloat16", epilogue="bias_act", activation="gelu")
BF16_GELU_TANH = GemmProblem(M=1024, N=768, K=512, dtype="bfloat16", epilogue="bias_act", activation="gelu_tanh")
FP32_RESIDUAL = GemmProblem(M=1024, N=768, K=512, dtype="float32", epilogue="bias_residual")


def fp32_configs():
    """A 3xTF32 config and its split-K variant (one compiled instance for both)."""
    cfgs = space(FP32_LONG_K, Arch.SM80, Precision.FP32)
    base = next(c for c in cfgs if c.math_op == "multiply_add_fast_f32" and c.tile == (128, 128, 16)
                and c.warps == (4, 2, 1) and c.stages == 3 and c.swizzle == "Identity8" and c.split_k == 1)
    split = next(c for c in cfgs if c.split_k == 16 and symbol(c) == symbol(base))
    return base, split


def fp32_residual_configs():
    """fp32 bias + residual through the broadcast epilogue: 3xTF32 tensor ops and SIMT (the SIMT one did not
    compile on the H200, and took the 3xTF32 one in its TU down with it)."""
    cfgs = space(FP32_RESIDUAL, Arch.SM80, Precision.FP32)
    return (next(c for c in cfgs if c.opclass == "tensorop" and c.tile == (128, 128, 16) and c.split_k == 1),
            next(c for c in cfgs if c.opclass == "simt" and c.split_k == 1))


def bias_free_configs(arch=Arch.SM80, element="float32", policy=Precision.FP32):
    """The act and residual epilogues (no bias vector), one 2.x config each."""
    out = []
    for epilogue, act in (("act", "relu"), ("residual", "none")):
        p = GemmProblem(M=1024, N=768, K=512, dtype=element, epilogue=epilogue, activation=act)
        out.append(next(c for c in space(p, arch, policy) if c.template == "sm80_gemm" and c.split_k == 1
                        and c.swizzle == "Identity8" and c.opclass == "tensorop"))
    return out


def bf16_gelu_config():
    return next(c for c in space(BF16_GELU, Arch.SM80, Precision.BF16)
                if c.tile == (128, 128, 32) and c.swizzle == "Identity8" and c.split_k == 1)


def sm90_fused_config():
    return next(c for c in space(BF16_GELU_TANH, Arch.SM90, Precision.BF16)
                if c.template == "sm90_gemm" and c.kernel_schedule == "TmaWarpSpecializedCooperative"
                and c.tile == (128, 128, 64) and c.cluster == (1, 2, 1) and c.tile_scheduler == "")


# ------------------------------------------------------------------------------------------------ emit


def test_render_is_strict():
    assert render("a {{x}} b {{ y }}", {"x": 1, "y": "two"}) == "a 1 b two"
    with pytest.raises(KeyError):
        render("{{x}} {{y}}", {"x": 1})
    with pytest.raises(KeyError):
        render("{{x}}", {"x": 1, "z": 2})


def _alternative(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, tuple):
        return (value[0] + 1,) + value[1:]
    return str(value) + "_other"


@pytest.mark.parametrize("config", ["sm80", "sm90"])
def test_symbol_changes_with_every_compile_field_only(config):
    cfg = fp32_configs()[0] if config == "sm80" else sm90_fused_config()
    sym = symbol(cfg)
    for field in COMPILE_FIELDS[cfg.template]:
        if field == "template":
            continue  # another template has another field set; covered by the emitted code differing
        changed = dataclasses.replace(cfg, **{field: _alternative(getattr(cfg, field))})
        assert symbol(changed) != sym, field
    for field, value in [("name", "renamed"), ("split_k", 32), ("precision", Precision.TF32)]:
        assert symbol(dataclasses.replace(cfg, **{field: value})) == sym, field


def test_emit_dedups_split_variants_and_keeps_order():
    configs = space(FP32_LONG_K, Arch.SM80, Precision.FP32)
    sources = emit(configs, Arch.SM80)
    seen = [c for s in sources for c in s.configs]
    assert sorted(c.name for c in seen) == sorted(c.name for c in configs)
    position = {c.name: i for i, c in enumerate(configs)}
    by_symbol = {}
    for s in sources:
        assert len(s.symbols) == len(s.configs)
        assert list(s.symbols) == [symbol(c) for c in s.configs]
        idx = [position[c.name] for c in s.configs]
        assert idx == sorted(idx), "configs keep the given order inside a TU"
        unique = set(s.symbols)
        assert len(unique) <= MAX_PER_TU["sm80_gemm"]
        assert s.code.count("// ---- fr_") == len(unique), "one instance per distinct symbol"
        assert re.search(r"\{\{\s*\w+\s*\}\}", s.code) is None, "every template slot is filled"
        assert s.name.startswith("sm80_gemm_") and s.arch is Arch.SM80
        for sym in unique:
            assert sym not in by_symbol, "a compile key lands in exactly one TU"
            by_symbol[sym] = s.name
    splits = [c for c in configs if c.split_k > 1]
    assert splits
    for c in splits:
        base = dataclasses.replace(c, split_k=1)
        assert symbol(base) == symbol(c)


def test_emit_groups_sm90_by_schedule_and_fusion():
    configs = space(BF16_GELU_TANH, Arch.SM90, Precision.BF16)
    sm90 = [c for c in configs if c.template == "sm90_gemm"]
    sources = emit(sm90, Arch.SM90)
    sizes = {}
    for s in sources:
        fam = {(c.kernel_schedule, c.epilogue_schedule, c.tile_scheduler, c.epilogue, c.activation) for c in s.configs}
        assert len(fam) == 1
        n = len({kernel_key(c) for c in s.configs})  # launch variants of one kernel share its compile
        assert 1 <= n <= MAX_PER_TU["sm90_gemm"]
        sizes.setdefault(fam.pop(), []).append(n)
        assert "cutlass::epilogue::fusion::LinCombPerColBiasEltAct" in s.code
        assert "cutlass::epilogue::thread::GELU_taylor" in s.code
    for ns in sizes.values():
        assert max(ns) - min(ns) <= 1, "TUs of one family are balanced"
    assert emit(sm90, Arch.SM90)[0].name == sources[0].name, "names come from content"


def test_emit_bias_free_and_residual_epilogues():
    act = next(c for c in space(GemmProblem(M=1024, N=768, K=512, dtype="bfloat16", epilogue="act",
                                            activation="silu"), Arch.SM90, Precision.BF16)
               if c.template == "sm90_gemm")
    code = emit([act], Arch.SM90)[0].code
    assert "kEpilogue = 4;" in code and "using ElementC = void;" in code
    assert "cutlass::epilogue::thread::SiLu" in code
    residual = [c for c in space(GemmProblem(M=1024, N=768, K=512, dtype="bfloat16", epilogue="residual"),
                                 Arch.SM90, Precision.BF16) if c.template == "sm90_gemm"]
    # A residual alone needs no fusion: NoSmem epilogues qualify, and C is always loaded.
    assert {c.epilogue_schedule for c in residual} >= {"NoSmemWarpSpecialized", "TmaWarpSpecializedCooperative"}
    for s in emit(residual[:8], Arch.SM90):
        assert "kEpilogue = 5;" in s.code and "using ElementC = cutlass::bfloat16_t;" in s.code
    tensorop, simt = fp32_residual_configs()
    sources = emit([tensorop, simt], Arch.SM80)
    assert len(sources) == 1 and sources[0].code.count("kEpilogue = 3;") == 2
    assert "cutlass::arch::OpClassSimt" in sources[0].code


def test_emit_refuses_inconsistent_configs():
    cfg = sm90_fused_config()
    with pytest.raises(ValueError):
        emit([cfg], Arch.SM80)
    with pytest.raises(ValueError):  # a fused epilogue without a TMA epilogue schedule cannot compile
        emit([dataclasses.replace(cfg, epilogue_schedule="NoSmemWarpSpecialized")], Arch.SM90)


# ------------------------------------------------------------------------------------------------ cache keys

TINY = """
extern "C" __attribute__((visibility("default"))) int fr_abi_version(void) { return 1; }
__global__ void fr_tiny_kernel(float* x) { x[threadIdx.x] = %s; }
"""


def tiny_source(value: str = "1.0f", code: str | None = None) -> Source:
    cfg = fp32_configs()[0]
    text = code if code is not None else TINY % value
    return Source(name="tiny", arch=Arch.SM80, code=text, configs=(cfg,), symbols=(symbol(cfg),),
                  flags=AMPERE_AND_HOPPER)  # a source carries its targets: the build knows no family


def test_build_key_covers_every_field():
    base = dict(source_text="x", nvcc_version="release 13.0", flags=("-O3",), cutlass_version="4.2.0.0",
                arch="sm_80+sm_90a")
    key = B.build_key(**base)
    assert key == B.build_key(**base) and len(key) == 64
    others = dict(source_text="y", nvcc_version="release 13.1", flags=("-O2",), cutlass_version="4.3.0.0",
                  arch="sm_90a")
    for field, value in others.items():
        assert B.build_key(**(base | {field: value})) != key, field


def test_flags_and_targets_per_template():
    sm80 = emit([fp32_configs()[0]], Arch.SM80)[0]
    sm90 = emit([sm90_fused_config()], Arch.SM90)[0]
    assert B.arch_targets(sm80) == "sm_80+sm_90a" and B.arch_targets(sm90) == "sm_90a"
    for flag in ("-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-fPIC", "-shared"):
        assert flag in B.flags_for(sm80) and flag in B.flags_for(sm90)
    assert not any(f.startswith("-I") for f in B.flags_for(sm80)), "include paths are not keyed"


def test_missing_nvcc_is_not_available(tmp_path):
    with pytest.raises(NotAvailable, match="nvcc"):
        B.build(tiny_source(), str(tmp_path), nvcc=str(tmp_path / "no-such-nvcc"))
    with pytest.raises(NotAvailable):
        B.build_many([tiny_source()], str(tmp_path), jobs=1, nvcc="definitely-not-nvcc-fact-ray")


@pytest.fixture()
def counting_nvcc(tmp_path):
    """The real nvcc behind a wrapper that records each compile (not --version) in a log."""
    real = shutil.which("nvcc")
    log = tmp_path / "nvcc-calls.log"
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *--version*) ;; *) echo "$*" >> "{log}";; esac\n'
                       f'exec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)

    def calls() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    return str(wrapper), calls


@pytest.mark.nvcc
def test_cache_hit_runs_no_compile_and_layout_is_content_addressed(tmp_path, counting_nvcc):
    nvcc, calls = counting_nvcc
    cache = tmp_path / "cache"
    first = B.build(tiny_source("2.0f"), str(cache), nvcc=nvcc)
    assert first.ok and not first.cached and calls() == 1 and first.seconds > 0
    entry = cache / first.key[:2] / first.key
    assert Path(first.path) == entry / "lib.so"
    assert {p.name for p in entry.iterdir()} == {"lib.so", "meta.json", "build.log", "tiny.cu"}
    assert [p.name for p in entry.parent.iterdir()] == [first.key], "no temp folder left behind"
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"] == first.key and meta["ok"] and meta["so_size"] == (entry / "lib.so").stat().st_size
    second = B.build(tiny_source("2.0f"), str(cache), nvcc=nvcc)
    assert second.ok and second.cached and second.key == first.key and second.path == first.path
    assert calls() == 1, "a hit must not compile"
    assert ctypes.CDLL(second.path).fr_abi_version() == 1


@pytest.mark.nvcc
@pytest.mark.parametrize("damage", ["bad_meta", "wrong_key", "truncated_so", "flipped_byte", "missing_so",
                                    "missing_log"])
def test_damaged_entry_is_a_miss_and_is_rebuilt(tmp_path, counting_nvcc, damage):
    nvcc, calls = counting_nvcc
    cache = str(tmp_path / "cache")
    lib = B.build(tiny_source("3.0f"), cache, nvcc=nvcc)
    entry = Path(lib.path).parent
    so, meta = entry / "lib.so", entry / "meta.json"
    if damage == "bad_meta":
        meta.write_text('{"key": ')
    elif damage == "wrong_key":
        meta.write_text(json.dumps(json.loads(meta.read_text()) | {"key": "0" * 64}))
    elif damage == "truncated_so":
        so.write_bytes(so.read_bytes()[:1000])
    elif damage == "flipped_byte":
        data = bytearray(so.read_bytes())
        data[len(data) // 2] ^= 0xFF
        so.write_bytes(bytes(data))
    elif damage == "missing_so":
        so.unlink()
    else:
        (entry / "build.log").unlink()
    assert B.read_entry(cache, lib.key) is None
    again = B.build(tiny_source("3.0f"), cache, nvcc=nvcc)
    assert again.ok and not again.cached and calls() == 2
    assert B.read_entry(cache, lib.key) is not None
    assert B.build(tiny_source("3.0f"), cache, nvcc=nvcc).cached and calls() == 2


@pytest.mark.nvcc
def test_crash_mid_build_leaves_no_entry(tmp_path, counting_nvcc):
    nvcc, calls = counting_nvcc
    cache = tmp_path / "cache"
    src = tiny_source("4.0f")
    key = B.build_key(src.code, B.nvcc_version(nvcc), B.flags_for(src), B.cutlass_version(), B.arch_targets(src))
    # What a build killed while writing leaves: a half-filled temp folder beside the entry.
    stale = cache / key[:2] / f".tmp-{key[:16]}-crashed"
    stale.mkdir(parents=True)
    (stale / "lib.so").write_bytes(b"\x7fELF half")
    assert B.read_entry(str(cache), key) is None
    # A compiler killed by a signal (the OOM killer) is not cached either.
    killer = tmp_path / "killer" / "nvcc"
    killer.parent.mkdir()
    killer.write_text(f'#!/bin/sh\ncase "$*" in *--version*) exec "{shutil.which("nvcc")}" "$@";; esac\n'
                      'kill -9 $$\n')
    killer.chmod(killer.stat().st_mode | stat.S_IEXEC)
    killed = B.build(src, str(cache), nvcc=str(killer))
    assert not killed.ok and killed.key != "" and B.read_entry(str(cache), killed.key) is None
    assert not (cache / killed.key[:2] / killed.key).exists()
    assert str(-signal.SIGKILL) in killed.log
    lib = B.build(src, str(cache), nvcc=nvcc)
    assert lib.ok and not lib.cached and calls() == 1 and lib.key == key
    assert stale.exists(), "foreign temp folders are ignored, not mistaken for entries"


@pytest.mark.nvcc
def test_compile_error_is_a_failed_library_not_an_exception(tmp_path, counting_nvcc):
    nvcc, calls = counting_nvcc
    sm80 = emit([fp32_configs()[0]], Arch.SM80)[0]
    broken = dataclasses.replace(sm80, code=sm80.code + "\nstatic_assert(sizeof(int) == 3, \"planted by the test\");\n")
    lib = B.build(broken, str(tmp_path), nvcc=nvcc)
    assert not lib.ok and lib.path == "" and "planted by the test" in lib.log and "error" in lib.log
    again = B.build(broken, str(tmp_path), nvcc=nvcc)
    assert not again.ok and again.cached and calls() == 1, "a deterministic compile error is cached"


@pytest.mark.nvcc
def test_build_many_compiles_identical_sources_once(tmp_path, counting_nvcc):
    nvcc, calls = counting_nvcc
    a, b = tiny_source("5.0f"), tiny_source("6.0f")
    a2 = dataclasses.replace(a, name="tiny_again")
    libs = B.build_many([a, b, a2], str(tmp_path), jobs=2, nvcc=nvcc)
    assert [lib.source.name for lib in libs] == ["tiny", "tiny", "tiny_again"]
    assert all(lib.ok for lib in libs) and calls() == 2
    assert libs[0].key == libs[2].key != libs[1].key


# One build in a child process: (source, cache, nvcc) pickled in argv[1]; what it got written to argv[2] as JSON.
_BUILD_IN_CHILD = """
import json, pickle, sys
from fact_ray.realize import build as B
source, cache, nvcc = pickle.loads(open(sys.argv[1], "rb").read())
lib = B.build(source, cache, nvcc=nvcc)
open(sys.argv[2], "w").write(json.dumps({"ok": lib.ok, "cached": lib.cached, "path": lib.path}))
"""


def _flock_waiters() -> set[int]:
    """Pids blocked in flock on this host (the `->` lines of /proc/locks)."""
    return {int(line.split()[5]) for line in Path("/proc/locks").read_text().splitlines() if " -> FLOCK " in line}


def _wait_for(what, timeout_s: float = 120.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not (got := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return got


@pytest.mark.nvcc
@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="needs Linux's /proc/locks")
def test_two_processes_missing_the_same_key_compile_it_once(tmp_path):
    """Two builders (xdist workers, the farm's compile tasks on one node) miss the same key together: the second
    waits for the first's compile and takes its entry. The first's nvcc is held at a gate until the second is
    seen blocked on the lock, so the overlap is certain; without the lock the second compiles too."""
    import pickle
    import subprocess
    import sys

    log, gate = tmp_path / "nvcc-calls.log", tmp_path / "gate"
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *--version*) exec "{shutil.which("nvcc")}" "$@";; esac\n'
                       f'echo "$*" >> "{log}"\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\n'
                       f'exec "{shutil.which("nvcc")}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((tiny_source("7.0f"), str(tmp_path / "cache"), str(wrapper))))

    def calls() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    def start(n: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _BUILD_IN_CHILD, str(args), str(tmp_path / f"out{n}.json")])

    first = start(1)
    try:
        _wait_for(lambda: calls() == 1)  # the first is compiling (held at the gate)
        second = start(2)
        try:
            _wait_for(lambda: second.pid in _flock_waiters() or calls() > 1)
            gate.touch()
            assert first.wait(timeout=300) == 0 and second.wait(timeout=300) == 0
        finally:
            second.kill()
    finally:
        gate.touch()
        first.kill()
    assert calls() == 1, "the second builder compiled the same key again"
    one, two = (json.loads((tmp_path / f"out{n}.json").read_text()) for n in (1, 2))
    assert one["ok"] and two["ok"] and one["path"] == two["path"]
    assert (one["cached"], two["cached"]) == (False, True)
    assert ctypes.CDLL(two["path"]).fr_abi_version() == 1


@pytest.mark.nvcc
@pytest.mark.timeout(120)  # a hang guard (a lock outliving its holder would block the build forever)
def test_a_build_lock_held_by_a_dead_process_blocks_nobody(tmp_path, counting_nvcc):
    """The lock is the kernel's flock: a builder killed while holding it (SIGKILL, a lost Ray worker) releases it
    by dying, and the next build goes ahead."""
    import subprocess
    import sys

    nvcc, calls = counting_nvcc
    src, cache = tiny_source("8.0f"), tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fact_ray.realize import build as B\n"
                               "with B.single_flight(sys.argv[1], sys.argv[2]):\n    print(flush=True)\n"
                               "    time.sleep(600)\n", str(cache), B.key_of(src, nvcc)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # it holds the lock now
        holder.kill()
        holder.wait()
    finally:
        holder.kill()
    lib = B.build(src, str(cache), nvcc=nvcc)
    assert lib.ok and not lib.cached and calls() == 1


# ------------------------------------------------------------------------------------------------ real templates


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fact-ray-build-cache"))


@pytest.fixture(scope="session")
def sm80_library(build_cache):
    base, split = fp32_configs()
    # 2.x instances cost ~1-3 s each after the first: one TU covers the fp32 residual (3xTF32 and SIMT, the H200
    # compile error) and the bias-free epilogues as well.
    configs = [base, split, bf16_gelu_config(), *fp32_residual_configs(), *bias_free_configs()]
    sources = emit(configs, Arch.SM80)
    assert len(sources) == 1, "2.x configs of any element and epilogue share a TU"
    return B.build(sources[0], build_cache)


@pytest.fixture(scope="session")
def sm90_library(build_cache):
    sources = emit([sm90_fused_config()], Arch.SM90)
    return B.build(sources[0], build_cache)


def _check_abi(lib):
    assert lib.ok, lib.log[-4000:]
    exported = B.exported_symbols(lib.path)
    wanted = {"fr_abi_version"} | {f"{s}{suffix}" for s in lib.source.symbols
                                    for suffix in ("_workspace", "_can_implement", "_run")}
    assert wanted <= exported
    assert not any("cutlass" in s or "cute" in s for s in exported), "CUTLASS internals stay hidden"
    dll = ctypes.CDLL(lib.path)
    assert dll.fr_abi_version() == 1
    # Bad arguments come back as a cutlass::Status, without touching a GPU: M = 0 is kErrorInvalidProblem (4).
    args = GemmArgs(M=0, N=8, K=8, L=1, split_k=1)
    for sym in set(lib.source.symbols):
        can = getattr(dll, f"{sym}_can_implement")
        can.argtypes = [ctypes.POINTER(GemmArgs)]
        assert can(ctypes.byref(args)) == 4
        run = getattr(dll, f"{sym}_run")
        run.argtypes = [ctypes.POINTER(GemmArgs)]
        assert run(ctypes.byref(args)) == 4
        ws = getattr(dll, f"{sym}_workspace")
        ws.argtypes, ws.restype = [ctypes.POINTER(GemmArgs)], ctypes.c_size_t
        assert ws(ctypes.byref(args)) == 0


@pytest.mark.nvcc
@pytest.mark.slow
def test_sm80_template_compiles_and_exports_the_abi(sm80_library):
    _check_abi(sm80_library)
    assert len(set(sm80_library.source.symbols)) == len(sm80_library.source.symbols) - 1, \
        "the split-K variant shares its base's instance"
    assert any(c.opclass == "simt" and c.epilogue == "bias_residual" for c in sm80_library.source.configs)


@pytest.mark.nvcc
@pytest.mark.slow
def test_sm90_template_compiles_and_exports_the_abi(sm90_library):
    _check_abi(sm90_library)


# ------------------------------------------------------------------------------------------------ ABI mirror


class GemmArgs(ctypes.Structure):
    """fr_gemm_args of fr_abi.h, field for field."""

    _fields_ = [
        ("A", ctypes.c_void_p), ("B", ctypes.c_void_p), ("C", ctypes.c_void_p), ("D", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("M", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("L", ctypes.c_int64),
        ("lda", ctypes.c_int64), ("ldb", ctypes.c_int64), ("ldc", ctypes.c_int64), ("ldd", ctypes.c_int64),
        ("batch_stride_a", ctypes.c_int64), ("batch_stride_b", ctypes.c_int64),
        ("batch_stride_c", ctypes.c_int64), ("batch_stride_d", ctypes.c_int64),
        ("alpha", ctypes.c_float), ("beta", ctypes.c_float),
        ("split_k", ctypes.c_int32), ("sm_count", ctypes.c_int32),
        ("workspace", ctypes.c_void_p), ("workspace_size", ctypes.c_size_t),
        ("stream", ctypes.c_void_p),
    ]


# ------------------------------------------------------------------------------------------------ GPU


def _run_gemm(lib, cfg, problem, split_k=1, seed=0):
    import torch

    torch.manual_seed(seed)
    dt = getattr(torch, problem.dtype)
    dev = "cuda"
    M, N, K = problem.M, problem.N, problem.K
    a = torch.randn(M, K, device=dev).to(dt)
    w = torch.randn(N, K, device=dev).to(dt) / K ** 0.5  # nn.Linear weight [N, K]
    bias = torch.randn(N, device=dev).to(dt)
    residual = torch.randn(M, N, device=dev).to(dt)
    d = torch.full((M, N), float("nan"), device=dev, dtype=dt)
    ref = a.double() @ w.double().T
    if cfg.epilogue in ("bias", "bias_act", "bias_residual"):
        ref = ref + bias.double()
    act = {"none": lambda x: x, "gelu": torch.nn.functional.gelu, "relu": torch.relu,
           "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[cfg.activation]
    ref = act(ref)
    with_c = cfg.epilogue in ("bias_residual", "residual")
    if with_c:
        ref = ref + residual.double()
    args = GemmArgs(A=a.data_ptr(), B=w.data_ptr(), C=residual.data_ptr() if with_c else None, D=d.data_ptr(),
                    bias=bias.data_ptr(), M=M, N=N, K=K, L=1, lda=K, ldb=K, ldc=N, ldd=N, alpha=1.0,
                    beta=1.0 if with_c else 0.0, split_k=split_k, sm_count=0,
                    stream=torch.cuda.current_stream().cuda_stream)
    dll = ctypes.CDLL(lib.path)
    sym = symbol(cfg)
    ws_fn = getattr(dll, f"{sym}_workspace")
    ws_fn.argtypes, ws_fn.restype = [ctypes.POINTER(GemmArgs)], ctypes.c_size_t
    ws = torch.empty(max(1, ws_fn(ctypes.byref(args))), dtype=torch.uint8, device=dev)
    args.workspace, args.workspace_size = ws.data_ptr(), ws.numel()
    run = getattr(dll, f"{sym}_run")
    run.argtypes = [ctypes.POINTER(GemmArgs)]
    assert run(ctypes.byref(args)) == 0
    torch.cuda.synchronize()
    assert not torch.isnan(d).any()
    return float((d.double() - ref).norm() / ref.norm())


@pytest.mark.gpu
@pytest.mark.nvcc
def test_built_kernels_compute_the_gemm(sm80_library, sm90_library):
    import torch

    base, _split = fp32_configs()
    small = GemmProblem(M=256, N=256, K=65536, dtype="float32")
    for split in (1, 8):
        assert _run_gemm(sm80_library, base, small, split_k=split) < Precision.FP32.tolerance
    assert _run_gemm(sm80_library, bf16_gelu_config(), BF16_GELU) < Precision.BF16.tolerance
    for cfg in (*fp32_residual_configs(), *bias_free_configs()):
        p = dataclasses.replace(FP32_RESIDUAL, epilogue=cfg.epilogue, activation=cfg.activation)
        assert _run_gemm(sm80_library, cfg, p) < Precision.FP32.tolerance, cfg.name
    if torch.cuda.get_device_capability() == (9, 0):
        assert _run_gemm(sm90_library, sm90_fused_config(), BF16_GELU_TANH) < Precision.BF16.tolerance
