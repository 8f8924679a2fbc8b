"""The night in a real sqlite MLflow store and its model registry: the production alias moves only on a clean
night, rollback restores the previous artifact, `fact_ray.load` takes a models:/ URI, `compare --model` finds one
model's runs by its tags, and the night's report files (JSON, HTML, PNG) say what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fact_ray import night_tracking as nt
from fact_ray import report_html
from fact_ray.errors import UserError
from fact_ray.nightly import KeyVerdict, ModelNight, NightReport

MODEL = str(Path(__file__).parent / "models" / "compose_mlp.py")
FACT_RAY = str(Path(sys.executable).parent / "fact-ray")


def _verdict(regressed=False, invalidated=False, winner="k_new") -> KeyVerdict:
    return KeyVerdict(match_key="linear|16x64|float32|M=16", rule="linear", shapes="16x64;128x64", previous="k_old",
                      previous_ms=1.0, previous_speedup=2.0, winner=winner, winner_ms=1.5 if regressed else 0.9,
                      baseline_ms=2.0, speedup=2.0 / (1.5 if regressed else 0.9), rel_err=3e-7,
                      incumbent_ms=1.5 if regressed else 1.0, changed=winner != "k_old", regressed=regressed,
                      invalidated=invalidated, note="incumbent k_old 1 -> 1.5 ms" if regressed else "")


def _night(night: str, *verdicts: KeyVerdict, run_id: str = "", gpus: int = 1) -> NightReport:
    return NightReport(fleet="prod", night=night, started=f"{night}T02:00:00+00:00", seconds=100.0, gpus=gpus,
                       threshold=0.05, models=(ModelNight("mlp", "fp32", "sm90", "NVIDIA H200", verdicts,
                                                          mlflow_run_id=run_id),))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in the test's folder
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="module")
def kernel(fc1_gelu_kernel):
    """One real sm80 build of compose_mlp's fc1 + GELU kernel (the one tests/test_compose.py composes)."""
    return fc1_gelu_kernel


def _artifact_folder(tmp_path: Path, tag: str, kernel) -> str:
    """A real fact-ray artifact (one kernel), saved unchecked since there is no GPU here: loadable on a CPU."""
    from fact_ray.artifact import save
    from fact_ray.capture import capture, load_model
    from fact_ray.compose import compose
    from fact_ray.discover import discover
    from fact_ray.types import Arch, Precision

    captured = capture(load_model(MODEL))
    matches = discover(captured.graph, Arch.SM80, Precision.FP32)
    fc1 = next(m for m in matches if m.rule == "linear_bias_act")
    module = compose(captured, matches, {fc1.key: kernel}, Precision.FP32)
    path = save(module, tmp_path / f"art-{tag}", allow_unchecked=True)
    (path / "night.txt").write_text(tag)  # which night's artifact this is, for the test to tell them apart
    return str(path)


@pytest.mark.nvcc
def test_production_alias_moves_only_on_a_clean_night_and_rollback_restores(store, tmp_path, kernel):
    from mlflow.tracking import MlflowClient

    import fact_ray

    c = MlflowClient(store)
    exp = c.create_experiment("fact-ray")
    name = nt.registered_name("prod", "mlp", "fp32")
    runs = [c.create_run(exp).info.run_id for _ in range(3)]
    clean1, regressed, clean3 = (_night("2026-12-01", _verdict(), run_id=runs[0]),
                                 _night("2026-12-02", _verdict(regressed=True), run_id=runs[1]),
                                 _night("2026-12-03", _verdict(), run_id=runs[2]))
    v1 = nt.register(store, runs[0], _artifact_folder(tmp_path, "night-1", kernel), name)
    assert nt.promote(store, name, v1, clean1)
    v2 = nt.register(store, runs[1], _artifact_folder(tmp_path, "night-2", kernel), name)
    assert not nt.promote(store, name, v2, regressed)  # a regression: the alias stays
    assert str(c.get_model_version_by_alias(name, nt.ALIAS).version) == v1
    assert not nt.promote(store, name, v2, _night("2026-12-02", _verdict(), run_id=runs[1], gpus=0))  # unmeasured
    v3 = nt.register(store, runs[2], _artifact_folder(tmp_path, "night-3", kernel), name)
    assert nt.promote(store, name, v3, clean3)
    got = nt.download(f"models:/{name}@production", store, str(tmp_path / "dl3"))
    assert Path(got, "night.txt").read_text() == "night-3"
    # Rollback: the alias goes back to night 1's version, and loading through the registry gets that artifact.
    assert nt.rollback(store, name) == v1
    assert Path(nt.download(f"models:/{name}@production", store, str(tmp_path / "dl1")), "night.txt").read_text() \
        == "night-1"
    module = fact_ray.load(f"models:/{name}@production", MODEL, tracking_uri=store, expect_arch="sm80")
    assert len(module.fact_ray.replacements) == 1
    with pytest.raises(UserError, match="no earlier production version"):
        nt.rollback(store, name)
    with pytest.raises(UserError, match="not in the registry"):
        nt.download("models:/no-such-model@production", store)


