"""The pattern table on real Parquet files in a temporary folder: no GPU, no nvcc, no mocks."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from fact_ray.errors import TableError
from fact_ray.pattern_table import (
    SCHEMA_VERSION,
    PatternTable,
    RowContext,
    TableKey,
    TableRow,
    Toolchain,
    format_rows,
    row_from_trial,
    row_from_winner,
)
from fact_ray.pattern_table.schema import SCHEMA
from fact_ray.types import Arch, KernelConfig, Match, Precision, TimeStats, Trial, Winner

TC = Toolchain(cuda="13.0", cutlass="4.2.0", torch="2.13.0", bench_method="1")
T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)

MATCH = Match(rule="linear", family="gemm", nodes=("linear",), anchor="linear",
              params=(("M", 64), ("N", 128), ("K", 256)), dtype="float32", shapes=((64, 256), (128, 256)))
OTHER = Match(rule="linear", family="gemm", nodes=("linear",), anchor="linear",
              params=(("M", 32), ("N", 128), ("K", 256)), dtype="float32", shapes=((32, 256), (128, 256)))


def _config(name: str) -> KernelConfig:
    return KernelConfig(template="sm80_gemm", name=name, arch=Arch.SM80, precision=Precision.FP32, element="float",
                        opclass="simt", math_op="multiply_add", instruction=(1, 1, 1), tile=(128, 128, 8),
                        warps=(4, 2, 1), stages=3, alignment=(1, 1, 1))


def _trial(name: str, median: float | None, status: str = "ok", baseline: float = 2.0, error: str = "") -> Trial:
    time = None if median is None else TimeStats(median, median * 0.9, median * 1.1, 50)
    return Trial(candidate_name=name, status=status, error=error, rel_err=1e-7 if median else float("nan"),
                 max_abs_err=2e-6 if median else float("nan"), time=time,
                 baseline=TimeStats(baseline, baseline * 0.95, baseline * 1.05, 50), tflops=1.5)


def _row(name: str, median: float | None, *, minutes: int = 0, status: str = "ok", match: Match = MATCH,
         policy: Precision = Precision.FP32, arch: Arch = Arch.SM80, toolchain: Toolchain = TC,
         gpu: str | None = "NVIDIA A100", baseline: float = 2.0, run: str = "run-1") -> TableRow:
    return row_from_trial(
        _trial(name, median, status, baseline), match, RowContext(toolchain, run, gpu, "node-1"),
        policy=policy, arch=arch, config=None if name == "torch" else _config(name),
        created_at=T0 + timedelta(minutes=minutes),
    )


KEY = TableKey.of(MATCH.key, "fp32", "sm80", TC)


# ------------------------------------------------------------------------------------------- round trip


def test_round_trip_and_reload(tmp_path):
    cfg = _config("k_fast")
    winner = Winner(MATCH.key, MATCH.rule, Precision.FP32, Arch.SM80, cfg, _trial("k_fast", 1.0), library_key="lk1")
    torch_stays = Winner(OTHER.key, OTHER.rule, Precision.FP32, Arch.SM80, None, _trial("torch", 2.0))
    ctx = RowContext(TC, run_id="run-7", gpu_name="NVIDIA A100", host="node-3")
    rows = [
        row_from_winner(winner, MATCH, ctx, library_uri=str(tmp_path / "libs" / ("a" * 64 + ".so")),
                        library_symbol="fr_k_fast", created_at=T0),
        row_from_winner(torch_stays, OTHER, ctx, created_at=T0),
        _row("k_broken", None, status="compile_error", minutes=1),  # NaN errors, no timings
    ]
    table = PatternTable(str(tmp_path / "t"))
    uri = table.commit(rows)
    # One partition (arch, policy, rule) holds the whole commit.
    assert uri.startswith(str(tmp_path / "t" / "parts" / "arch=sm80" / "policy=fp32" / "rule=linear"))
    assert uri.endswith(".parquet")
    assert table.all_rows() == rows

    again = PatternTable(str(tmp_path / "t"))  # a new store object on the same URI reads the files
    got = again.all_rows()
    assert got == rows
    assert got[0].config == cfg and got[0].library_hash == "a" * 64 and got[0].host == "node-3"
    assert got[0].to_winner() == winner
    assert got[1].config is None and got[1].config_name == "torch"
    assert got[2].median_ms is None and got[2].rel_err is None  # NaN stored as null, compares equal
    assert got[0].p10_ms == pytest.approx(0.9) and got[0].baseline_p90_ms == pytest.approx(2.1)
    assert got[0].speedup == pytest.approx(2.0)
    # Sent to another process (a Ray actor) as its URI; reads the same rows there.
    assert pickle.loads(pickle.dumps(again)).all_rows() == rows


def test_reading_a_missing_table_is_empty_and_touches_nothing(tmp_path):
    table = PatternTable(str(tmp_path / "nothing-here"))
    assert table.all_rows() == [] and table.keys() == [] and table.best(KEY) is None
    assert not (tmp_path / "nothing-here").exists()
    assert table.commit([]) == ""


# ------------------------------------------------------------------------------------------- queries


def test_best_top_k_and_history_ordering(tmp_path):
    table = PatternTable(str(tmp_path))
    table.commit([_row("k_slow", 1.5, minutes=0), _row("k_wrong", 0.2, minutes=1, status="wrong")])
    table.commit([_row("k_fast_old", 0.8, minutes=2), _row("k_untimed", None, minutes=3, status="ok")])
    table.commit([_row("k_fast_new", 0.8, minutes=4), _row("torch", 2.0, minutes=5)])
    # Same problem under another policy, arch, toolchain or problem: other keys, never mixed in.
    table.commit([
        _row("k_bf16", 0.1, policy=Precision.BF16), _row("k_sm90", 0.1, arch=Arch.SM90),
        _row("k_newcc", 0.1, toolchain=Toolchain("13.1", "4.2.0", "2.13.0", "1")),
        _row("k_bench2", 0.1, toolchain=Toolchain("13.0", "4.2.0", "2.13.0", "2")),
        _row("k_other", 0.1, match=OTHER),
    ])
    table = PatternTable(str(tmp_path))  # order must come from the data, not from the writer's memory

    best = table.best(KEY)
    assert best is not None and best.config_name == "k_fast_new"  # equal median: the newest wins
    assert [r.config_name for r in table.top_k(KEY, 10)] == ["k_fast_new", "k_fast_old", "k_slow", "torch"]
    assert [r.config_name for r in table.top_k(KEY, 2)] == ["k_fast_new", "k_fast_old"]
    assert [r.config_name for r in table.history(KEY)] == [
        "k_slow", "k_wrong", "k_fast_old", "k_untimed", "k_fast_new", "torch"]
    assert len(table.all_rows()) == 11
    assert len(table.keys()) == 6 and KEY in table.keys()
    assert table.best(TableKey.of(OTHER.key, "fp32", "sm80", TC)).config_name == "k_other"
    assert [r.config_name for r in table.find("k_fast")] == ["k_fast_old", "k_fast_new"]


def test_gpu_name_filters_and_mixed_gpus_rank_by_speedup(tmp_path):
    table = PatternTable(str(tmp_path))
    # H100: 1.0 ms against a 1.6 ms baseline (1.6x); H200: 0.9 ms against 1.0 ms (1.1x). Absolute times of two
    # GPUs are not comparable; the side-by-side speedup is.
    table.commit([
        _row("k_h100", 1.0, arch=Arch.SM90, gpu="NVIDIA H100", baseline=1.6),
        _row("k_h200", 0.9, arch=Arch.SM90, gpu="NVIDIA H200", baseline=1.0),
    ])
    any_gpu = TableKey.of(MATCH.key, "fp32", "sm90", TC)
    assert table.best(any_gpu).config_name == "k_h100"
    assert table.best(TableKey.of(MATCH.key, "fp32", "sm90", TC, gpu_name="NVIDIA H200")).config_name == "k_h200"
    assert len(table.keys(by_gpu=True)) == 2 and table.keys() == [any_gpu]


def test_misses(tmp_path):
    table = PatternTable(str(tmp_path))
    table.commit([_row("k1", 1.0), _row("k_bad", None, status="crashed")])
    for key in (
        TableKey.of("linear|1x1|float32|", "fp32", "sm80", TC),  # unknown match key
        TableKey.of(MATCH.key, "tf32", "sm80", TC),  # other policy
        TableKey.of(MATCH.key, "fp32", "sm80", Toolchain("12.4", "4.2.0", "2.13.0", "1")),  # other toolchain
        TableKey.of(MATCH.key, "fp32", "sm80", TC, gpu_name="NVIDIA H100"),  # a GPU never measured
    ):
        assert table.best(key) is None and table.top_k(key, 3) == [] and table.history(key) == []
    assert table.top_k(KEY, 0) == []


def test_a_key_with_only_failed_rows_has_no_best(tmp_path):
    table = PatternTable(str(tmp_path))
    table.commit([_row("k_bad", None, status="compile_error"), _row("k_wrong", 0.5, status="wrong")])
    assert table.best(KEY) is None and len(table.history(KEY)) == 2


# ------------------------------------------------------------------------------------------- concurrency


def _writer(uri: str, wid: int, n: int, go) -> None:
    go.wait(60)
    table = PatternTable(uri)
    for i in range(n):
        table.commit([_row(f"w{wid}_{i}", 1.0 + i, run=f"w{wid}")])


def test_two_writer_processes_lose_nothing(tmp_path):
    ctx = mp.get_context("spawn")  # no fork of a process that already runs Arrow threads
    go = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 50, go)) for w in range(2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = PatternTable(str(tmp_path)).all_rows()
    names = sorted(r.config_name for r in rows)
    assert names == sorted(f"w{w}_{i}" for w in range(2) for i in range(50))
    files = [f for _, _, fs in os.walk(tmp_path / "parts") for f in fs]
    assert len(files) == 100 and all(f.endswith(".parquet") and not f.startswith(".") for f in files)


# ------------------------------------------------------------------------------------------- damage, versions


def test_truncated_file_is_skipped_with_a_warning(tmp_path):
    table = PatternTable(str(tmp_path))
    good = table.commit([_row("k_good", 1.0)])
    path = table.commit([_row("k_lost", 0.5, minutes=1)])
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # what a copy cut off half-way leaves
        f.write(data[: len(data) // 2])

    fresh = PatternTable(str(tmp_path))
    with pytest.warns(UserWarning, match=os.path.basename(path)):
        rows = fresh.all_rows()
    assert [r.config_name for r in rows] == ["k_good"]
    assert list(fresh.damaged) == [path] and good not in fresh.damaged
    assert fresh.best(KEY).config_name == "k_good"  # queries keep working


def _v1_schema() -> pa.Schema:
    """The v1 layout, written out by hand (not taken from the package): one timing per row, no library storage,
    no GPU name, no host."""
    s, f = pa.string(), pa.float64()
    cols = [
        ("rule", s), ("match_key", s), ("shape_signature", s), ("dtype", s), ("policy", s), ("arch", s),
        ("cuda_version", s), ("cutlass_version", s), ("torch_version", s), ("bench_method", s), ("toolchain", s),
        ("config_json", s), ("config_name", s), ("library_key", s), ("median_ms", f), ("reps", pa.int64()),
        ("baseline_median_ms", f), ("speedup", f), ("rel_err", f), ("tflops", f), ("status", s), ("error", s),
        ("run_id", s), ("created_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(cols, metadata={b"fact_ray.schema_version": b"1", b"fact_ray.kind": b"pattern_table"})


def test_v1_file_is_read_by_upgrade(tmp_path):
    (tmp_path / "rows").mkdir()
    cfg = _config("k_v1")
    rec = {
        "rule": MATCH.rule, "match_key": MATCH.key, "shape_signature": MATCH.shape_signature, "dtype": "float32",
        "policy": "fp32", "arch": "sm80", "cuda_version": TC.cuda, "cutlass_version": TC.cutlass,
        "torch_version": TC.torch, "bench_method": TC.bench_method, "toolchain": TC.fingerprint,
        "config_json": json.dumps({"name": "k_v1", "template": "sm80_gemm", "arch": "sm80", "precision": "fp32",
                                   "element": "float", "opclass": "simt", "math_op": "multiply_add",
                                   "instruction": [1, 1, 1], "tile": [128, 128, 8], "warps": [4, 2, 1],
                                   "stages": 3}),
        "config_name": "k_v1", "library_key": "lk", "median_ms": 0.7, "reps": 20, "baseline_median_ms": 1.4,
        "speedup": 2.0, "rel_err": 3e-7, "tflops": 2.0, "status": "ok", "error": "", "run_id": "old",
        "created_at": T0,
    }
    pq.write_table(pa.Table.from_pylist([rec], schema=_v1_schema()), tmp_path / "rows" / "20260101T000000Z-v1.parquet")
    table = PatternTable(str(tmp_path))
    table.commit([_row("k_v2", 0.9, minutes=1, baseline=1.0)])

    best = table.best(KEY)  # the v1 row still matches its key, and wins on time and on speedup
    assert best is not None and best.config_name == "k_v1" and best.median_ms == 0.7
    assert best.config == cfg
    assert best.p10_ms is None and best.gpu_name is None and best.library_uri is None and best.host is None
    assert [r.config_name for r in table.history(KEY)] == ["k_v1", "k_v2"]
    assert table.damaged == {}


def test_v2_row_keyed_by_the_nvcc_banner_line_matches_the_key_this_host_builds_now(tmp_path):
    """v2 writers stored nvcc's banner line as the CUDA version; v3 keys by the version it names. An old row is
    read, upgraded in memory (the file is left as written) and keeps matching the same host's key."""
    from fact_ray.toolchain import Host, key_toolchain

    (tmp_path / "rows").mkdir()
    line = "Cuda compilation tools, release 13.0, V13.0.88"
    old_tc = Toolchain(cuda=line, cutlass="4.2.0.0", torch="2.11.0+cu130", bench_method="1")
    rec = {k: v for k, v in _row("k_v2", 0.5, toolchain=old_tc).to_record().items()
           if k not in ("driver", "cublas", "cudnn")}
    v2 = pa.schema([f for f in SCHEMA if f.name in rec],
                   metadata={b"fact_ray.schema_version": b"2", b"fact_ray.kind": b"pattern_table"})
    path = tmp_path / "rows" / "20260101T000000Z-v2.parquet"
    pq.write_table(pa.Table.from_pylist([rec], schema=v2), path)

    now = key_toolchain(Host(nvcc="13.0.88", cutlass="4.2.0.0", torch="2.11.0+cu130"))
    row = PatternTable(str(tmp_path)).best(TableKey.of(MATCH.key, "fp32", "sm80", now))
    assert row is not None and row.config_name == "k_v2" and row.toolchain == now
    assert row.driver is None and row.cublas is None and row.cudnn is None
    assert pq.read_table(path).column("cuda_version").to_pylist() == [line]  # history stays as written


