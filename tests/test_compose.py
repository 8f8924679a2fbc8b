"""Composition and the deployable artifact, on a CPU.

The kernel library is real: one sm80 configuration of the right family (fp32 Linear + bias + GELU), emitted
from the templates and compiled once per session with nvcc. Its code cannot run without a GPU, but it loads
(ctypes), registers as a custom op, and the composed module traces under fake tensors; saving and loading the
artifact, and every refusal, run for real. Outputs of the kernels are the GPU tests' (test_compose_gpu.py).
"""

import json
import re
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fact_ray.artifact import load, load_report, read_manifest, save
from fact_ray.capture import capture, load_model
from fact_ray.compose import CHECK_ATTR, check, compose, sha256_file
from fact_ray.discover import discover
from fact_ray.errors import ArtifactError, ComposeError, NotAvailable
from fact_ray.fastcall import aten_name
from fact_ray.toolchain import detect
from fact_ray.types import Arch, Precision

MODEL = str(Path(__file__).parent / "models" / "compose_mlp.py")
OTHER_MODEL = str(Path(__file__).parent / "models" / "farm_tiny.py")
REPO = Path(__file__).resolve().parents[1]


def captured_model(ref: str = MODEL):
    loaded = load_model(ref)
    captured = capture(loaded)
    return loaded, captured, discover(captured.graph, Arch.SM80, Precision.FP32)


@pytest.fixture(scope="module")
def winner(fc1_gelu_kernel):
    """(KernelConfig, library path, symbol) of one real sm80 build: the fc1 + GELU pattern's kernel."""
    return fc1_gelu_kernel


@pytest.fixture
def composed(winner):
    loaded, captured, matches = captured_model()
    fc1 = next(m for m in matches if m.rule == "linear_bias_act")
    return loaded, compose(captured, matches, {fc1.key: winner}, Precision.FP32), fc1


@pytest.fixture
def artifact(composed, tmp_path):
    _, module, _ = composed
    return save(module, tmp_path / "art", allow_unchecked=True)


def targets(graph_module) -> list[str]:
    return [aten_name(n) for n in graph_module.graph.nodes if n.op == "call_function"]


# --------------------------------------------------------------------------------------------- without nvcc


def test_importing_fact_ray_imports_no_torch():
    code = "import sys, fact_ray; assert callable(fact_ray.load); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_compose_without_winners_keeps_every_op_and_runs_like_the_original():
    loaded, captured, matches = captured_model()
    module = compose(captured, matches, {}, Precision.FP32)
    assert sorted(module.fact_ray.kept) == sorted(m.key for m in matches) and module.fact_ray.replacements == ()
    assert "aten.gelu.default" in targets(module)
    assert list(module.state_dict()) == list(loaded.module.state_dict())
    assert all(a is b for a, b in zip(module.parameters(), loaded.module.parameters()))
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), loaded.module(x), rtol=0, atol=0)