def test_night_run_tags_and_compare_by_model(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from fact_ray.tracking import compare_runs

    c = MlflowClient(store)
    exp = c.create_experiment("fact-ray")
    ids = []
    for i, model in enumerate(("mlp", "other", "mlp")):
        rid = c.create_run(exp, tags={"fact_ray.kind": "run", nt.TAG_MODEL: model, nt.TAG_POLICY: "fp32",
                                      nt.TAG_ARCH: "sm90", nt.TAG_GPU: "NVIDIA H200"}).info.run_id
        c.log_param(rid, "model_name", model)
        ids.append(rid)
    assert nt.model_runs(store, "mlp", "fp32", 5) == [ids[2], ids[0]]  # newest first, only this model
    assert nt.model_runs(store, "mlp", "bf16", 5) == []
    assert nt.model_runs(store, "mlp", "fp32", 1) == [ids[2]]
    assert compare_runs(store, run_ids=nt.model_runs(store, "mlp", "fp32", 5)) == []  # no pattern children yet
    report = _night("2026-12-02", _verdict(regressed=True), run_id=ids[2])
    files = report_html.write(report, tmp_path / "night")
    night_id = nt.log_night(store, report, files)
    run = c.get_run(night_id)
    assert run.data.tags[nt.TAG_FLEET] == "prod" and run.data.tags[nt.TAG_NIGHT] == "2026-12-02"
    assert run.data.metrics["regressions"] == 1.0 and run.info.status == "FAILED"
    assert {a.path for a in c.list_artifacts(night_id)} >= {"night.json", "night.html", "night.png"}
    tagged = c.get_run(ids[2]).data
    assert tagged.tags[nt.TAG_FLEET] == "prod" and tagged.metrics["night_regressions"] == 1.0
    # The CLI: one model's runs, or one clear line when it has none.
    r = subprocess.run([FACT_RAY, "compare", "--model", "nothing-like-it", "--tracking-uri", store],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: no runs of model 'nothing-like-it'")


def test_report_files_flag_regressions_and_the_exit_code(tmp_path):
    report = _night("2026-12-02", _verdict(), _verdict(regressed=True, winner="k_old"))
    files = report_html.write(report, tmp_path)
    doc = json.loads(files.json.read_text())
    assert doc["exit_code"] == 1 and not doc["clean"] and len(doc["models"][0]["patterns"]) == 2
    assert doc["models"][0]["patterns"][1]["regressed"] and doc["models"][0]["patterns"][1]["change_vs_previous"] > 0.4
    page = files.html.read_text()
    assert page.count('<tr class="bad">') == 1 and "REGRESSION" in page and "data:image/png;base64," in page
    assert files.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "REGRESSION" in files.text.read_text() and "1 regressions" in files.text.read_text()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    clean = _night("2026-12-03", _verdict())
    assert clean.exit_code == 0 and "clean" in clean.summary_line()