def test_a_row_records_the_driver_cublas_and_cudnn_it_was_timed_with(tmp_path):
    from fact_ray.toolchain import Host

    facts = Host(nvcc="13.0", cutlass="4.2.0", torch="2.13.0", driver="580.95.05", cublas="13.0.2.14",
                 cudnn="91200", gpu_name="NVIDIA A100", capability=(8, 0))
    row = row_from_trial(_trial("k1", 1.0), MATCH, RowContext(TC, "run-1", "NVIDIA A100", "n", facts=facts),
                         policy=Precision.FP32, arch=Arch.SM80, config=_config("k1"), created_at=T0)
    table = PatternTable(str(tmp_path))
    table.commit([row])
    back = PatternTable(str(tmp_path)).best(KEY)
    assert (back.driver, back.cublas, back.cudnn) == ("580.95.05", "13.0.2.14", "91200")
    assert back == row and back.toolchain == TC  # recorded beside the key, not in it


def test_newer_schema_version_is_skipped_naming_both(tmp_path):
    """A file of a newer (or unknown) schema version is skipped with a warning naming both versions; it never
    blocks the rest of the table (issue 14, item 6)."""
    table = PatternTable(str(tmp_path))
    table.commit([_row("k1", 1.0)])
    newer = pa.schema([pa.field("rule", pa.string())],
                      metadata={b"fact_ray.schema_version": str(SCHEMA_VERSION + 1).encode()})
    (tmp_path / "rows").mkdir(exist_ok=True)  # the flat folder: commits now go to their partition
    pq.write_table(pa.Table.from_pylist([{"rule": "x"}], schema=newer), tmp_path / "rows" / "29990101T0Z-new.parquet")
    fresh = PatternTable(str(tmp_path))
    with pytest.warns(UserWarning, match="skipping") as info:
        rows = fresh.all_rows()
    assert [r.config_name for r in rows] == ["k1"]
    msg = str(info[0].message)
    assert f"v{SCHEMA_VERSION + 1}" in msg and f"v{SCHEMA_VERSION}" in msg and "\n" not in msg
    assert len(fresh.damaged) == 1