def test_composed_graph_holds_no_device_of_the_capture(tmp_path):
    """Captured on the CPU, served on a GPU: export writes the tracing device into the graph (a buffer's
    `.to(dtype)` becomes a device=cpu check, `arange(device=x.device)` a device=cpu literal). The composed module
    of the Llama-style block failed on the H200 with "Tensor device mismatch! Expected: cpu, Got: cuda:0" before the
    literals followed the input."""
    src = tmp_path / "rope_like.py"
    src.write_text(textwrap.dedent("""
        import torch
        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("cos", torch.randn(16, 8), persistent=False)
                self.lin = torch.nn.Linear(8, 8)
            def forward(self, x):
                pos = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
                # positional: HF Llama's `inv_freq.to(x.device, torch.float32)`, aten.to.device(t, cpu, float32)
                scale = self.cos[0].to(x.device, torch.float32).to(x.dtype)
                # inside an autocast block, as HF's rotary embedding computes cos and sin: export puts the body in
                # a submodule that a higher-order op calls, with its own literals and checks
                with torch.autocast(device_type=x.device.type, enabled=False):
                    freq = (self.cos[1].to(x.device, torch.float32) * x.float()).to(x.dtype)
                return self.lin(x) * self.cos[: x.shape[1]].to(x.dtype) * scale + pos[:, None] + freq
        def get_inputs():
            return [torch.randn(2, 16, 8)]
        def get_init_inputs():
            return []
    """))
    loaded = load_model(str(src))
    captured = capture(loaded)
    def devices(n, where):
        return [v for v in where(n) if isinstance(v, torch.device)]

    def kw(n):
        return n.kwargs.values()

    def pos(n):
        return n.args

    def nodes(gm):  # the top graph's and every nested graph's
        return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]

    exported = captured.exported.module()
    assert len([m for m in exported.modules() if isinstance(m, torch.fx.GraphModule)]) > 1  # the autocast body
    assert any(devices(n, kw) for n in nodes(exported))
    assert any(devices(n, pos) for n in nodes(exported))
    module = compose(captured, discover(captured.graph, Arch.SM80, Precision.FP32), {}, Precision.FP32)
    assert [n.name for n in nodes(module) if devices(n, kw) or devices(n, pos)] == []
    # export's per-call dtype checks of `.to(dtype)` operands are gone too: host time only, eager runs none
    assert any("_assert_tensor_metadata" in str(n.target) for n in nodes(exported))
    assert not any("_assert_tensor_metadata" in aten_name(n) for n in nodes(module))
    x = loaded.inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(module(x), loaded.module(x), rtol=0, atol=0)
        # on another device than the capture's (meta stands in for cuda here): every tensor follows the input
        assert module.to("meta")(x.to("meta")).device.type == "meta"


