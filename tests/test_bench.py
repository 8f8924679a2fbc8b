"""`fact-ray bench`: the pure parts on a CPU (variants, speedups, errors against float64, measuring with an
injected timer, table, JSON, PNG, MLflow), and the whole bench on a GPU."""

import json
import time
from pathlib import Path

import pytest
import torch

from fact_ray import bench as bn
from fact_ray.capture import load_model
from fact_ray.errors import ArtifactError, ModelRaised, NotAvailable, UserError
from fact_ray.types import Precision, TimeStats

ROOT = Path(__file__).parents[1]
MLP = str(ROOT / "tests" / "models" / "compose_mlp.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def hand_made() -> bn.BenchResult:
    """A result built by hand, for the formatting code only: these numbers were not measured."""
    rows = (
        bn.VariantRow("eager", bn.OK, time=TimeStats(2.0, 1.9, 2.2, 20), speedup=1.0, rel_err=3e-7,
                      max_abs_err=1e-6, allclose=True),
        bn.VariantRow("compile-default", bn.OK, time=TimeStats(1.0, 0.9, 1.1, 20), speedup=2.0, rel_err=4e-7,
                      max_abs_err=2e-6, allclose=True, compile_s=12.5),
        bn.VariantRow("compile-max-autotune", bn.FAILED, reason="BackendCompilerFailed: no [triton] here"),
        bn.VariantRow("composed", bn.OK, time=TimeStats(1.6, 1.5, 1.8, 20), speedup=1.25, rel_err=5e-7,
                      max_abs_err=2e-6, allclose=True, kernels=0, throughput=TimeStats(0.8, 0.7, 0.9, 20),
                      throughput_speedup=1.75),
    )
    return bn.BenchResult(
        model="compose_mlp", model_ref="tests/models/compose_mlp.py", policy=Precision.FP32, gpu="Hand GPU",
        versions=(("cutlass", "4.2.0.0"), ("torch", "2.13.0")), artifact="/tmp/art", reps=20, warmup=3,
        tolerance=Precision.FP32.tolerance, allclose_tol=Precision.FP32.allclose_tol,
        created_at="2026-01-01T00:00:00+00:00", rows=rows, notes=("composed: 0 kernels; hand-made",), calls=20,
        method=bn.METHOD, best_composed="composed")


# --------------------------------------------------------------------------------------------- pure parts


def test_parse_variants_keeps_the_canonical_order_needs_eager_and_always_has_max_autotune():
    assert bn.parse_variants(None) == bn.VARIANTS
    assert "composed+compile" in bn.VARIANTS and "composed+cudagraphs" in bn.VARIANTS
    assert bn.parse_variants("composed, eager") == ("eager", "compile-max-autotune", "composed")
    assert bn.parse_variants("composed+max-autotune,eager") == ("eager", "compile-max-autotune",
                                                                  "composed+max-autotune")
    with pytest.raises(UserError, match="unknown variant 'jit'"):
        bn.parse_variants("eager,jit")
    with pytest.raises(UserError, match="must include eager"):
        bn.parse_variants("composed")


def test_speedups_are_eager_median_over_each_median():
    times = {"eager": TimeStats(3.0, 2.0, 4.0, 5), "fast": TimeStats(1.5, 1.0, 2.0, 5),
             "slow": TimeStats(6.0, 5.0, 7.0, 5)}
    assert bn.speedups(times) == {"eager": 1.0, "fast": 2.0, "slow": 0.5}


def test_artifact_of_another_policy_is_refused_naming_both():
    bn.check_artifact_policy({"policy": "bf16"}, Precision.BF16, "artifact a")
    with pytest.raises(ArtifactError) as e:
        bn.check_artifact_policy({"policy": "bf16"}, Precision.FP32, "artifact a")
    msg = str(e.value)
    assert "bf16" in msg and "fp32" in msg and "\n" not in msg


def test_output_errors_against_float64():
    ref = torch.tensor([1.0, -2.0, 2.0], dtype=torch.float64)
    rel, mx, close = bn.output_errors(torch.tensor([1.0, -2.0, 2.0]), ref, Precision.FP32)
    assert (rel, mx, close) == (0.0, 0.0, True)
    rel, mx, close = bn.output_errors(torch.tensor([1.0, -2.0, 2.3]), (ref,), Precision.FP32)
    assert rel == pytest.approx(0.1, rel=1e-5) and mx == pytest.approx(0.3, rel=1e-5) and close is False
    assert bn.output_errors(torch.tensor([1.0, float("nan"), 2.0]), ref, Precision.BF16) == (None, None, False)
    with pytest.raises(ValueError, match="shape"):
        bn.output_errors(torch.zeros(2), ref, Precision.FP32)


def cpu_timer(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_measure_on_cpu_times_compares_and_reports_a_failed_variant():
    loaded = load_model(MLP)
    m = loaded.module

    def broken():
        raise RuntimeError("inductor is not here")

    builders = {
        "eager": lambda: bn.Variant(m),
        "noisy": lambda: bn.Variant(lambda x: m(x) + 1e-3, compiled=True),
        "broken": broken,
    }
    rows = {r.name: r for r in bn.measure(loaded, Precision.FP32, builders, device="cpu", reps=5, warmup=1,
                                          timer=cpu_timer)}
    eager, noisy, failed = rows["eager"], rows["noisy"], rows["broken"]
    assert eager.status == bn.OK and eager.speedup == 1.0 and eager.rel_err < 1e-6 and eager.allclose
    assert eager.time.reps == 5 and eager.compile_s is None
    assert eager.throughput.reps == 5 and eager.throughput_speedup == 1.0 and noisy.throughput.median_ms > 0
    assert noisy.status == bn.INACCURATE and "tolerance" in noisy.reason and noisy.rel_err > 1e-5
    assert noisy.max_abs_err == pytest.approx(1e-3, rel=1e-2) and noisy.compile_s > 0 and noisy.speedup > 0
    assert failed.status == bn.FAILED and failed.time is None and failed.speedup is None
    assert failed.reason == "RuntimeError: inductor is not here"


def test_time_serving_times_one_call_for_latency_and_a_loop_per_call_for_throughput():
    from fact_ray.realize.bench import time_serving

    calls = {"a": 0, "b": 0}

    def fn(name):
        def f():
            calls[name] += 1
        return f

    # A timer charging 3 ms per call of a and 1 ms per call of b: latency is one call, throughput a loop / calls.
    def timer(g):
        before = dict(calls)
        g()
        return 3.0 * (calls["a"] - before["a"]) + 1.0 * (calls["b"] - before["b"])

    latency, per_call = time_serving({"a": fn("a"), "b": fn("b")}, rounds=4, calls=5, warmup=2, timer=timer)
    assert latency["a"].median_ms == 3.0 and latency["b"].median_ms == 1.0 and latency["a"].reps == 4
    assert per_call["a"].median_ms == 3.0 and per_call["b"].median_ms == 1.0
    assert calls == {"a": 2 + 4 * (5 + 1), "b": 2 + 4 * (5 + 1)}


def test_best_composed_is_the_fastest_composed_variant_that_ran_within_tolerance():
    def row(name, ms, status=bn.OK):
        return bn.VariantRow(name, status, time=TimeStats(ms, ms, ms, 3), speedup=4.0 / ms,
                             throughput=TimeStats(ms / 2, ms / 2, ms / 2, 3), throughput_speedup=4.0 / ms)

    rows = (row("eager", 4.0), row("compile-max-autotune", 2.0), row("composed", 3.0),
            row("composed+compile", 1.0, bn.INACCURATE), row("composed+max-autotune", 1.6))
    assert bn.best_composed(rows) == "composed+max-autotune"
    note = bn.best_note(rows, "composed+max-autotune")
    assert "2.50x over eager" in note and "1.25x over compile-max-autotune" in note
    assert bn.best_composed(rows[:2]) == ""


def test_stacked_variants_share_one_composed_module_and_its_failure():
    made = []

    def composed():
        made.append(1)
        return bn.Variant(torch.nn.Identity(), kernels=2)

    stacked = bn._stacked(composed, ["composed+compile"])
    plain, compiled = stacked["composed"](), stacked["composed+compile"]()
    assert len(made) == 1 and compiled.compiled and compiled.kernels == 2 and plain.fn is not compiled.fn

    def failing():
        made.append(2)
        raise RuntimeError("no winners")

    stacked = bn._stacked(failing, ["composed+max-autotune"])
    for name in ("composed", "composed+max-autotune"):
        with pytest.raises(RuntimeError, match="no winners"):
            stacked[name]()
    assert made.count(2) == 1


def test_measure_stops_when_eager_itself_raises():
    loaded = load_model(MLP)

    def raising(x):
        raise RuntimeError("boom")

    with pytest.raises(ModelRaised, match="eager module raised"):
        bn.measure(loaded, Precision.FP32, {"eager": lambda: bn.Variant(raising)}, device="cpu", reps=1, warmup=0,
                   timer=cpu_timer)


def test_run_bench_checks_its_arguments_then_the_gpu_before_any_work(tmp_path):
    from fact_ray import config

    s = config.load({"home": str(tmp_path / "home")}, env={}, file=str(tmp_path / "none.toml"))
    with pytest.raises(UserError, match="--variants leaves out"):
        bn.run_bench(MLP, s, artifact=str(tmp_path), variants=("eager",))
    with pytest.raises(UserError, match="--reps"):
        bn.run_bench(MLP, s, reps=0)
    with pytest.raises(UserError, match="already composed"):
        bn.run_bench(MLP, s, artifact=str(tmp_path), families=frozenset({"gemm_bias"}))
    if not torch.cuda.is_available():
        with pytest.raises(NotAvailable, match="no CUDA GPU"):
            bn.run_bench(MLP, s)
    assert not (tmp_path / "home").exists()


# --------------------------------------------------------------------------------------------- reporting


def test_table_shows_every_variant_speedups_and_reasons():
    text = bn.table_text(hand_made())
    for s in ("eager", "compile-default", "compile-max-autotune", "composed", "2.00x", "1.25x", "12.5",
              "failed", "no [triton] here", "Hand GPU", "composed: 0 kernels"):
        assert s in text, s


def test_json_round_trip_and_files(tmp_path):
    result = hand_made()
    data = bn.to_json(result)
    assert data["kind"] == "fact-ray-bench" and data["versions"]["torch"] == "2.13.0"
    assert bn.from_json(json.loads(json.dumps(data))) == result

    out = bn.write_outputs(result, tmp_path / "out")
    assert out.json.name == "bench-compose_mlp-fp32.json"
    assert bn.from_json(json.loads(out.json.read_text())) == result
    assert "compile-max-autotune" in out.text.read_text()
    assert out.png.read_bytes().startswith(PNG_MAGIC)


def test_a_bench_limited_to_some_families_says_so_in_its_files_and_title(tmp_path):
    from dataclasses import replace

    from fact_ray.compose import parse_families

    families = parse_families("gemm")
    result = replace(hand_made(), families=tuple(sorted(families)))
    assert result.label == "fp32-only-gemm"
    out = bn.write_outputs(result, tmp_path)
    assert out.json.name == "bench-compose_mlp-fp32-only-gemm.json"
    back = bn.from_json(json.loads(out.json.read_text()))
    assert back == result and set(back.families) == families
    assert "fp32-only-gemm" in bn.table_text(result)
    # the full composition's files are other files: the two benches sit side by side
    assert bn.write_outputs(hand_made(), tmp_path).json.name == "bench-compose_mlp-fp32.json"


def test_parse_families_expands_gemm_and_refuses_unknown_names():
    from fact_ray.compose import parse_families
    from fact_ray.discover.rules import GEMM_FAMILIES

    assert parse_families(None) == frozenset() and parse_families(" ") == frozenset()
    assert parse_families("gemm") == frozenset(GEMM_FAMILIES)
    assert parse_families("attention, layernorm") == {"attention", "layernorm"}
    with pytest.raises(UserError, match="unknown family 'softmax'"):
        parse_families("gemm,softmax")


def test_from_json_refuses_something_else():
    with pytest.raises(UserError, match="not a fact-ray-bench result"):
        bn.from_json({"kind": "other"})


def test_from_json_reads_a_committed_schema_1_result():
    path = ROOT / "benchmarks/results/2026-11-21-h200-s3/2-minigpt-bf16-tf32/bench/bench-minigpt-bf16.json"
    result = bn.from_json(json.loads(path.read_text()))
    assert result.calls == 0 and result.row("composed").throughput is None and result.row("composed").time


def test_plot_writes_a_real_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    path = bn.plot(hand_made(), tmp_path / "p" / "bench.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    img = imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # bars and labels, not a blank canvas


def test_mlflow_run_holds_tag_params_metrics_and_files(tmp_tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from dataclasses import replace

    result = hand_made()
    stacked = replace(result.row("composed"), name="composed+compile")  # "+" is not a legal MLflow name character
    result = replace(result, rows=(*result.rows, stacked))
    out = bn.write_outputs(result, tmp_path / "out")
    uri = tmp_tracking_uri
    run_id = bn.log_to_mlflow(result, out, uri)

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.tags["fact_ray.kind"] == "bench" and run.info.status == "FINISHED"
    assert run.data.tags["fact_ray.status.compile-max-autotune"] == "failed"
    assert run.data.params["model"] == "compose_mlp" and run.data.params["policy"] == "fp32"
    assert run.data.params["gpu"] == "Hand GPU" and run.data.params["artifact"] == "/tmp/art"
    m = run.data.metrics
    assert m["eager.median_ms"] == 2.0 and m["compile-default.speedup"] == 2.0 and m["composed.rel_err"] == 5e-7
    assert m["composed.kernels"] == 0.0 and m["composed_compile.throughput_ms"] == 0.8
    assert run.data.tags["fact_ray.status.composed_compile"] == "ok"
    assert not any(k.startswith("compile-max-autotune.") for k in m)  # nothing measured, nothing logged
    files = {f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(run_id)}
    assert files == {out.json.name, out.png.name, out.text.name}


def test_cli_wiring_prints_the_table_writes_files_and_logs(tmp_tracking_uri, tmp_path, monkeypatch):
    """The command after the measurement, with run_bench stubbed by the hand-made result (no GPU here)."""
    from typer.testing import CliRunner

    from fact_ray import cli

    seen = {}

    def fake_run_bench(ref, settings, **kw):
        seen.update(kw, ref=ref, policy=settings.policy)
        return hand_made()

    monkeypatch.setattr(bn, "require_gpu", lambda: "Hand GPU")
    monkeypatch.setattr(bn, "run_bench", fake_run_bench)
    monkeypatch.chdir(tmp_path)
    uri = tmp_tracking_uri
    r = CliRunner().invoke(cli.app, ["bench", MLP, "--variants", "eager,composed", "--reps", "7", "--calls", "9",
                                     "--tracking-uri", uri, "--out", "res", "--families", "gemm_bias"])
    assert r.exit_code == 0, r.output
    assert seen == {"ref": MLP, "policy": Precision.FP32, "artifact": None, "reps": 7, "warmup": 10, "calls": 9,
                    "variants": ("eager", "compile-max-autotune", "composed"), "families": {"gemm_bias"},
                    "say": seen["say"]}
    assert "compile-max-autotune" in r.output and "note: composed: 0 kernels" in r.output
    assert (tmp_path / "res" / "bench-compose_mlp-fp32.json").is_file()
    assert (tmp_path / "res" / "bench-compose_mlp-fp32.png").is_file() and "mlflow run " in r.output


# --------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.nvcc
def test_bench_on_gpu_compares_eager_compile_and_composed(tmp_tracking_uri, tmp_path):
    from fact_ray import config

    s = config.load({"home": str(tmp_path / "home"), "policy": "fp32"}, env={}, file=str(tmp_path / "none.toml"))
    result = bn.run_bench(MLP, s, variants=("eager", "compile-default", "composed+compile"), reps=10, warmup=2,
                          calls=5)

    assert [r.name for r in result.rows] == ["eager", "compile-default", "composed", "composed+compile"]
    for r in result.rows:
        assert r.status == bn.OK, (r.name, r.reason)
        assert r.rel_err <= Precision.FP32.tolerance and r.allclose, r
        assert r.time.median_ms > 0 and r.speedup > 0 and r.throughput.median_ms > 0 and r.throughput_speedup > 0
    assert result.best_composed in ("composed", "composed+compile") and result.calls == 5
    assert any(n.startswith("best composed variant") for n in result.notes)
    assert result.row("eager").speedup == 1.0
    assert result.row("compile-default").compile_s > 0
    assert result.row("composed").kernels == 0  # the table in the fresh home is empty
    assert any("0 kernels" in n for n in result.notes)
    assert Path(result.artifact, "manifest.json").is_file()
    # the composition under torch.compile is its own, guaranteed against torch.compile (docs/bench.md)
    assert Path(f"{result.artifact}-vs-compile", "manifest.json").is_file()

    out = bn.write_outputs(result, tmp_path / "out")
    assert out.json.is_file() and out.png.read_bytes().startswith(PNG_MAGIC)
    run_id = bn.log_to_mlflow(result, out, tmp_tracking_uri)
    assert run_id


def test_a_printed_bench_table_parses_back_to_its_numbers():
    """benchmarks/replot_bench_log.py rebuilds a result from a bench log: every printed number comes back."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("replot", root / "benchmarks" / "replot_bench_log.py")
    replot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replot)
    log = root / "benchmarks/results/2026-11-21-h200-s2/4-level1-fp32/bench-matmul_square-fp32.log"
    result = replot.parse(log.read_text(), "examples/matmul_square.py")
    assert (result.model, result.policy.value, result.gpu, result.reps) == ("matmul_square", "fp32", "NVIDIA H200", 50)
    composed = result.row("composed")
    assert composed.time.median_ms == 1.269 and (composed.time.p10_ms, composed.time.p90_ms) == (1.26, 1.276)
    assert composed.speedup == 2.11 and composed.rel_err == 6.50e-07 and composed.allclose and composed.kernels == 1
    assert result.row("compile-max-autotune").compile_s == 7.0 and result.row("eager").compile_s is None
