"""Settings layering and the installed package layout."""
import subprocess
import sys

import pytest

from fact_ray import config
from fact_ray.errors import ConfigError, UnknownArch, UnknownPolicy
from fact_ray.types import Arch, Precision


def test_defaults_are_embedded(tmp_path):
    s = config.load({}, env={}, file=str(tmp_path / "none.toml"))
    assert s.policy is Precision.FP32
    assert s.resolved_tracking_uri.startswith("sqlite:///") and s.resolved_tracking_uri.endswith("mlflow.db")
    assert s.resolved_table_uri.endswith("pattern_table")
    assert s.ray_address == "" and s.llm == "off"


def test_flags_beat_env_beat_file(tmp_path):
    f = tmp_path / "fact-ray.toml"
    f.write_text('policy = "tf32"\nbudget = 4\narch = "sm80"\n')
    s = config.load({}, env={}, file=str(f))
    assert (s.policy, s.budget, s.arch) == (Precision.TF32, 4, Arch.SM80)
    s = config.load({}, env={"FACT_RAY_POLICY": "bf16"}, file=str(f))
    assert s.policy is Precision.BF16 and s.budget == 4
    s = config.load({"policy": "fp16", "budget": None}, env={"FACT_RAY_POLICY": "bf16"}, file=str(f))
    assert s.policy is Precision.FP16 and s.budget == 4


def test_bad_settings_are_typed(tmp_path):
    with pytest.raises(UnknownPolicy):
        config.load({"policy": "fp8"}, env={})
    with pytest.raises(UnknownArch):
        config.load({"arch": "sm75"}, env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        config.load({}, env={}, file=str(bad))


@pytest.mark.parametrize("alias,arch", [("h100", Arch.SM90), ("sm_90a", Arch.SM90), ("A100", Arch.SM80)])
def test_arch_aliases(alias, arch):
    assert config.parse_arch(alias) is arch


def test_namespaced_imports(tmp_path):
    code = ("import fact_ray.actors, fact_ray.search_spaces, fact_ray.pattern_table\n"
            "import importlib.util as u\n"
            "assert u.find_spec('actors') is None and u.find_spec('pattern_table') is None\n"
            "assert u.find_spec('search_spaces') is None\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_importing_the_cli_starts_nothing(tmp_path):
    # no import-time side effects: importing must not pull in torch, ray or mlflow
    code = "import sys, fact_ray.cli; print(sorted(m for m in ('torch','ray','mlflow') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
