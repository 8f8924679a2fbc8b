"""The build cache shared by a cluster's nodes, in the pattern table's storage: a fresh node fetches what another
node already built instead of compiling it again.

Layout: `<table URI>/build-cache/<key[:2]>/<key>/{lib.so, build.log, meta.json}`, the same entries as a node's local
cache (`realize.build`), keyed by the same content key (source, nvcc, flags, CUTLASS, arch). A node pulls an entry
into its local cache before it builds (so `build` finds a local hit) and pushes what it built itself.

Whole or nothing: `meta.json` is written last and names the library's size and sha256; an entry without it, or whose
library does not match it, is a miss (and is overwritten by the next push). Only successful builds are shared: a
compile error is cheap to find again and may be the node's own trouble. Being a cache, any storage error is a miss
that is logged (a warning naming the URI), never a failed compile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fact_ray.pattern_table.io import IO_ERRORS, normalise, resolve, write_atomic

log = logging.getLogger("fact_ray.shared_cache")

FILES = ("lib.so", "build.log")  # pushed first; meta.json last


def cache_uri_for_table(table_uri: str) -> str:
    """The shared build cache of a table stored at a URI (s3://, gs://, hdfs://, file://); "" for a plain local path,
    whose nodes are one machine (give file:///nfs/... to share a mounted folder)."""
    t = normalise(table_uri)
    return f"{t}/build-cache" if "://" in t else ""


class SharedBuildCache:
    def __init__(self, uri: str) -> None:
        self.uri = normalise(uri)

    def _entry(self, key: str) -> tuple:
        fs, root = resolve(self.uri)
        return fs, f"{root}/{key[:2]}/{key}"

    def pull(self, key: str, cache_dir: str | os.PathLike) -> bool:
        """Copy the shared entry `key` into the local cache when it is whole there; True when it was."""
        from fact_ray.realize.build import entry_dir, read_entry

        if read_entry(cache_dir, key) is not None:
            return True
        try:
            fs, d = self._entry(key)
            with fs.open_input_stream(f"{d}/meta.json") as f:
                meta = json.loads(f.read())
            if not meta.get("ok"):
                return False
            blobs = {}
            for name in FILES:
                with fs.open_input_stream(f"{d}/{name}") as f:
                    blobs[name] = f.read()
        except FileNotFoundError:
            return False
        except (*IO_ERRORS, ValueError, KeyError) as e:
            log.warning("shared build cache %s: cannot read entry %s (%s); building it here", self.uri, key[:16], e)
            return False
        so = blobs["lib.so"]
        if len(so) != meta.get("so_size") or hashlib.sha256(so).hexdigest() != meta.get("so_sha256"):
            return False  # half pushed or damaged: a miss
        final = entry_dir(cache_dir, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
        try:
            for name, data in blobs.items():
                (tmp / name).write_bytes(data)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.replace(tmp, final)
            except OSError:
                pass  # a local build or pull of the same key got there first: keep it
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return read_entry(cache_dir, key) is not None

    def push(self, key: str, cache_dir: str | os.PathLike) -> bool:
        """Share the local entry `key` (a successful build); True when it is in the shared cache afterwards."""
        from fact_ray.realize.build import entry_dir, read_entry

        meta = read_entry(cache_dir, key)
        if meta is None or not meta.get("ok"):
            return False
        d_local = entry_dir(cache_dir, key)
        try:
            fs, d = self._entry(key)
            fs.create_dir(d, recursive=True)
            for name in FILES:
                write_atomic(fs, f"{d}/{name}", (d_local / name).read_bytes())
            write_atomic(fs, f"{d}/meta.json", (d_local / "meta.json").read_bytes())
        except (*IO_ERRORS, ValueError) as e:
            log.warning("shared build cache %s: cannot store entry %s (%s)", self.uri, key[:16], e)
            return False
        return True
