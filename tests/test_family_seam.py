"""The kernel-family seam (realize/family.py) and the one pipeline (realize/pipeline.py), on a CPU.

* A family is one module plus one `register` line: a test-only elementwise GELU family, written here against the
  protocol, is planned, compiled for real (one small nvcc compile) and composed into a captured model, with no
  edit to farm.py, compose.py, build.py or cli.py.
* `fact-ray tune`'s in-process executor and the farm's Ray executor (a real local `ray.init`) plan the same
  candidates for an attention pattern under the same budget, and compile the same units.
* Stored configs written before family config types (attention and norm configs with GEMM fields) still load.
"""

import ctypes
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from fact_ray.capture import capture, load_model
from fact_ray.errors import CannotImplement
from fact_ray.fastcall import aten_name
from fact_ray.realize import family, pipeline
from fact_ray.realize.abi import load_checked
from fact_ray.realize.emit import render
from fact_ray.realize.fused import FusedFamily, operands_of, policy_dtype, static_int
from fact_ray.types import Arch, AttentionConfig, Library, Match, NormConfig, Precision, Source, freeze

HERE = Path(__file__).parent
MLP = str(HERE / "models" / "compose_mlp.py")
SDPA = str(HERE / "models" / "sdpa_attention.py")  # one QKV projection and one attention: two patterns
nvcc_present = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


# --------------------------------------------------------------------------------------------- a test-only family


@dataclass(frozen=True)
class GeluProblem:
    numel: int
    dtype: str


@dataclass(frozen=True)
class GeluConfig:
    template: str
    name: str
    arch: Arch
    precision: Precision
    block: int  # threads per block


class TestGeluFamily(FusedFamily):
    """y = GELU(x) elementwise, float32, in a few block sizes; the trial and op registration are FusedFamily's."""

    name = "test_gelu"
    serves = ("test_gelu",)
    templates = ("test_gelu",)
    problem_type = GeluProblem
    schema = "(Tensor x) -> Tensor"

    def problem(self, match: Match, policy: Precision) -> GeluProblem:
        dtype = policy_dtype(match, policy)
        if dtype != "float32" or not operands_of(match).get("x"):
            raise CannotImplement(f"{match.rule}: the test GELU takes one float32 operand x")
        return GeluProblem(numel=static_int(match, "numel"), dtype=dtype)

    def candidates(self, problem: GeluProblem, policy: Precision, arch: Arch, budget: int,
                   hinted: Sequence[str] = ()) -> list[GeluConfig]:
        return [GeluConfig("test_gelu", f"test_gelu_b{b}", Arch(arch), Precision(policy), b)
                for b in (128, 256, 512)][:budget]

    def sources(self, configs: Sequence[GeluConfig], arch: Arch) -> list[Source]:
        out = []
        for c in configs:
            code = render((HERE / "templates" / "test_gelu.cu.in").read_text(), {"name": c.name, "block": c.block})
            out.append(Source(name=f"test_gelu_{hashlib.sha256(code.encode()).hexdigest()[:12]}", arch=Arch(arch),
                              code=code, configs=(c,), symbols=("fr_test_gelu_run",),
                              flags=("-gencode=arch=compute_80,code=sm_80",)))
        return out

    def operands(self, problem: GeluProblem) -> tuple:
        return ("x",)

    def kernel_fn(self, problem: GeluProblem, library: Library, poison: bool = False) -> Callable:
        import torch

        handle = load_checked(library, "a test GELU", "test GELU ABI", 1, {
            "fr_test_gelu_run": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p],
                                 ctypes.c_int)})

        def run(x):
            y = torch.full_like(x, float("nan")) if poison else torch.empty_like(x)
            handle.fr_test_gelu_run(x.data_ptr(), y.data_ptr(), x.numel(),
                                    torch.cuda.current_stream(x.device).cuda_stream)
            return y

        return run

    def torch_fn(self, problem: GeluProblem) -> Callable:
        import torch.nn.functional as F

        return F.gelu

    def make_inputs(self, problem: GeluProblem, device: Any, seed: int) -> tuple:
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        return (torch.randn(problem.numel, generator=gen, device=device),)

    def op_functions(self, problem: GeluProblem, run: Callable) -> tuple[Callable, Callable]:
        import torch

        return (lambda x: run(x)), (lambda x: torch.empty_like(x))


@pytest.fixture
def gelu_family():
    fam = family.register(TestGeluFamily())  # the one line a new family needs
    yield fam
    family.unregister(fam)


