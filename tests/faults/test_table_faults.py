"""Faults of the pattern table (issue 14, items 5, 6 and 11's fsync): exports that would replace a link, a special
file or a folder, or that write into the table itself; foreign-version files and rows that cannot be parsed;
a writer killed with SIGKILL mid-commit. Each: a clear outcome, no committed row lost, the next read works."""

from __future__ import annotations

import dataclasses
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fact_ray.errors import TableError
from fact_ray.pattern_table import PatternTable
from fact_ray.pattern_table import io as tio
from fact_ray.pattern_table.export import rows_to_table

from ._rows import KEY, row

pytestmark = pytest.mark.faults


@pytest.fixture
def table(tmp_path):
    t = PatternTable(str(tmp_path / "table"))
    t.commit([row("k1", 1.0), row("k2", 0.5, minutes=1)])
    return t


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fact_ray.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_export_never_replaces_a_link(table, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "link.parquet"
    link.symlink_to(target)
    with pytest.raises(TableError, match="it is a link"):
        table.export(str(link))
    assert link.is_symlink() and target.read_text() == "keep me"


def test_export_never_replaces_a_special_file(table, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # what /dev/null is to a rename: not a regular file
    with pytest.raises(TableError, match="device or special file"):
        table.export(str(fifo))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(TableError, match="a folder"):
        table.export(str(tmp_path))


@pytest.mark.recovers
def test_export_into_the_table_is_refused_and_rows_are_not_doubled(table, tmp_path):
    for inside in (tmp_path / "table" / "rows" / "export.parquet", tmp_path / "table" / "x.parquet"):
        with pytest.raises(TableError, match="inside the pattern table"):
            table.export(str(inside))
        assert not inside.exists()
    assert len(PatternTable(table.uri).all_rows()) == 2
    out = tmp_path / "out.parquet"
    out.write_text("an older export")
    table.export(str(out))  # a regular file is replaced, as before
    assert pq.read_table(out).num_rows == 2


def test_cli_export_to_a_link_is_one_line_exit_2(table, tmp_path):
    link = tmp_path / "l.parquet"
    link.symlink_to(tmp_path / "elsewhere")
    out = _cli("table", "export", str(link), "--table", table.uri, cwd=tmp_path)
    assert out.returncode == 2 and "it is a link" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and link.is_symlink()


@pytest.mark.parametrize("version", [b"0", b"99", b"junk"])
@pytest.mark.recovers
def test_a_foreign_version_file_is_skipped_not_fatal(table, tmp_path, version, rows_checked):
    foreign = pa.schema([pa.field("rule", pa.string())], metadata={b"fact_ray.schema_version": version})
    (tmp_path / "table" / "rows").mkdir(exist_ok=True)  # the flat layout, still read beside the partitions
    pq.write_table(pa.Table.from_pylist([{"rule": "x"}], schema=foreign),
                   tmp_path / "table" / "rows" / "29990101T0Z-foreign.parquet")
    fresh = PatternTable(table.uri)
    with pytest.warns(UserWarning, match="skipping"):
        names = [r.config_name for r in fresh.all_rows()]
    rows_checked(2, sum(n in ("k1", "k2") for n in names))
    assert names == ["k1", "k2"]
    assert fresh.best(KEY).config_name == "k2" and len(fresh.damaged) == 1
    for args in (("table", "list"), ("table", "show", "linear"), ("table", "export", str(tmp_path / "e.jsonl"),
                                                                  "--format", "jsonl")):
        out = _cli(*args, "--table", table.uri, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-1500:]
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 2


@pytest.mark.recovers
def test_a_row_with_malformed_config_json_is_skipped(table, tmp_path, rows_checked):
    bad = [dataclasses.replace(row("bad_json", 0.1, minutes=2), config_json='{"name": "x", '),
           dataclasses.replace(row("bad_field", 0.1, minutes=3), config_json='{"name": "x", "no_such_field": 1}'),
           row("k3", 0.25, minutes=4)]
    (tmp_path / "table" / "rows").mkdir(exist_ok=True)
    pq.write_table(rows_to_table(bad), tmp_path / "table" / "rows" / "29990101T0Z-mixed.parquet")
    fresh = PatternTable(table.uri)
    with pytest.warns(UserWarning, match="skipping row"):
        names = [r.config_name for r in fresh.all_rows()]
    rows_checked(3, sum(n in ("k1", "k2", "k3") for n in names))
    assert names == ["k1", "k2", "k3"], "the bad rows are skipped, the good row of the same file is kept"
    assert fresh.best(KEY).config_name == "k3" and len(fresh.damaged) == 2


def test_write_atomic_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):  # records, then does the real thing
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fs, path = tio.resolve(str(tmp_path / "f.bin"))
    tio.write_atomic(fs, path, b"data" * 1000)
    assert (tmp_path / "f.bin").read_bytes() == b"data" * 1000
    kinds = [k for k, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert ".tmp-" in events[0][1] and events[2][1] == str(tmp_path), "the file, then its folder"


@pytest.mark.recovers
def test_writer_killed_mid_commit_loses_no_committed_row(tmp_path, rows_checked):
    uri = str(tmp_path / "table")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        from faults._rows import row
        from fact_ray.pattern_table import PatternTable
        t = PatternTable({uri!r})
        for i in range(10_000):
            t.commit([row(f"k{{i}}", 1.0 + i, minutes=i)] * 20)
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    committed = -1
    for line in proc.stdout:
        committed = int(line.split()[0])
        if committed >= 30:
            break
    proc.send_signal(signal.SIGKILL)  # mid-commit, or between two: either way nothing committed may be lost
    proc.wait()
    rows = PatternTable(uri).all_rows()
    names = {r.config_name for r in rows}
    found = sum(1 for r in rows if r.config_name in {f"k{i}" for i in range(committed + 1)})
    rows_checked(20 * (committed + 1), found)
    assert {f"k{i}" for i in range(committed + 1)} <= names, "every acknowledged commit is whole"
    assert len(rows) % 20 == 0, "no commit is half there"
    assert PatternTable(uri).damaged == {}
    PatternTable(uri).commit([row("after", 0.1)])  # the next writer works
    assert "after" in {r.config_name for r in PatternTable(uri).all_rows()}