# ------------------------------------------------------------------------------------------- not writable


def test_unwritable_uri_fails_fast_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    table = PatternTable(str(blocker / "table"))  # a path under a regular file: unwritable even for root
    with pytest.raises(TableError, match="not writable") as info:
        table.check_writable()
    assert "\n" not in str(info.value)
    with pytest.raises(TableError):
        table.commit([_row("k1", 1.0)])
    with pytest.raises(TableError):
        table.put_library(b"\x7fELF")
    assert blocker.read_text() == "not a folder"


def test_read_only_folder_keeps_existing_rows(tmp_path):
    table = PatternTable(str(tmp_path / "t"))
    rows_dir = os.path.dirname(table.commit([_row("k1", 1.0)]))  # the partition's folder
    table.check_writable()  # writable now, and the probe leaves nothing behind
    before = sorted(os.listdir(rows_dir))
    assert len(before) == 1
    os.chmod(rows_dir, 0o555)
    try:
        probe = Path(rows_dir) / "probe"
        try:
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("chmod does not stop writes here (running as root); see the path-under-a-file test")
        with pytest.raises(TableError, match="not writable"):
            table.check_writable()
        with pytest.raises(TableError, match="not writable"):
            table.commit([_row("k2", 0.5)])
        assert sorted(os.listdir(rows_dir)) == before
        assert [r.config_name for r in PatternTable(str(tmp_path / "t")).all_rows()] == ["k1"]
    finally:
        os.chmod(rows_dir, 0o755)


