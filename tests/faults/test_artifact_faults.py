"""Tampered and foreign artifacts (issue 14, item 2, and item 9's manifest without `arch`): every one is refused in
one line, before any of the model's code runs; a library swapped while the model is being imported is never
loaded (the bytes hashed are the bytes loaded); an optional HMAC signature refuses edits and foreign keys.

The artifact is written by hand around a real shared library (gcc) whose load-time constructor writes a marker
file: if that marker appears, planted code ran."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fact_ray import artifact_trust as trust
from fact_ray.artifact import SCHEMA_VERSION, load, read_manifest
from fact_ray.capture import capture, load_model
from fact_ray.compose import graph_hash
from fact_ray.discover import discover
from fact_ray.errors import ArtifactError
from fact_ray.search_spaces import space
from fact_ray.toolchain import detect
from fact_ray.types import Arch, GemmProblem, Precision, to_jsonable

pytestmark = [pytest.mark.faults,
              pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the planted library")]

REPO = Path(__file__).resolve().parents[2]
MODEL_SRC = (REPO / "tests" / "models" / "compose_mlp.py").read_text()
FC1 = GemmProblem(M=16, N=128, K=64, epilogue="bias_act", activation="gelu")

# Model code (get_init_inputs, run on every load) that records that it ran and, when asked, swaps the
# artifact's library for a planted one, as an attacker racing the loader would.
HOOK = textwrap.dedent('''

    _original_init_inputs = get_init_inputs


    def get_init_inputs():
        import os, shutil
        if os.environ.get("FR_TEST_MARK"):
            open(os.environ["FR_TEST_MARK"], "a").write("model code ran\\n")
        if os.environ.get("FR_TEST_SWAP"):
            src, dst = os.environ["FR_TEST_SWAP"].split("|")
            shutil.copyfile(src, dst)
        return _original_init_inputs()
''')


def _so(tmp: Path, name: str, body: str) -> Path:
    c = tmp / f"{name}.c"
    c.write_text(body)
    out = tmp / f"{name}.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(c)], check=True, capture_output=True)
    return out


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv(trust.KEY_ENV, raising=False)
    model = tmp_path / "model.py"
    model.write_text(MODEL_SRC + HOOK)
    benign = _so(tmp_path, "benign", "int fr_abi_version(void) { return 1; }\n")
    planted = _so(tmp_path, "planted", textwrap.dedent(f'''
        #include <stdio.h>
        __attribute__((constructor)) static void planted(void) {{
            FILE *f = fopen("{tmp_path}/PLANTED-CODE-RAN", "w"); if (f) fclose(f); }}
        int fr_abi_version(void) {{ return 1; }}
    '''))
    loaded = load_model(str(model))
    captured = capture(loaded)
    fc1 = next(m for m in discover(captured.graph, Arch.SM80, Precision.FP32) if m.rule == "linear_bias_act")
    cfg = next(c for c in space(FC1, Arch.SM80, Precision.FP32) if c.opclass == "simt" and c.split_k == 1)
    digest = hashlib.sha256(benign.read_bytes()).hexdigest()
    art = tmp_path / "art"
    (art / "libs").mkdir(parents=True)
    shutil.copyfile(benign, art / "libs" / f"{digest}.so")
    here = detect(nvcc=None)
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "fact-ray-composition", "created_at": "",
        "model": {"name": loaded.name, "hash": loaded.model_hash, "graph_hash": graph_hash(captured.graph),
                  "capture": captured.method},
        "arch": "sm80", "gpu": "", "toolchain": {"torch": here.torch, "cutlass": here.cutlass, "nvcc": "",
                                                 "bench_method": ""},
        "policy": "fp32", "check": None, "kept": [],
        "patterns": [{"match_key": fc1.key, "rule": fc1.rule, "family": fc1.family, "anchor": fc1.anchor,
                      "nodes": list(fc1.nodes), "op": "x", "config": to_jsonable(cfg), "problem": to_jsonable(FC1),
                      "library": f"libs/{digest}.so", "sha256": digest, "symbol": "fr_x", "speedup": 1.5}],
    }
    (art / "manifest.json").write_text(json.dumps(manifest))
    mark = tmp_path / "model-code-ran"
    mark.unlink(missing_ok=True)
    monkeypatch.setenv("FR_TEST_MARK", str(mark))
    return dict(art=art, model=str(model), manifest=manifest, digest=digest, planted=planted, mark=mark,
                planted_mark=tmp_path / "PLANTED-CODE-RAN", tmp=tmp_path)


def _edit(s, **patch):
    m = json.loads(json.dumps(s["manifest"]))
    m["patterns"][0].update(patch)
    (s["art"] / "manifest.json").write_text(json.dumps(m))
    return m


def _refused(s, match, **kw):
    with pytest.raises(ArtifactError, match=match) as e:
        load(s["art"], s["model"], expect_arch="sm80", **kw)
    assert "\n" not in str(e.value), "one line"
    assert not s["mark"].exists(), "refused before any model code ran"
    assert not s["planted_mark"].exists(), "no planted code ran"
    return e.value


def test_the_untampered_artifact_gets_as_far_as_loading_its_library(setup):
    # The benign library lacks the GEMM symbols, so compose refuses it (one line): everything before passed.
    with pytest.raises(ArtifactError, match="lacks (a symbol of )?fr_x"):
        load(setup["art"], setup["model"], expect_arch="sm80")
    assert setup["mark"].exists()


def test_dotdot_library_name_is_refused(setup):
    outside = setup["tmp"] / "outside.so"
    shutil.copyfile(setup["planted"], outside)
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    _edit(setup, library="../outside.so", sha256=digest)
    _refused(setup, "not libs/<its sha256>.so")


def test_absolute_library_path_is_refused(setup):
    digest = hashlib.sha256(setup["planted"].read_bytes()).hexdigest()
    _edit(setup, library=str(setup["planted"]), sha256=digest)
    _refused(setup, "not libs/<its sha256>.so")


def test_name_that_is_not_its_hash_is_refused(setup):
    other = "0" * 64
    shutil.copyfile(setup["art"] / "libs" / f"{setup['digest']}.so", setup["art"] / "libs" / f"{other}.so")
    _edit(setup, library=f"libs/{other}.so")
    _refused(setup, "not libs/<its sha256>.so")


def test_edited_hash_is_refused(setup):
    # The attacker replaces the library and edits the manifest's hash to match (name no longer matches).
    digest = hashlib.sha256(setup["planted"].read_bytes()).hexdigest()
    _edit(setup, sha256=digest)
    _refused(setup, "not libs/<its sha256>.so")
    # ... or renames it too: then it is a consistent unsigned artifact, which only a signature can refuse.
    shutil.copyfile(setup["planted"], setup["art"] / "libs" / f"{digest}.so")
    _edit(setup, sha256=digest, library=f"libs/{digest}.so")
    _refused(setup, "not signed", key=b"team-key")


def test_swapped_library_bytes_are_refused(setup):
    shutil.copyfile(setup["planted"], setup["art"] / "libs" / f"{setup['digest']}.so")
    _refused(setup, "is damaged")


def test_library_that_is_a_link_is_refused(setup):
    lib = setup["art"] / "libs" / f"{setup['digest']}.so"
    lib.unlink()
    lib.symlink_to(setup["tmp"] / "benign.so")
    _refused(setup, "link is refused")


def test_library_swapped_while_the_model_imports_is_never_loaded(setup, monkeypatch):
    lib = setup["art"] / "libs" / f"{setup['digest']}.so"
    monkeypatch.setenv("FR_TEST_SWAP", f"{setup['planted']}|{lib}")
    with pytest.raises(ArtifactError, match="lacks (a symbol of )?fr_x"):
        load(setup["art"], setup["model"], expect_arch="sm80")
    assert setup["mark"].exists() and lib.read_bytes() == setup["planted"].read_bytes(), "the swap happened"
    assert not setup["planted_mark"].exists(), "the swapped-in library was loaded: its constructor ran"


def test_manifest_without_arch_or_with_junk_is_one_line(setup):
    m = dict(setup["manifest"])
    del m["arch"]
    (setup["art"] / "manifest.json").write_text(json.dumps(m))
    _refused(setup, "no valid 'arch'")
    (setup["art"] / "manifest.json").write_text(json.dumps({**setup["manifest"], "patterns": [{"rule": "x"}]}))
    _refused(setup, "lacks one of")
    (setup["art"] / "manifest.json").write_bytes(b"\xff\xfe not json")
    _refused(setup, "cannot be read")


def test_signature_refuses_edits_and_other_keys(setup, monkeypatch):
    raw = (setup["art"] / "manifest.json").read_bytes()
    (setup["art"] / trust.SIGNATURE).write_text(trust.signature_of(raw, b"team-key"))
    assert read_manifest(setup["art"], key=b"team-key")["arch"] == "sm80"
    _refused(setup, "bad signature", key=b"another-key")
    monkeypatch.setenv(trust.KEY_ENV, "another-key")
    _refused(setup, "bad signature")
    monkeypatch.setenv(trust.KEY_ENV, "team-key")
    (setup["art"] / "manifest.json").write_bytes(raw.replace(b'"speedup": 1.5', b'"speedup": 9.5'))
    _refused(setup, "bad signature")


def test_cli_load_of_a_tampered_artifact_is_one_line_and_exit_2(setup):
    _edit(setup, library="../x.so")
    out = subprocess.run([sys.executable, "-m", "fact_ray.cli", "compose", setup["model"], "--load",
                          str(setup["art"]), "--arch", "sm80"], capture_output=True, text=True, cwd=setup["tmp"],
                         timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and "not libs/<its sha256>.so" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_shape_dispatch_naming_a_bucket_outside_the_artifact_is_refused(setup):
    from fact_ray import shapes

    (setup["art"] / shapes.DISPATCH_FILE).write_text(json.dumps({
        "kind": shapes.DISPATCH_KIND, "schema_version": shapes.DISPATCH_SCHEMA, "rule": shapes.RULE,
        "buckets": [{"shapes": [[2, 8, 64]], "artifact": "../elsewhere"}]}))
    _refused(setup, "bucket artifact '../elsewhere' is not a folder name inside the artifact")


def test_every_bucket_is_checked_before_model_code_runs(setup):
    from fact_ray import shapes

    bucket = setup["art"] / "b0"
    shutil.copytree(setup["art"], bucket)
    shutil.copyfile(setup["planted"], bucket / "libs" / f"{setup['digest']}.so")  # a swapped library
    (setup["art"] / shapes.DISPATCH_FILE).write_text(json.dumps({
        "kind": shapes.DISPATCH_KIND, "schema_version": shapes.DISPATCH_SCHEMA, "rule": shapes.RULE,
        "buckets": [{"shapes": [[2, 8, 64]], "artifact": "b0"}]}))
    _refused(setup, "is damaged")
