"""`fact-ray discover` as a user runs it: a subprocess, one error line and exit 2 for what a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "fact-ray"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FACT_RAY_CONFIG": "/nonexistent/fact-ray.toml"}  # no user config leaks in
    return subprocess.run([str(CLI), "discover", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, words", [
    (["tests/models/does_not_exist.py"], ["does_not_exist.py", "no such file"]),
    (["tests/models/no_model.py"], ["no_model.py", "Model"]),
    (["tests/models/raises_init.py"], ["raises_init.py", "ValueError", "width 7 is not supported"]),
    (["tests/models/untraceable.py"], ["untraceable", "torch.export", "torch.fx"]),
    (["tests/models/float64_matmul.py"], ["float64"]),
    (["--arch", "sm75", "tests/models/small_block.py"], ["sm75"]),
], ids=["missing-file", "no-Model", "model-raises", "untraceable", "float64", "unknown-arch"])
def test_user_errors_are_one_line_and_exit_2(args, words):
    p = run(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_json_lists_the_minigpt_matches():
    p = run("examples/minigpt.py", "--json", "--arch", "sm90", "--policy", "bf16")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    matches = data["matches"]
    assert Counter(m["family"] for m in matches) == Counter(
        {"gemm_bias_residual": 2, "gemm_bias": 1, "gemm_bias_act": 1, "attention": 1, "layernorm": 2})
    assert [m["rank"] for m in matches] == list(range(1, 8))
    assert matches[0]["est_time_s"] >= matches[-1]["est_time_s"]
    att = next(m for m in matches if m["family"] == "attention")
    assert att["params"]["causal"] is True and att["params"]["S"] == 512