def test_composed_module_checks_its_inputs_cheaply_and_in_one_line():
    """torch.export's own input check (a pytree walk and symbolic constraints per call) cost more host time than
    the graph's ops on a Llama-style block: the composed module checks count, shape and dtype itself instead."""
    loaded, captured, matches = captured_model()
    module = compose(captured, matches, {}, Precision.FP32)
    assert getattr(module, "validate_inputs", False) is False
    assert not [n for n in module.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    x = loaded.inputs[0]
    with torch.no_grad():
        module(x)
        for bad in (torch.randn(x.shape[0] + 1, *x.shape[1:]), x.double()):
            with pytest.raises(ComposeError) as e:
                module(bad)
            assert "\n" not in str(e.value) and "composed for" in str(e.value) and "--shapes" in str(e.value)


def test_check_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_compose_gpu checks for real")
    loaded, captured, matches = captured_model()
    module = compose(captured, matches, {}, Precision.FP32)
    with pytest.raises(NotAvailable, match="no CUDA GPU"):
        check(loaded.module, module, Precision.FP32)


def test_not_an_artifact_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")


# --------------------------------------------------------------------------------------------- compose


@pytest.mark.nvcc
@pytest.mark.slow
def test_composed_graph_calls_the_kernel_instead_of_the_subgraph(composed):
    loaded, module, fc1 = composed
    calls = targets(module)
    (rep,) = module.fact_ray.replacements
    assert f"{rep.op}.default" in calls and rep.kernel.startswith(rep.library_sha256)
    assert "aten.gelu.default" not in calls, "the GELU is fused into the kernel"
    assert calls.count("aten.linear.default") == 1, "fc2 (no winner) keeps its PyTorch op"
    assert module.fact_ray.kept == tuple(m.key for m in captured_model()[2] if m.key != fc1.key)
    assert rep.match_key == fc1.key and rep.library_sha256 == sha256_file(rep.library_path)
    assert rep.problem.epilogue == "bias_act" and rep.problem.layout_b == "col" and rep.problem.M == 16
    # The original's parameters, the very objects, under the same names.
    assert list(module.state_dict()) == list(loaded.module.state_dict())
    assert module.fc1.weight is loaded.module.fc1.weight and module.fc2.bias is loaded.module.fc2.bias


@pytest.mark.nvcc
def test_composed_module_traces_under_fake_tensors(composed):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, module, _ = composed
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():  # inference only
        y = module(torch.empty(2, 8, 64))
    assert tuple(y.shape) == (2, 8, 64) and y.dtype == torch.float32


@pytest.mark.nvcc
def test_kernel_runs_only_on_cuda_tensors(composed):
    # On a CPU the op must fail loudly (never fall back to PyTorch silently).
    _, module, _ = composed
    with pytest.raises(Exception, match="runs on cuda tensors"), torch.no_grad():
        module(torch.randn(2, 8, 64))


@pytest.mark.nvcc
def test_composed_module_refuses_autograd_before_any_kernel_runs(composed):
    # Inference only (fact_ray/inference.py): the typed error comes at the call, not in backward(), and before
    # the kernel (which would fail on a CPU for another reason) is reached.
    from fact_ray.errors import InferenceOnly

    loaded, module, _ = composed
    with pytest.raises(InferenceOnly, match="inference only"):
        module(torch.randn(2, 8, 64))
    with pytest.raises(InferenceOnly):
        module(torch.randn(2, 8, 64, requires_grad=True))
    uncomposed = compose(capture(loaded), [], {}, Precision.FP32)  # no fact-ray kernel: autograd works as ever
    uncomposed(torch.randn(2, 8, 64)).sum().backward()


@pytest.mark.nvcc
def test_compose_refuses_what_it_cannot_rewrite(winner):
    _, captured, matches = captured_model()
    fc1 = next(m for m in matches if m.rule == "linear_bias_act")
    ghost = replace(fc1, anchor="no_such_node", nodes=("linear", "no_such_node"))
    with pytest.raises(ComposeError, match="no_such_node is not in the graph"):
        compose(captured, [ghost], {fc1.key: winner}, Precision.FP32)
    with pytest.raises(ComposeError, match="tuned under fp32.*under bf16"):
        compose(captured, matches, {fc1.key: winner}, Precision.BF16)
    cfg, path, symbol = winner  # a one-pass TF32 kernel never stands in under the fp32 policy
    with pytest.raises(ComposeError, match="tuned under tf32.*under fp32"):
        compose(captured, matches, {fc1.key: (replace(cfg, precision=Precision.TF32), path, symbol)},
                Precision.FP32)
    fc2 = next(m for m in matches if m.rule == "linear_bias_residual")
    with pytest.raises(ComposeError, match="computes epilogue bias_act .* needs bias_residual"):
        compose(captured, matches, {fc2.key: winner}, Precision.FP32)
    overlapping = replace(fc1, anchor="linear", nodes=("linear",), rule="linear_bias", family="gemm_bias")
    with pytest.raises(ComposeError, match="both cover node linear"):
        compose(captured, [fc1, overlapping], {fc1.key: winner, overlapping.key: winner}, Precision.FP32)


# --------------------------------------------------------------------------------------------- artifact


@pytest.mark.nvcc
def test_manifest_records_the_composition(artifact, composed, winner):
    _, module, fc1 = composed
    cfg, lib_path, symbol = winner
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["arch"] == "sm80" and m["policy"] == "fp32"
    assert m["model"]["name"] == "compose_mlp" and m["model"]["hash"] == module.fact_ray.model_hash
    assert m["toolchain"]["torch"] == torch.__version__ and m["toolchain"]["cutlass"] == "4.2.0.0"
    assert m["toolchain"]["nvcc"] == detect().nvcc and m["toolchain"]["bench_method"]  # the version, not a path
    assert {"driver", "cublas", "cudnn", "torch_cuda"} <= set(m["toolchain"])  # recorded for serve-time checks
    assert m["check"] is None, "saved unchecked, and says so"
    (pat,) = m["patterns"]
    digest = sha256_file(lib_path)
    assert pat["match_key"] == fc1.key and pat["rule"] == "linear_bias_act" and pat["symbol"] == symbol
    assert pat["config"]["name"] == cfg.name and pat["sha256"] == digest
    assert pat["library"] == f"libs/{digest}.so"
    assert [p.name for p in (artifact / "libs").iterdir()] == [f"{digest}.so"]
    assert sha256_file(str(artifact / pat["library"])) == digest
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".tmp-")], "no temp folder left"
    text = load_report(artifact)
    assert "NOT CHECKED" in text and cfg.name in text and "1 kept" in text


