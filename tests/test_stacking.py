"""A composed module under torch.compile and packaged with AOTInductor, on a CPU.

The module calls test-only CPU ops registered as fact-ray registers its kernels (tests/models/e2e_ops.py: a
`torch.library` custom op with a schema and a fake implementation), and carries the inference-only guard of a
composed module. The same flows on the real kernels are the GPU tests' (test_e2e_gpu.py).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

MODELS = Path(__file__).parent / "models"
sys.path.insert(0, str(MODELS))
import e2e_ops  # noqa: E402  (registers the fr_test ops)

from fact_ray.deploy import export, package  # noqa: E402
from fact_ray.inference import guard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def module_and_input():
    torch.manual_seed(0)
    original = e2e_ops.TwoLayers().eval()
    return original, guard(e2e_ops.Replaced(original, {"fc1": "fast", "fc2": "slow"})), torch.randn(4, 16)


def op_calls(graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and "fr_test" in str(n.target)]


@pytest.mark.slow
def test_compiled_composed_module_has_no_graph_break_and_matches(module_and_input):
    original, composed, x = module_and_input
    with torch.no_grad():
        explained = torch._dynamo.explain(composed)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        assert op_calls(explained.graphs[0].graph) == ["fr_test.fast_linear.default", "fr_test.slow_linear.default"]
        want = composed(x)
        got = torch.compile(composed, fullgraph=True)(x)  # Inductor, default mode, the ops kept as calls
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, original(x).detach())


def test_export_keeps_our_ops_as_calls(module_and_input):
    _, composed, x = module_and_input
    program = export(composed, (x,))
    assert op_calls(program.graph) == ["fr_test.fast_linear.default", "fr_test.slow_linear.default"]


LOADER = textwrap.dedent("""
    import sys, torch
    if sys.argv[3] == "register":
        sys.path.insert(0, sys.argv[4])
        import e2e_ops  # the artifact's libraries, registered first
    from fact_ray.deploy import load_package
    x = torch.load(sys.argv[2])
    try:
        y = load_package(sys.argv[1])(x)
    except Exception as e:
        print("failed:", str(e).splitlines()[0])
        raise SystemExit(1)
    torch.save(y, sys.argv[2] + ".out")
""")


@pytest.mark.slow
def test_aoti_package_runs_in_a_fresh_process_that_registered_the_ops(module_and_input, tmp_path):
    _, composed, x = module_and_input
    path = package(composed, (x,), tmp_path / "aoti" / "model.pt2")
    assert path.is_file() and not list(path.parent.glob(".tmp-*"))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = composed(x)

    def fresh(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LOADER, str(path), str(tmp_path / "x.pt"), mode, str(MODELS)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    done = fresh("register")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "x.pt.out"), want)
    # Without the registration the package cannot find our op: registering first is what makes it run.
    bare = fresh("bare")
    assert bare.returncode == 1 and "fr_test::fast_linear" in bare.stdout
