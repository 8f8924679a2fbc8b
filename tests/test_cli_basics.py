"""The CLI's shape: every subcommand has help a user can follow; errors a user can cause are one line."""
import subprocess
import sys
from pathlib import Path

import pytest

FACT_RAY = str(Path(sys.executable).parent / "fact-ray")
COMMANDS = ["run", "discover", "tune", "compose", "bench", "retune", "compare", "doctor", "table"]


def sh(*args, **kw):
    return subprocess.run([FACT_RAY, *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help(cmd):
    r = sh(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout and len(r.stdout.splitlines()) > 5


@pytest.mark.parametrize("sub", ["list", "show", "export"])
def test_table_subcommands_have_help(sub):
    r = sh("table", sub, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_bench_without_gpu_is_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root = Path(__file__).parents[1]
    r = sh("bench", str(root / "tests/models/compose_mlp.py"), cwd=tmp_path)
    assert r.returncode == 3
    assert r.stderr.strip() == "error: no CUDA GPU: fact-ray bench times every variant on a GPU; nothing was done"
    assert r.stdout == ""
    assert not (tmp_path / ".fact-ray").exists()  # nothing was written before the check


def test_doctor_reports_each_item(tmp_path):
    r = sh("doctor", cwd=tmp_path)
    for item in ("GPU", "nvcc", "CUTLASS package", "CUTLASS headers", "cuRAND headers", "torch", "Ray",
                 "MLflow tracking", "pattern table", "LLM endpoint"):
        assert item in r.stdout, item
    # no GPU here is allowed (optional); everything required is installed by make setup
    assert r.returncode == 0, r.stdout


def test_doctor_flags_unreachable_tracking_server(tmp_path):
    r = sh("doctor", "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path)
    assert r.returncode == 1
    assert "MLflow tracking" in r.stdout and "missing" in r.stdout


def test_bad_policy_is_one_line(tmp_path):
    r = sh("discover", "examples/minigpt.py", "--policy", "fp8", cwd=Path(__file__).parents[1])
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown precision policy 'fp8'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_tune_without_gpu_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = sh("tune", "tests/models/small_block.py", "--pattern", "1", cwd=Path(__file__).parents[1])
    assert r.returncode == 3
    assert r.stderr.strip().splitlines()[-1].startswith("error: no CUDA GPU")
    assert "Traceback" not in r.stderr


SMALL_BLOCK = str(Path(__file__).parents[1] / "tests/models/small_block.py")


def tune_on_gpu(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`fact-ray tune SMALL_BLOCK ARGS` on the local GPU with a private build cache; skips without a GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    env = {**__import__("os").environ, "FACT_RAY_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([FACT_RAY, "tune", SMALL_BLOCK, *args], capture_output=True, text=True, timeout=900,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.gpu
@pytest.mark.nvcc
def test_tune_on_gpu_prints_the_trials_table(tmp_path):
    r = tune_on_gpu(tmp_path, "--pattern", "1", "--budget", "2")
    assert "torch" in r.stdout and "speedup" in r.stdout
    assert ("winner" in r.stdout) or ("the PyTorch op stays" in r.stdout)


@pytest.mark.gpu
@pytest.mark.nvcc
def test_tune_on_gpu_takes_attention_and_norm_patterns_too(tmp_path):
    from fact_ray.capture import capture, load_model
    from fact_ray.discover import discover

    matches = discover(capture(load_model(SMALL_BLOCK)).graph, "sm90", "fp32")
    for family in ("attention", "layernorm"):
        index = next(i for i, m in enumerate(matches, 1) if m.family == family)
        r = tune_on_gpu(tmp_path, "--pattern", str(index))
        assert "torch" in r.stdout and ("attn_causal_float32" in r.stdout or "norm_float32" in r.stdout)


def test_compose_load_refuses_families_in_one_line(tmp_path):
    """--load restores a composition as saved; --families with it is refused, not silently ignored."""
    model = str(Path(__file__).parents[1] / "tests/models/compose_mlp.py")
    r = sh("compose", model, "--load", str(tmp_path / "art"), "--families", "gemm", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "--families" in r.stderr and "--load" in r.stderr, r.stderr
