"""Composition on a GPU: a real winner composed into the model, checked end to end in float64, saved, and loaded
back in this process with outputs equal to the module that was saved."""

from pathlib import Path

import pytest
import torch

from fact_ray.artifact import load, load_report, read_manifest, save
from fact_ray.capture import capture, load_model
from fact_ray.compose import KernelChoice, check, compose
from fact_ray.discover import discover
from fact_ray.types import Arch, GemmProblem, Precision

MODEL = str(Path(__file__).parent / "models" / "compose_mlp.py")
FC1 = GemmProblem(M=16, N=128, K=64, epilogue="bias_act", activation="gelu")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.nvcc,
]


def local_arch() -> Arch:
    from fact_ray.toolchain import detect

    return detect(nvcc=None).arch


@pytest.fixture(scope="module")
def winner(tmp_path_factory):
    """One CUTLASS 2.x SIMT kernel (it builds for sm_80 and sm_90a) for the model's fc1 + GELU, for the local arch."""
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.search_spaces import space

    arch = local_arch()
    cfg = next(c for c in space(FC1, arch, Precision.FP32)
               if c.template == "sm80_gemm" and c.opclass == "simt" and c.split_k == 1)
    (source,) = emit([cfg], arch)
    lib = build(source, str(tmp_path_factory.mktemp("compose-build-gpu")))
    assert lib.ok, lib.log[-2000:]
    return KernelChoice(cfg, lib.path, source.symbols[0], speedup=1.0)


def test_composed_module_is_checked_saved_and_loaded_with_equal_outputs(winner, tmp_path):
    loaded = load_model(MODEL)
    captured = capture(loaded)
    matches = discover(captured.graph, local_arch(), Precision.FP32)
    fc1 = next(m for m in matches if m.rule == "linear_bias_act")
    composed = compose(captured, matches, {fc1.key: winner}, Precision.FP32)

    report = check(loaded.module, composed, Precision.FP32, seeds=(0, 1, 2))
    assert report.passed, report.reason
    assert len(report.rel_errs) == 3 and report.worst_rel_err <= Precision.FP32.tolerance

    path = save(composed, tmp_path / "art")
    manifest = read_manifest(path)
    assert manifest["check"]["passed"] and manifest["gpu"] == torch.cuda.get_device_name()
    assert "passed" in load_report(path)

    restored = load(path, loaded.module, inputs=loaded.inputs, device="cuda")
    x = torch.randn(2, 8, 64, device="cuda")
    with torch.no_grad():
        expected, got = composed(x), restored(x)
        eager = loaded.module(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)

