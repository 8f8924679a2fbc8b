"""cluster.yaml is a valid Ray cluster launcher config (checked by Ray's own schema and validator) and says what
the farm needs: GPU worker types, MLflow on the head, fact-ray installed on every node, token auth kept on."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _schema() -> dict:
    return json.loads(Path(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json").read_text())


def test_valid_against_rays_schema_and_validator(config):
    jsonschema.validate(config, _schema())  # the raw file, as written
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks after filling defaults


def test_the_validator_rejects_a_broken_copy(config):
    # The checks above can fail: a misspelt top-level key and a min_workers sum over max_workers are refused.
    bad = copy.deepcopy(config)
    bad["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
    bad = copy.deepcopy(config)
    bad["max_workers"] = 0
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(bad))


def test_gpu_worker_types_for_a100_and_h100(config):
    types = config["available_node_types"]
    gpu = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0}
    instances = {t["node_config"]["InstanceType"].split(".")[0] for t in gpu.values()}
    assert {"p4d", "p5"} <= instances
    assert config["head_node_type"] not in gpu, "the head runs the driver and MLflow, not trials"
    # At least one GPU type stays up, or every run would compile only ("no GPU in the cluster").
    assert sum(t.get("min_workers", 0) for t in gpu.values()) >= 1
    assert config["provider"]["type"] == "aws"


def test_head_runs_mlflow_and_every_node_installs_fact_ray(config):
    head_cmds = " ".join(config["head_start_ray_commands"] + config.get("head_setup_commands", []))
    assert "mlflow server" in head_cmds and "--port 5000" in head_cmds
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "fact-ray" in setup
    assert "nvcc" in setup  # compile nodes need the toolkit
    assert "~/fact-ray" in config["file_mounts"]


def test_token_authentication_stays_on(config):
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any("auth_token" in k for k in config["file_mounts"])
    assert not any("RAY_AUTH_MODE=disabled" in c for c in config["head_start_ray_commands"])


def test_head_mlflow_has_a_database_backend_and_an_object_store_for_artifacts(config):
    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "--backend-store-uri postgresql://" in server and "--artifacts-destination s3://" in server
    setup = " ".join(config["head_setup_commands"])
    assert "postgresql" in setup and "psycopg2" in setup and "boto3" in setup


def test_nightly_schedules_are_ready(config):
    """The cron line, the KubeRay RayJob and its CronJob in deploy/ submit the fleet's re-tune."""
    from fact_ray.fleet import load_fleet

    fleet = load_fleet(ROOT / "deploy" / "fleet.example.toml")
    assert len(fleet.models) >= 4 and all(Path(m.ref).is_file() for m in fleet.models)
    (line,) = [ln for ln in (ROOT / "deploy" / "cron" / "nightly.cron").read_text().splitlines()
               if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    fields = line.split(None, 5)
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    assert "ray job submit" in fields[5] and "fact-ray retune --fleet deploy/fleet.example.toml" in fields[5]
    rayjob = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob-nightly.yaml").read_text())
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["entrypoint"].startswith("fact-ray retune --fleet")
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for w in workers)
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "cronjob-nightly.yaml").read_text()))
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["schedule"] == "30 2 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert "kubectl create -f -" in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["rules"][0]["resources"] == ["rayjobs"] and "create" in role["rules"][0]["verbs"]