@pytest.mark.nvcc
def test_save_refuses_an_unchecked_or_failed_composition(composed, tmp_path):
    from fact_ray.compose import CheckReport

    _, module, _ = composed
    with pytest.raises(ComposeError, match="not passed the end-to-end check"):
        save(module, tmp_path / "a")
    failed = CheckReport(passed=False, policy=Precision.FP32, tolerance=1e-5, seeds=(0,), rel_errs=(0.5,),
                         max_abs_errs=(1.0,), reason="seed 0: relative error 0.5 exceeds the fp32 tolerance 1e-05")
    setattr(module, CHECK_ATTR, failed)
    with pytest.raises(ComposeError, match="failed its end-to-end check"):
        save(module, tmp_path / "b", allow_unchecked=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.nvcc
def test_load_restores_the_composition(artifact, composed):
    loaded, original, _ = composed
    module = load(artifact, MODEL, expect_arch="sm80")
    assert targets(module) == targets(original)
    assert module.fact_ray.replacements[0].op == original.fact_ray.replacements[0].op
    # Loaded from a private copy of the bytes that were hashed (artifact_trust), not from the artifact folder.
    rep = module.fact_ray.replacements[0]
    assert not rep.library_path.startswith(str(artifact)) and sha256_file(rep.library_path) == rep.library_sha256
    # The loaded module runs the given model's parameters.
    again = load(artifact, loaded.module, inputs=loaded.inputs, expect_arch="sm80")
    assert again.fc1.weight is loaded.module.fc1.weight


@pytest.mark.nvcc
def test_damaged_library_is_refused(artifact):
    (lib,) = (artifact / "libs").iterdir()
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="is damaged"):
        load(artifact, MODEL, expect_arch="sm80")
    lib.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        load(artifact, MODEL, expect_arch="sm80")


@pytest.mark.nvcc
def test_arch_and_toolchain_mismatches_are_refused_naming_both(artifact):
    with pytest.raises(ArtifactError, match=r"built for sm80.*expected target is sm90"):
        load(artifact, MODEL, expect_arch="sm90")
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match=r"built for sm80; this machine \(no CUDA GPU\) cannot run"):
            load(artifact, MODEL)
    torch_version = re.escape(torch.__version__)
    with pytest.raises(ArtifactError, match=rf"made with torch {torch_version}.*has torch 2\.0\.0\+cu999"):
        load(artifact, MODEL, expect_arch="sm80", expect_toolchain={"torch": "2.0.0+cu999"})
    with pytest.raises(ArtifactError, match=r"made with CUTLASS 4\.2\.0\.0.*has CUTLASS 3\.5\.1"):
        load(artifact, MODEL, expect_arch="sm80", expect_toolchain={"cutlass": "3.5.1"})


@pytest.mark.nvcc
def test_another_model_is_refused(artifact):
    with pytest.raises(ArtifactError, match=r"is for model compose_mlp \(hash [0-9a-f]{12}\), not farm_tiny"):
        load(artifact, OTHER_MODEL, expect_arch="sm80")
    other = load_model(OTHER_MODEL)
    with pytest.raises(ArtifactError, match="graph of Model differs"):
        load(artifact, other.module, inputs=other.inputs, expect_arch="sm80")


