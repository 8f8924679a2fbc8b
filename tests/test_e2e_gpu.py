"""The composed module end to end on a GPU (issue 18): the whole-module guarantee with CUDA events, the composed
module under torch.compile in every mode, and an AOTInductor package of an artifact run in a fresh process.
Their CPU halves are test_guarantee.py and test_stacking.py."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

MODELS = Path(__file__).parent / "models"
sys.path.insert(0, str(MODELS))
import e2e_ops  # noqa: E402  (registers the fr_test ops)

from fact_ray.artifact import load_report, read_manifest, save  # noqa: E402
from fact_ray.capture import capture, load_model  # noqa: E402
from fact_ray.compose import check, compose  # noqa: E402
from fact_ray.discover import discover  # noqa: E402
from fact_ray.guarantee import CANNOT_BEAT, FASTER, guarantee_of, guarded_compose, select  # noqa: E402
from fact_ray.types import Precision  # noqa: E402
from test_compose_gpu import MODEL, local_arch, winner  # noqa: E402,F401  (winner: the real sm80 SIMT kernel)

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
]


def composed_mlp(winner, *, guarded: bool = False):
    loaded = load_model(MODEL)
    captured = capture(loaded)
    matches = discover(captured.graph, local_arch(), Precision.FP32)
    fc1 = next(m for m in matches if m.rule == "linear_bias_act")
    if not guarded:
        return loaded, compose(captured, matches, {fc1.key: winner}, Precision.FP32).to("cuda"), fc1
    module = loaded.module.to("cuda")
    inputs = [x.to("cuda") for x in loaded.inputs]
    composed = guarded_compose(captured, matches, {fc1.key: winner}, Precision.FP32, original=module,
                               inputs=inputs, arch=local_arch(), reps=20, warmup=5)
    return loaded, composed, fc1


def test_the_guarantee_drops_a_really_slow_planted_kernel():
    torch.manual_seed(0)
    model = e2e_ops.TwoLayers(1024).cuda().eval()
    x = torch.randn(4096, 1024, device="cuda")
    plan = {"fc1": "fast", "fc2": "slow"}  # slow: the same GEMM twenty times

    def build(keys):
        module = e2e_ops.Replaced(model, {k: plan[k] for k in keys})
        return lambda: module(x)

    with torch.no_grad():
        g = select(["fc1", "fc2"], build, lambda: model(x), reps=15, warmup=3)  # CUDA events
    assert "fc2" not in g.kept and "fc2" in {d.match_key for d in g.dropped}
    slow = next(d for d in g.dropped if d.match_key == "fc2")
    assert slow.with_ms > 3 * slow.without_ms, slow  # twenty GEMMs instead of one: no close call
    assert g.verdict in (FASTER, CANNOT_BEAT) and (g.verdict != FASTER or g.ratio > 1.0)


@pytest.mark.nvcc
def test_guarded_composition_is_never_slower_and_the_artifact_records_why(winner, tmp_path):
    loaded, composed, fc1 = composed_mlp(winner, guarded=True)
    g = guarantee_of(composed)
    assert g is not None and g.verdict in (FASTER, CANNOT_BEAT)
    assert [r.match_key for r in composed.fact_ray.replacements] == list(g.kept)
    if g.verdict == FASTER:
        assert g.ratio > 1.0 and g.kept == (fc1.key,)
    else:
        assert composed.fact_ray.replacements == () and g.dropped[0].match_key == fc1.key
    assert check(loaded.module, composed, Precision.FP32).passed
    manifest = read_manifest(save(composed, tmp_path / "art"))
    assert manifest["guarantee"]["verdict"] == g.verdict and manifest["guarantee"]["against"] == "eager"
    assert g.summary in load_report(tmp_path / "art")


@pytest.mark.nvcc
def test_compiled_composed_module_matches_the_composed_module_in_every_mode(winner):
    _, composed, _ = composed_mlp(winner)
    x = torch.randn(2, 8, 64, device="cuda")
    with torch.no_grad():
        want = composed(x)
        explained = torch._dynamo.explain(composed)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        for mode in (None, "max-autotune", "reduce-overhead"):
            compiled = torch.compile(composed, mode=mode, fullgraph=True)
            for _ in range(3):  # reduce-overhead records its CUDA graph after warm-up calls, then replays
                got = compiled(x).clone()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"mode {mode}")


LOADER = textwrap.dedent("""
    import sys, torch
    from fact_ray.deploy import load_package
    x = torch.load(sys.argv[2]).cuda()
    torch.save(load_package(sys.argv[1])(x).cpu(), sys.argv[2] + ".out")
""")


@pytest.mark.nvcc
def test_aoti_package_of_an_artifact_runs_in_a_fresh_process(winner, tmp_path):
    from fact_ray.deploy import load_package, package_artifact

    loaded, composed, _ = composed_mlp(winner)
    assert check(loaded.module, composed, Precision.FP32).passed
    art = save(composed, tmp_path / "art")
    pkg = package_artifact(art, MODEL)
    assert pkg == art / "aoti" / "model.pt2" and pkg.is_file()
    x = torch.randn(2, 8, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = composed(x.cuda()).cpu()
        # In this process, where the ops are registered already, first.
        torch.testing.assert_close(load_package(pkg)(x.cuda()).cpu(), want, rtol=1e-5, atol=1e-5)
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", LOADER, str(pkg), str(tmp_path / "x.pt")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "x.pt.out"), want, rtol=1e-5, atol=1e-5)
