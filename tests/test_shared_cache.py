"""The cluster's shared build cache in the table's storage (a file:// URI here, as on NFS; s3:// the same through
pyarrow): a node with an empty local cache gets what another node built, through the farm's own compile fan-out on a
real local Ray, with no second compile; a half-pushed or damaged shared entry is a miss, never wrong bytes."""

from __future__ import annotations

import hashlib

import pytest
import ray

from fact_ray.actors.compile import compile_all
from fact_ray.realize.build import entry_dir, key_of
from fact_ray.realize.norm import emit_norm
from fact_ray.shared_cache import SharedBuildCache, cache_uri_for_table

pytestmark = [pytest.mark.nvcc]


def test_table_uris_share_a_build_cache_and_local_paths_do_not():
    assert cache_uri_for_table("s3://bucket/fact-ray/table") == "s3://bucket/fact-ray/table/build-cache"
    assert cache_uri_for_table("file:///nfs/table/") == "file:///nfs/table/build-cache"
    assert cache_uri_for_table(".fact-ray/pattern_table") == ""


def test_a_fresh_node_gets_what_another_built_without_compiling(tmp_path):
    source = emit_norm("float16")  # a real template's unit that compiles in seconds: the subject is the cache
    shared = f"file://{tmp_path / 'table' / 'build-cache'}"
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        (first,) = compile_all([source], str(tmp_path / "node-a"), shared=shared)
        assert first.ok and not first.library.cached
        (second,) = compile_all([source], str(tmp_path / "node-b"), shared=shared)  # an empty local cache
        assert second.ok and second.library.cached  # pulled, not compiled
        assert second.so_sha256 == first.so_sha256
        assert hashlib.sha256(ray.get(second.so_ref)).hexdigest() == first.so_sha256
    finally:
        ray.shutdown()
    # A shared entry whose library does not match its meta.json (a push cut off, a damaged copy) is a miss.
    key = key_of(source)
    remote = SharedBuildCache(shared)
    so = tmp_path / "table" / "build-cache" / key[:2] / key / "lib.so"
    so.write_bytes(so.read_bytes()[:1000])
    assert not remote.pull(key, str(tmp_path / "node-c"))
    assert not entry_dir(str(tmp_path / "node-c"), key).exists()
    # ... and the next push from a node that has it whole repairs it.
    assert remote.push(key, str(tmp_path / "node-a"))
    assert remote.pull(key, str(tmp_path / "node-c"))