@pytest.mark.nvcc
def test_loading_in_a_fresh_process_never_compiles(artifact, tmp_path):
    # An nvcc first on PATH (and named by FACT_RAY_NVCC) that records any call and fails: loading must not call it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "nvcc-was-called"
    fake = bin_dir / "nvcc"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    fake.chmod(0o755)
    code = textwrap.dedent(f"""
        import json, sys
        import fact_ray
        module = fact_ray.load({str(artifact)!r}, {MODEL!r}, expect_arch="sm80")
        print(json.dumps({{"ops": [r.op for r in module.fact_ray.replacements],
                          "table": any("pattern_table" in m for m in sys.modules),
                          "build": "fact_ray.realize.build" in sys.modules}}))
    """)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", FACT_RAY_NVCC=str(fake))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not marker.exists(), f"nvcc was called: {marker.read_text()}"
    assert not result["table"] and not result["build"], "loading touches neither the table nor the build step"
    assert result["ops"] == [p["op"] for p in read_manifest(artifact)["patterns"]]


def test_compose_from_table_without_gpu_or_arch_is_not_available(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from fact_ray.artifact import compose_from_table
    from fact_ray.config import Settings

    with pytest.raises(NotAvailable, match="no CUDA GPU"):
        compose_from_table(MODEL, Settings(home=str(tmp_path)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.nvcc
def test_compose_from_table_takes_only_the_families_asked_for(tmp_path, winner):
    """A table holding a verified, faster fc1 kernel: composed with every family, with `gemm`, and not with
    `attention` alone. Without a GPU the composition is counted and refused, never saved."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the CPU path, which composes without saving")
    from fact_ray.artifact import compose_from_table
    from fact_ray.compose import parse_families
    from fact_ray.config import Settings
    from fact_ray.pattern_table import PatternTable, RowContext, row_from_trial
    from fact_ray.toolchain import key_toolchain
    from fact_ray.types import TimeStats, Trial

    cfg, path, symbol = winner
    _, _, matches = captured_model()
    fc1 = next(m for m in matches if m.rule == "linear_bias_act")
    s = Settings(home=str(tmp_path / "home"), arch="sm80")
    table = PatternTable(s.resolved_table_uri)
    uri = table.put_library(Path(path).read_bytes())
    tc = key_toolchain(detect(s.nvcc))  # what a farm run on this host would have keyed the row by
    trial = Trial(candidate_name=cfg.name, status="ok", error="", rel_err=1e-7, max_abs_err=1e-6,
                  time=TimeStats(1.0, 0.9, 1.1, 50), baseline=TimeStats(2.0, 1.9, 2.1, 50), tflops=1.0)
    table.commit([row_from_trial(trial, fc1, RowContext(tc, "run-1", "NVIDIA A100", "here"), policy=Precision.FP32,
                                 arch=Arch.SM80, config=cfg, library_uri=uri, library_symbol=symbol)])
    for families, n in (("", 1), ("gemm", 1), ("attention", 0)):
        with pytest.raises(NotAvailable, match=rf"{n} pattern\(s\) composed from the table"):
            compose_from_table(MODEL, s, tmp_path / "out", parse_families(families))
    assert not (tmp_path / "out").exists()


def test_graph_hash_ignores_where_the_model_was_captured():
    """An artifact composed from a CPU capture must load onto a GPU: device arguments do not change the hash,
    anything else does."""
    from fact_ray.compose import graph_hash
    from fact_ray.types import Graph, Node

    def graph(device: str, end: int) -> Graph:
        node = Node(name="arange", op="call_function", target="aten.arange.start",
                    args=(0, end), kwargs=(("device", f"device={device}"),))
        return Graph(model_name="m", model_hash="h", capture="export", nodes=(node,))

    assert graph_hash(graph("cpu", 8)) == graph_hash(graph("cuda:0", 8))
    assert graph_hash(graph("cpu", 8)) != graph_hash(graph("cpu", 9))