# ------------------------------------------------------------------------------------------- libraries


def test_library_bytes_round_trip(tmp_path):
    table = PatternTable(str(tmp_path / "t"))
    data = bytes(range(256)) * 64
    uri = table.put_library(data)
    assert uri.startswith(str(tmp_path / "t" / "libs") + "/") and uri.endswith(".so")
    assert table.put_library(data) == uri  # content-addressed: the same bytes, the same place
    assert PatternTable(str(tmp_path / "t")).get_library(uri) == data
    assert os.listdir(tmp_path / "t" / "libs") == [os.path.basename(uri)]  # no temp files left

    local = table.fetch_library(uri, str(tmp_path / "node-cache"))
    assert open(local, "rb").read() == data and table.fetch_library(uri, str(tmp_path / "node-cache")) == local

    other = table.put_library(b"other")
    with open(other, "wb") as f:
        f.write(b"changed")  # damaged in storage: refused, never handed out
    with pytest.raises(TableError, match="damaged"):
        table.get_library(other)
    with pytest.raises(TableError):
        table.get_library(str(tmp_path / "t" / "libs" / ("0" * 64 + ".so")))


# ------------------------------------------------------------------------------------------- export and view


def test_export_formats(tmp_path):
    table = PatternTable(str(tmp_path / "t"))
    rows = [_row("k1", 1.0), _row("torch", 2.0, minutes=1), _row("k_bad", None, status="timeout", minutes=2)]
    table.commit(rows)

    pq_path = table.export(str(tmp_path / "out" / "table.parquet"), "parquet")
    t = pq.read_table(pq_path)
    assert t.num_rows == 3 and t.schema.metadata[b"fact_ray.schema_version"] == str(SCHEMA_VERSION).encode()
    assert t.column("config_name").to_pylist() == ["k1", "torch", "k_bad"]

    csv = pacsv.read_csv(table.export(str(tmp_path / "out" / "table.csv"), "csv"))
    assert csv.num_rows == 3 and csv.column("status").to_pylist() == ["ok", "ok", "timeout"]

    lines = open(table.export(str(tmp_path / "out" / "table.jsonl"), "jsonl")).read().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["config_name"] for r in recs] == ["k1", "torch", "k_bad"]
    assert recs[0]["median_ms"] == 1.0 and recs[2]["median_ms"] is None and recs[0]["created_at"].startswith("2026")

    with pytest.raises(TableError, match="format"):
        table.export(str(tmp_path / "out" / "x.xml"), "xml")


def test_format_rows_renders_every_row(tmp_path):
    rows = [_row("k_fast", 0.5), _row("torch", 2.0, minutes=1), _row("k_bad", None, status="crashed", minutes=2)]
    rendered = format_rows(rows)
    assert rendered.row_count == 3
    console = Console(width=250, record=True)
    console.print(rendered)
    text = console.export_text()
    assert "k_fast" in text and "torch (PyTorch op)" in text and "crashed" in text and "[0.45-0.55]" in text