def _gelu_match(captured) -> Match:
    """A match of the model's GELU node, as a discovery rule for the test family would write it."""
    node = next(n for n in captured.graph.nodes if n.target.startswith("aten.gelu"))
    (x,) = [a.name for a in node.args if hasattr(a, "name")]
    return Match(rule="test_gelu", family="test_gelu", nodes=(node.name,), anchor=node.name,
                 params=freeze({"numel": node.meta.numel, "operands": {"x": x}}), dtype="float32",
                 shapes=(node.meta.shape,))


def test_the_builtin_families_serve_every_realizable_match_family_once():
    names = [f.name for f in family.families()]
    assert names[:3] == ["gemm", "attention", "norm"]
    served = family.served()
    assert len(served) == len(set(served)) and {"gemm_bias_act", "bmm", "attention", "layernorm"} <= set(served)
    assert family.for_config(AttentionConfig("fmha_sm90", "f", Arch.SM90, Precision.BF16, "bfloat16_t",
                                             "multiply_add", (128, 128, 128))).name == "attention"
    with pytest.raises(ValueError, match="already belong to family attention"):
        family.register(type("Clash", (TestGeluFamily,), {"name": "clash", "serves": ("attention",)})())


@nvcc_present
def test_a_new_family_is_one_module_and_one_registry_line(gelu_family, tmp_path):
    import torch

    from fact_ray.compose import KernelChoice, compose

    loaded = load_model(MLP)
    captured = capture(loaded)
    match = _gelu_match(captured)
    assert family.for_match(match) is gelu_family
    plan = pipeline.plan(match, Precision.FP32, Arch.SM80, budget=2)
    assert plan.family == "test_gelu" and [c.name for c in plan.configs] == ["test_gelu_b128", "test_gelu_b256"]
    assert [s.configs for s in plan.sources] == [(c,) for c in plan.configs]
    with pytest.raises(CannotImplement, match="no kernel family yet"):
        pipeline.plan(Match("x", "no_such_family", (), "n", (), "float32", ()), "fp32", "sm80", 2)

    # The pipeline builds it (the build knows nothing of the family: flags travel on the source); without a GPU
    # it stops there. One unit is compiled for real.
    one = pipeline.Plan(plan.match, plan.family, plan.problem, plan.configs[:1], plan.sources[:1])
    seen = []

    class Hooks(pipeline.Hooks):
        def compiled(self, run, built):
            seen.append(built)

    (run,) = pipeline.realize([one], pipeline.LocalExecutor(str(tmp_path / "cache"), jobs=1), Precision.FP32,
                              Arch.SM80, Hooks())
    (built,) = seen
    assert built.ok, built.library.log[-2000:]
    assert run.built == [built] and run.trials == [] and run.winner is None  # no GPU: no trial, no winner
    from fact_ray.realize.build import exported_symbols

    assert {"fr_abi_version", "fr_test_gelu_run"} <= exported_symbols(built.library.path)

    # compose registers its op and rewrites the graph without knowing the family either
    choice = KernelChoice(config=plan.configs[0], library_path=built.library.path, symbol="fr_test_gelu_run")
    composed = compose(captured, [match], {match.key: choice}, Precision.FP32)
    targets = [aten_name(n) for n in composed.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("fact_ray.test_gelu_float32_") for t in targets), targets
    assert not any("gelu.default" in t and t.startswith("aten") for t in targets)
    (rep,) = composed.fact_ray.replacements
    assert rep.family == "test_gelu" and rep.config == plan.configs[0]
    with torch.no_grad(), torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):  # through the fake kernel
        out = composed(torch.empty(2, 8, 64))
    assert tuple(out.shape) == (2, 8, 64)


# --------------------------------------------------------------------------------------------- one pipeline


