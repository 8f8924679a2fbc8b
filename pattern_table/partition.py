"""The table's partitioned layout, which files are live, and key lookups that read only what a key can be in.

Layout under the table's root::

    rows/<time>-<uuid>.parquet                              flat commits (all tables before partitioning, and
                                                             commits whose rows span several partitions)
    parts/arch=<a>/policy=<p>/rule=<r>/<time>-<uuid>.parquet a commit whose rows share one partition
    parts/arch=<a>/policy=<p>/rule=<r>/c-<time>-<uuid>.parquet a compacted file (see `pattern_table.compact`)
    _generations/<n>.json                                   which compacted files are live, which files they replaced

Why arch / policy / rule: every key names all three (the rule is the first field of a match key), so a winner
lookup lists one folder and never opens another partition's files; inside the folder, `pyarrow.dataset` pushes the
match-key filter down to the Parquet row groups' statistics. A commit spanning partitions goes to `rows/` whole,
so a reader still sees every commit whole or not at all.

Liveness (what makes compaction crash-safe): a compacted file counts only once a generation lists it, and a file a
generation lists as replaced no longer counts even while it is still on disk. The generation file is written in one
atomic step after the compacted files are complete and verified, so at every instant a reader counts each row
exactly once: before that step the inputs, after it the compacted files. Readers read the generation before and
after listing and list again when it moved.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pyarrow.fs as pafs

from fact_ray.pattern_table.io import IO_ERRORS, write_atomic

ROWS = "rows"
PARTS = "parts"
GENERATIONS = "_generations"
COMPACTED_PREFIX = "c-"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")


def _safe(value: str) -> str:
    """A partition value as a folder name: rule, policy and arch names are plain words, anything else is escaped."""
    return _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", value) or "_"


def rule_of(match_key: str) -> str:
    """The rule a match key starts with (`Match.key` is `rule|shapes|dtype|params`)."""
    return match_key.split("|", 1)[0]


def partition_dir(arch: str, policy: str, rule: str) -> str:
    """The folder (relative to the table root) that holds the rows of this arch, policy and rule."""
    return f"{PARTS}/arch={_safe(arch)}/policy={_safe(policy)}/rule={_safe(rule)}"


def partition_of_row(row) -> str:
    return partition_dir(row.arch.value, row.policy.value, row.rule)


def partition_of_key(key) -> str:
    return partition_dir(key.arch.value, key.policy.value, rule_of(key.match_key))


def commit_dir(rows: Sequence) -> str:
    """Where a commit of `rows` goes: its partition when every row shares one, else the flat folder (one file, so
    the commit stays atomic)."""
    dirs = {partition_of_row(r) for r in rows}
    return dirs.pop() if len(dirs) == 1 else ROWS


def is_compacted(relpath: str) -> bool:
    return relpath.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)


# ------------------------------------------------------------------------------------------------ generations


@dataclass(frozen=True)
class Generation:
    """One state of compaction: the compacted files that count, and the files they replaced (gone or going)."""

    number: int = 0
    compacted: frozenset[str] = field(default_factory=frozenset)  # relpaths of live compacted files
    replaced: frozenset[str] = field(default_factory=frozenset)  # relpaths that no longer count

    def counts(self, relpath: str) -> bool:
        if is_compacted(relpath):
            return relpath in self.compacted
        return relpath not in self.replaced

    def to_json(self) -> bytes:
        return json.dumps({"generation": self.number, "compacted": sorted(self.compacted),
                           "replaced": sorted(self.replaced)}, indent=1).encode()


def _gen_name(n: int) -> str:
    return f"{n:012d}.json"


def read_generation(fs: pafs.FileSystem, root: str) -> Generation:
    """The newest generation (an empty one for a table never compacted). A generation file is written whole (temp
    name + move, or one PUT), so one that does not parse was not written by us and is an error, not skipped:
    skipping it would resurrect replaced files and count their rows twice."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{GENERATIONS}", allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and re.fullmatch(r"\d{12}\.json",
                                                                                              i.base_name))
    if not names:
        return Generation()
    with fs.open_input_stream(f"{root}/{GENERATIONS}/{names[-1]}") as f:
        data = json.loads(f.read())
    return Generation(int(data["generation"]), frozenset(data["compacted"]), frozenset(data["replaced"]))


def write_generation(fs: pafs.FileSystem, root: str, gen: Generation) -> None:
    fs.create_dir(f"{root}/{GENERATIONS}", recursive=True)
    write_atomic(fs, f"{root}/{GENERATIONS}/{_gen_name(gen.number)}", gen.to_json())


def prune_generations(fs: pafs.FileSystem, root: str, keep_from: int) -> None:
    """Remove generation files older than `keep_from` (a reader that read one of them retries on the change)."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{GENERATIONS}", allow_not_found=True))
    for i in infos:
        if re.fullmatch(r"\d{12}\.json", i.base_name) and int(i.base_name[:12]) < keep_from:
            try:
                fs.delete_file(i.path)
            except IO_ERRORS:
                pass  # left for the next compaction: an old generation is never read while a newer one exists


# ------------------------------------------------------------------------------------------------ listing


def _parquet_files(fs: pafs.FileSystem, root: str, folder: str, recursive: bool) -> list[str]:
    """Relpaths of the visible Parquet files under `folder` (hidden temporaries and probes start with '.')."""
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", allow_not_found=True, recursive=recursive))
    prefix = root.rstrip("/") + "/"
    out = []
    for i in infos:
        if i.type != pafs.FileType.File or i.base_name.startswith((".", "_")) or not i.base_name.endswith(".parquet"):
            continue
        out.append(i.path[len(prefix):] if i.path.startswith(prefix) else f"{folder}/{i.path.rsplit('/', 1)[-1]}")
    return out


def live_files(fs: pafs.FileSystem, root: str, folders: Iterable[tuple[str, bool]] | None = None,
               attempts: int = 5) -> tuple[Generation, list[str]]:
    """The generation and the relpaths that count under `folders` ((folder, recursive) pairs; default: the flat
    folder and every partition). Lists between two reads of the generation and lists again when a compaction
    committed meanwhile, so a reader never counts a row twice or misses one."""
    folders = list(folders) if folders is not None else [(ROWS, False), (PARTS, True)]
    for _ in range(attempts):
        gen = read_generation(fs, root)
        files = [p for folder, rec in folders for p in _parquet_files(fs, root, folder, rec)]
        if read_generation(fs, root).number == gen.number:
            return gen, sorted(p for p in files if gen.counts(p))
    raise OSError(f"the table at {root} is being compacted faster than it can be listed; try again")


def key_folders(key) -> list[tuple[str, bool]]:
    """The folders a key's rows can be in: its partition and the flat folder."""
    return [(ROWS, False), (partition_of_key(key), False)]
