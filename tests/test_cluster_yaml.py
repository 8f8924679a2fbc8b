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
