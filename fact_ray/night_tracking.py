"""The night in MLflow: one tag vocabulary for every run, the night's own run, `compare --model --policy`, and the
composed artifact promoted through the model registry.

Tags (the same names on every fact-ray run, so the MLflow UI's compare view lines runs up):

    fact_ray.model  fact_ray.policy  fact_ray.arch  fact_ray.gpu      on every run (set by tracking.MlflowListener)
    fact_ray.fleet  fact_ray.night                                    added to the runs of a fleet's night

The night's own run (tags fact_ray.kind=night, fleet, night): metrics patterns, changed, regressions, invalidated,
failed, seconds, gpus; artifacts night.json/.txt/.png/.html.

Registry: a model's composed artifact folder is logged to its run under `composed/` and registered as a new version
of the registered model `<fleet>.<model>.<policy>`; the alias `production` moves to it only after a clean night
(verified, no regression). Each move is recorded in the registered model's tag `fact_ray.production_history`, so
rollback moves the alias back to the version before, and `fact_ray.load("models:/<name>@production", model)` loads
what the alias names. Only `MlflowClient` with explicit ids is used (see tracking.py for why).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from fact_ray.errors import RunNotFound, UserError, first_line
from fact_ray.nightly import NightReport

TAG_MODEL, TAG_POLICY, TAG_ARCH, TAG_GPU = "fact_ray.model", "fact_ray.policy", "fact_ray.arch", "fact_ray.gpu"
TAG_FLEET, TAG_NIGHT = "fact_ray.fleet", "fact_ray.night"
ALIAS = "production"
HISTORY_TAG = "fact_ray.production_history"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_night(uri: str, report: NightReport, files: Any, experiment: str = "fact-ray") -> str:
    """Tag the night's model runs with fleet and night, and log the night's own run; returns its id."""
    from fact_ray.tracking import _experiment_id

    c = _client(uri)
    for m in report.models:
        if m.mlflow_run_id:
            c.set_tag(m.mlflow_run_id, TAG_FLEET, report.fleet)
            c.set_tag(m.mlflow_run_id, TAG_NIGHT, report.night)
            c.log_metric(m.mlflow_run_id, "night_regressions", sum(v.regressed for v in m.verdicts))
            c.log_metric(m.mlflow_run_id, "night_changed", sum(v.changed for v in m.verdicts))
    exp = _experiment_id(c, experiment, create=True)
    run = c.create_run(exp, run_name=f"night {report.fleet} {report.night}",
                       tags={"fact_ray.kind": "night", TAG_FLEET: report.fleet, TAG_NIGHT: report.night,
                             "fact_ray.clean": str(report.clean).lower()})
    rid = run.info.run_id
    metrics = {"patterns": sum(len(m.verdicts) for m in report.models),
               "changed": sum(v.changed for m in report.models for v in m.verdicts),
               "regressions": len(report.regressions), "invalidated": len(report.invalidations),
               "failed": len(report.failures), "seconds": report.seconds, "gpus": report.gpus}
    for k, v in metrics.items():
        c.log_metric(rid, k, float(v))
    for path in (files.json, files.text, files.png, files.html):
        if path is not None:
            c.log_artifact(rid, str(path))
    c.set_terminated(rid, "FINISHED" if report.clean else "FAILED")
    return rid


def model_runs(uri: str, model: str, policy: str, nights: int, experiment: str = "fact-ray") -> list[str]:
    """The MLflow run ids of `model` under `policy`, newest first, at most `nights` (search_runs on the tags)."""
    from fact_ray.tracking import _experiment_id

    c = _client(uri)
    exp = _experiment_id(c, experiment, create=False)
    if exp is None:
        return []
    q = (f"tags.`fact_ray.kind` = 'run' and tags.`{TAG_MODEL}` = '{_quote(model)}' and "
         f"tags.`{TAG_POLICY}` = '{_quote(policy)}'")
    runs = c.search_runs([exp], q, order_by=["attributes.start_time DESC"], max_results=max(nights, 1))
    return [r.info.run_id for r in runs]


def _quote(s: str) -> str:
    if "'" in s:
        raise UserError(f"{s!r}: a model or policy name with a quote cannot be searched for")
    return s


# --------------------------------------------------------------------------------------------- registry


def registered_name(fleet: str, model: str, policy: str) -> str:
    return f"{fleet}.{model}.{policy}".replace("/", "_").replace(" ", "_")


def register(uri: str, run_id: str, artifact_dir: str, name: str) -> str:
    """Log the artifact folder to `run_id` under composed/ and register it as a new version of `name`."""
    from mlflow.exceptions import MlflowException

    c = _client(uri)
    c.log_artifacts(run_id, str(artifact_dir), "composed")
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, tags={"fact_ray.kind": "composed"})
    source = c.get_run(run_id).info.artifact_uri.rstrip("/") + "/composed"
    return str(c.create_model_version(name, source=source, run_id=run_id).version)


def _history(c: Any, name: str) -> list[str]:
    return json.loads(c.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def promote(uri: str, name: str, version: str, report: NightReport) -> bool:
    """Move the `production` alias to `version` when the night was clean; False (the alias stays) otherwise."""
    if not report.clean or not report.gpus:
        return False
    c = _client(uri)
    hist = _history(c, name)
    if hist and hist[-1] == str(version):
        return True
    c.set_registered_model_alias(name, ALIAS, str(version))
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*hist, str(version)]))
    return True


def rollback(uri: str, name: str) -> str:
    """Move `production` back to the version it named before the last move; returns that version."""
    c = _client(uri)
    hist = _history(c, name)
    if len(hist) < 2:
        raise UserError(f"registered model {name}: no earlier production version to roll back to")
    c.set_registered_model_alias(name, ALIAS, hist[-2])
    c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist[:-1]))
    return hist[-2]


def download(models_uri: str, tracking_uri: str, dst: str | None = None) -> str:
    """The local folder of a `models:/<name>@<alias>` or `models:/<name>/<version>` artifact."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    rest = models_uri.removeprefix("models:/")
    c = _client(tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, _, version = rest.partition("/")
            mv = c.get_model_version(name, version)
        return mlflow.artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=tracking_uri,
                                                   dst_path=dst or tempfile.mkdtemp(prefix="fact-ray-model-"))
    except MlflowException as e:
        raise RunNotFound(f"{models_uri}: not in the registry of {tracking_uri} "
                          f"({first_line(e, named=False)})") from None


def default_tracking_uri() -> str:
    from fact_ray.config import load

    return os.environ.get("MLFLOW_TRACKING_URI") or load().resolved_tracking_uri