def test_stored_attention_and_norm_configs_of_the_gemm_shape_still_load():
    from fact_ray.pattern_table.row import config_from_json, config_to_json

    legacy_attn = {"template": "attention_sm80", "name": "attn_causal_float32_q32_k128_d128", "arch": "sm90",
                   "precision": "fp32", "element": "float", "opclass": "tensorop",
                   "math_op": "multiply_add_fast_f32", "instruction": [1, 1, 1], "tile": [32, 128, 128],
                   "warps": [1, 1, 1], "cluster": [1, 1, 1], "stages": 0, "kernel_schedule": "",
                   "epilogue_schedule": "", "tile_scheduler": "", "swizzle": "Identity8", "split_k": 1,
                   "alignment": [1, 1, 1], "layout_a": "row", "layout_b": "col", "epilogue": "none",
                   "activation": "none"}
    cfg = config_from_json(json.dumps(legacy_attn))
    assert cfg == AttentionConfig("attention_sm80", "attn_causal_float32_q32_k128_d128", Arch.SM90, Precision.FP32,
                                  "float", "multiply_add_fast_f32", (32, 128, 128))
    assert config_from_json(config_to_json(cfg)) == cfg
    legacy_norm = {**legacy_attn, "template": "norm", "name": "norm_float32", "opclass": "simt",
                   "math_op": "multiply_add", "tile": [1, 1, 1]}
    assert config_from_json(json.dumps(legacy_norm)) == NormConfig("norm", "norm_float32", Arch.SM90,
                                                                   Precision.FP32, "float")
    from fact_ray.errors import TableError

    with pytest.raises(TableError, match="fields this fact-ray does not know: .*warp_count"):
        config_from_json(json.dumps({**legacy_attn, "warp_count": 4}))


@pytest.mark.slow
def test_tune_and_the_farm_plan_and_compile_the_same_attention_candidates(tmp_path):
    """The same attention pattern and budget through `fact-ray tune`'s in-process pipeline and the farm's Ray
    pipeline: the same plan, the same units compiled; on a CPU neither can run a trial, and both record none."""
    from fact_ray import farm
    from fact_ray.config import Settings
    from fact_ray.discover import discover
    from fact_ray.events import CompileFinished, TrialFinished

    policy, arch, budget = Precision.FP32, Arch.SM80, 1
    settings = Settings(home=str(tmp_path / "home"), table_uri=str(tmp_path / "table"), cache_dir=str(tmp_path / "c"),
                        arch=arch, policy=policy, budget=budget, trial_timeout_s=60)
    captured = capture(load_model(SDPA))
    match = next(m for m in discover(captured.graph, arch, policy) if m.family == "attention")

    # in process (what `fact-ray tune` runs, less the GPU)
    local_plan = pipeline.plan(match, policy, arch, budget)
    assert len(local_plan.configs) == budget < len(pipeline.plan(match, policy, arch, 16).configs)
    compiled_here = []

    class Hooks(pipeline.Hooks):
        def compiled(self, run, built):
            compiled_here.append(built.source.name)

    (here,) = pipeline.realize([local_plan], pipeline.LocalExecutor(settings.resolved_cache_dir, jobs=1),
                               policy, arch, Hooks())
    assert here.trials == [] and all(b.ok for b in here.built)

    # on Ray (a real local cluster): the farm plans each pattern once, through the same pipeline
    class Rec:
        def __init__(self):
            self.events = []

        def on_event(self, e):
            self.events.append(e)

    rec = Rec()
    summary = farm.run(SDPA, settings, [rec], track=False)
    row = next(p for p in summary.patterns if p.match_key == match.key)
    assert row.status == farm.NO_GPU and row.configs == len(local_plan.configs)
    on_ray = [e.source_name for e in rec.events if isinstance(e, CompileFinished) and e.match_key == match.key]
    assert on_ray == compiled_here == [s.name for s in local_plan.sources]
    assert [e for e in rec.events if isinstance(e, TrialFinished) and e.match_key == match.key] == []
    assert all(e.cached for e in rec.events if isinstance(e, CompileFinished) and e.match_key == match.key)


def test_every_hooks_implementation_answers_every_hook_of_the_pipeline():
    """`fact-ray tune` died on a GPU with "'_ProgressHooks' object has no attribute 'build_done'" when the pipeline
    grew a hook: the tune command's and the farm's reporters answer every hook the pipeline calls."""
    import inspect

    from fact_ray import farm
    from fact_ray.realize import pipeline, tune

    hooks = {n for n, f in inspect.getmembers(pipeline.Hooks, inspect.isfunction) if not n.startswith("_")}
    called = set(re.findall(r"hooks\.(\w+)\(", inspect.getsource(pipeline)))
    assert called <= hooks, called - hooks
    reporters = [c for m in (farm, tune) for _, c in inspect.getmembers(m, inspect.isclass)
                 if c.__module__ == m.__name__ and {"compiled", "trial"} <= set(vars(c))]
    assert len(reporters) >= 2, reporters
    for cls in reporters:
        missing = {h for h in hooks if not callable(getattr(cls, h, None))}
        assert not missing, f"{cls.__qualname__} lacks {missing}"
