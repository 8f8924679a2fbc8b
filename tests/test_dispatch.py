"""The native dispatcher (realize/dispatch.py, templates/fr_dispatch.cpp).

CPU: the extension really builds here (torch CPU: schemas, Meta impls and register_kernel, no CUDA impls), from the
build cache after the first time; register_kernel dlopens real shared libraries (small host libraries compiled
with g++ that export the C ABIs' entry points: the CUDA launch itself is the GPU tests'); a failed build is one
typed error. GPU (`gpu` marker): the native ops against the Python path and torch, on kernels built by the
project's own emit/build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fact_ray.errors import CompileError
from fact_ray.realize import dispatch
from fact_ray.types import GemmProblem

REPO = Path(__file__).resolve().parents[1]
# The worktree's own build cache: the extension builds once per torch version, not once per test run.
CACHE = str(REPO / ".fact-ray" / "build-cache")

STUB = r"""
#include <stddef.h>
extern "C" {
int fr_abi_version(void) { return VERSION; }
const char* fr_t_name = "NAME";  /* other bytes per stub: a kernel id is the library's content */
#if GEMM
size_t fr_t_workspace(const void*) { return 0; }
int fr_t_can_implement(const void*) { return 0; }
int fr_t_run(const void*) { return 0; }
#endif
#if NORM
int fr_norm_element(void) { return 1; }   /* bfloat16 */
int fr_norm_run(const void*) { return 0; }
#endif
#if ROPE
int fr_rope_element(void) { return 1; }   /* bfloat16 */
int fr_rope_t256_u1_run(const void*) { return 0; }
#endif
#if ATTN
int fr_attn_supports(int dtype) { return dtype == 1 || dtype == 2; }
size_t fr_attn_workspace(const void*) { return 0; }
int fr_attn_run(const void*) { return 0; }
#endif
}
"""


def stub(tmp: Path, name: str, version: int = 1, gemm: bool = False, norm: bool = False, attn: bool = False,
         rope: bool = False) -> str:
    src = tmp / f"{name}.cpp"
    src.write_text(STUB.replace("NAME", name).replace("VERSION", str(version)).replace("GEMM", str(int(gemm)))
                   .replace("NORM", str(int(norm))).replace("ATTN", str(int(attn))).replace("ROPE", str(int(rope))))
    out = tmp / f"{name}.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    return str(out)


@pytest.fixture(scope="module")
def native():
    dispatch.load(CACHE)
    return torch.ops.fact_ray_native


@pytest.fixture(scope="module")
def stubs(tmp_path_factory, native):
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    tmp = tmp_path_factory.mktemp("dispatch-stubs")
    return {"gemm": stub(tmp, "gemm", gemm=True), "gemm_cr": stub(tmp, "gemm_cr", gemm=True), "norm": stub(tmp, "norm", version=2, norm=True),
            "rope": stub(tmp, "rope", rope=True), "norm_v1": stub(tmp, "norm_v1", norm=True),
            "attn": stub(tmp, "attn", attn=True), "abi99": stub(tmp, "abi99", version=99, gemm=True),
            "bare": stub(tmp, "bare")}


def register_gemm(stubs, layout_a="row", layout_b="col", epilogue="bias", lib="gemm") -> str:
    problem = GemmProblem(M=16, N=32, K=64, layout_a=layout_a, layout_b=layout_b, epilogue=epilogue)
    return dispatch.register_gemm(stubs[lib], "fr_t", problem)


# --------------------------------------------------------------------------------------------- CPU


def test_extension_builds_with_the_schemas(native):
    schemas = {name: str(getattr(native, name).default._schema) for name in ("gemm", "attention", "norm",
                                                                             "register_kernel")}
    assert schemas["gemm"] == ("fact_ray_native::gemm(Tensor a, Tensor b, Tensor? bias, Tensor? residual, "
                               "str kernel) -> Tensor")
    assert schemas["attention"].startswith("fact_ray_native::attention(Tensor q, Tensor k, Tensor v, bool causal")
    assert "str kind, str kernel" in schemas["norm"]
    assert "str path, str symbol, str family, str dtype" in schemas["register_kernel"]
    # CUDA impls exactly where torch is a CUDA build.
    assert dispatch.has_cuda() == (torch.version.cuda is not None)


def test_the_extension_binds_nothing_process_wide(native):
    """No GNU unique symbols: the dynamic linker binds those process-wide whatever RTLD_LOCAL says, so a library
    loaded after ours would share them (the extension's other symbols stay local to it through RTLD_LOCAL)."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf not on PATH")
    so = dispatch.build(CACHE)
    table = subprocess.run(["readelf", "-sW", "--dyn-syms", str(so)], capture_output=True, text=True,
                           check=True).stdout
    rows = [ln.split() for ln in table.splitlines()]
    defined = [r for r in rows if len(r) >= 8 and r[0].rstrip(":").isdigit() and r[6] != "UND"]
    assert defined and not [d[7] for d in defined if d[4] == "UNIQUE"]


def test_second_build_is_served_from_the_cache(native):
    path = dispatch.build(CACHE)
    mtime = path.stat().st_mtime_ns
    assert dispatch.build(CACHE) == path and path.stat().st_mtime_ns == mtime
    assert path.parent.name == dispatch._inputs()[2]  # keyed by source, flags and versions


def test_gemm_meta_gives_shapes_and_strides(native, stubs):
    kid = register_gemm(stubs)
    a = torch.empty(2, 8, 64, device="meta")
    w = torch.empty(32, 64, device="meta")
    y = native.gemm(a, w, torch.empty(32, device="meta"), None, kid)
    assert y.shape == (2, 8, 32) and y.is_contiguous() and y.dtype == torch.float32
    # A stored [K, M] ("col") and B stored [K, N] ("row")
    kid_cr = register_gemm(stubs, layout_a="col", layout_b="row", epilogue="none", lib="gemm_cr")
    y = native.gemm(torch.empty(3, 64, 16, device="meta"), torch.empty(3, 64, 32, device="meta"), None, None, kid_cr)
    assert y.shape == (3, 16, 32)


def test_gemm_meta_refuses_what_the_kernel_cannot_take(native, stubs):
    kid = register_gemm(stubs)
    a, w, bias = (torch.empty(s, device="meta") for s in ((8, 64), (32, 48), (32,)))
    with pytest.raises(RuntimeError, match="K"):
        native.gemm(a, w, bias, None, kid)
    with pytest.raises(ValueError, match="needs bias"):
        native.gemm(a, torch.empty(32, 64, device="meta"), None, None, kid)
    with pytest.raises(ValueError, match="is BFloat16"):
        native.gemm(a.bfloat16(), torch.empty(32, 64, device="meta"), bias, None, kid)
    with pytest.raises(ValueError, match="not registered"):
        native.gemm(a, w, bias, None, "0" * 64 + ":nothing:float32")


def test_attention_and_norm_meta(native, stubs):
    from fact_ray.realize.attention_family import AttentionProblem
    from fact_ray.realize.norm_family import NormProblem

    attn = dispatch.register_fused(stubs["attn"], "attention_sm80", AttentionProblem(
        B=2, H=4, S=16, D=32, dtype="bfloat16", causal=True, scale=0.2, spelling="sdpa"))
    q = torch.empty(2, 16, 3, 4, 32, device="meta", dtype=torch.bfloat16)[:, :, 0].transpose(1, 2)
    o = native.attention(q, q, q, True, 0.2, attn)
    # the kernel's [B, S, H, D] buffer seen as [B, H, S, D]: what the model's transpose(1, 2) then reads for free
    assert o.shape == (2, 4, 16, 32) and o.stride() == (16 * 4 * 32, 32, 4 * 32, 1)
    norm = dispatch.register_fused(stubs["norm"], "norm", NormProblem(
        rows=16, cols=64, kind="rmsnorm", dtype="bfloat16", eps=1e-6, has_weight=True, has_bias=False))
    x = torch.empty(4, 64, 16, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    y = native.norm(x, torch.empty(64, device="meta", dtype=torch.bfloat16), None, 1e-6, "rmsnorm", norm)
    assert y.shape == (4, 16, 64) and y.is_contiguous()
    with pytest.raises(ValueError, match="is a norm kernel"):
        native.attention(q, q, q, True, 0.2, norm)


def test_rope_meta_keeps_x_layout_and_norm_abi_1_is_refused(native, stubs):
    from fact_ray.realize.norm_family import NormProblem
    from fact_ray.realize.rope_family import RopeProblem

    problem = RopeProblem(x_shape=(2, 4, 16, 32), x_stride=(2048, 32, 128, 1), cos_shape=(16, 32),
                          sin_shape=(16, 32), form="half", dtype="bfloat16")
    kid = dispatch.register_fused(stubs["rope"], "rope", problem, symbol="fr_rope_t256_u1_run")
    assert kid.endswith(":fr_rope_t256_u1_run:bfloat16") and dispatch.is_registered(kid)
    schema = str(native.rope.default._schema)
    assert schema == "fact_ray_native::rope(Tensor x, Tensor cos, Tensor sin, str form, str kernel) -> Tensor"
    # q as the graph holds it: a [B, H, S, D] view of [B, S, H * D]; the output keeps that layout
    x = torch.empty(2, 16, 4, 32, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    cos = torch.empty(16, 32, device="meta", dtype=torch.bfloat16)
    y = native.rope(x, cos, cos, "half", kid)
    assert y.shape == x.shape and y.stride() == x.stride()
    with pytest.raises(ValueError, match="not half or interleaved"):
        native.rope(x, cos, cos, "complex", kid)
    with pytest.raises(ValueError, match="is a rope kernel"):
        native.norm(x, None, None, 1e-6, "rmsnorm", kid)
    with pytest.raises(NotImplementedError, match="rope runs on cuda tensors"):
        native.rope(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16),
                    torch.randn(8, dtype=torch.bfloat16), "half", kid)
    with pytest.raises(CompileError, match="lacks fr_rope_t512_u1_run"):
        dispatch.register_fused(stubs["rope"], "rope", problem, symbol="fr_rope_t512_u1_run")
    with pytest.raises(CompileError, match="speaks norm ABI version 1, this dispatcher speaks 2"):
        dispatch.register_fused(stubs["norm_v1"], "norm", NormProblem(
            rows=16, cols=64, kind="rmsnorm", dtype="bfloat16", eps=1e-6, has_weight=True, has_bias=False))


def test_native_op_exports_through_its_meta_impl(native, stubs):
    kid = register_gemm(stubs)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(32, 64))
            self.b = torch.nn.Parameter(torch.randn(32))

        def forward(self, x):
            return torch.relu(torch.ops.fact_ray_native.gemm(x, self.w, self.b, None, kid))

    ep = torch.export.export(Lin(), (torch.randn(2, 8, 64),))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and "fact_ray_native" in str(n.target)]
    assert len(calls) == 1 and calls[0].args[-1] == kid
    assert tuple(calls[0].meta["val"].shape) == (2, 8, 32)


def test_cpu_tensors_are_refused_loudly(native, stubs):
    kid = register_gemm(stubs)
    with pytest.raises(NotImplementedError, match="runs on cuda tensors"):
        native.gemm(torch.randn(8, 64), torch.randn(32, 64), torch.randn(32), None, kid)


def test_register_kernel_refuses_foreign_libraries(native, stubs, tmp_path):
    p = GemmProblem(M=16, N=32, K=64)
    with pytest.raises(CompileError, match="cannot load .*no_such.so"):
        dispatch.register_gemm(str(tmp_path / "no_such.so"), "fr_t", p, digest="a" * 64)
    with pytest.raises(CompileError, match="speaks gemm ABI version 99, this dispatcher speaks 1"):
        dispatch.register_gemm(stubs["abi99"], "fr_t", p)
    with pytest.raises(CompileError, match="not a fact-ray kernel library: it lacks fr_t_workspace"):
        dispatch.register_gemm(stubs["bare"], "fr_t", p)
    with pytest.raises(CompileError, match="holds no attention kernel for float32"):
        from fact_ray.realize.attention_family import AttentionProblem

        dispatch.register_fused(stubs["attn"], "attention_sm80", AttentionProblem(
            B=1, H=1, S=8, D=32, dtype="float32", causal=True, scale=0.1, spelling="sdpa"))
    assert not dispatch.is_registered(dispatch.kernel_id("a" * 64, "fr_t", "float32"))


def test_registration_is_idempotent_and_by_content(native, stubs, tmp_path):
    kid = register_gemm(stubs)
    assert register_gemm(stubs) == kid and dispatch.is_registered(kid)
    copy = tmp_path / "copy.so"
    shutil.copyfile(stubs["gemm"], copy)  # the same bytes elsewhere: the same kernel id
    assert dispatch.register_gemm(str(copy), "fr_t", GemmProblem(M=1, N=1, K=1, epilogue="bias")) == kid
    with pytest.raises(CompileError, match="already registered as another kernel"):
        dispatch.register_gemm(str(copy), "fr_t", GemmProblem(M=1, N=1, K=1, epilogue="residual"))


def test_a_failed_build_is_one_typed_error(tmp_path):
    # A compiler that fails, in a fresh process and cache: DispatchUnavailable with the log's path; `auto` says it
    # once and uses the Python ops, `native` raises, `python` never builds.
    fake = tmp_path / "bin" / "c++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fr_dispatch.cpp:1:1: error: planted failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = (
        "import logging, sys\n"
        "from fact_ray.errors import DispatchUnavailable\n"
        "from fact_ray.realize import dispatch\n"
        "try:\n"
        f"    dispatch.load({str(tmp_path / 'cache')!r})\n"
        "except DispatchUnavailable as e:\n"
        "    print('ERR', e)\n"
        "print('AUTO', dispatch.available())\n"
        "print('AUTO', dispatch.available())\n")
    env = dict(os.environ, CXX=str(fake), FACT_RAY_DISPATCH="auto")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ERR the native dispatcher did not build:") and "log:" in lines[0], out.stdout
    assert lines[1:] == ["AUTO False", "AUTO False"]
    assert out.stderr.count("Python custom ops instead") == 1, out.stderr
    assert not list((tmp_path / "cache" / "dispatch").glob("[0-9a-f]*[!g]")), "no entry for a failed build"


def test_python_mode_never_builds(tmp_path):
    code = ("from fact_ray.realize import dispatch\n"
            f"print(dispatch.available({str(tmp_path / 'cache')!r}))\n")
    env = dict(os.environ, FACT_RAY_DISPATCH="python")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.stdout.strip() == "False" and not (tmp_path / "cache").exists(), out.stderr[-2000:]


# --------------------------------------------------------------------------------------------- GPU


def _gemm_library(problem: GemmProblem, policy, tmp: Path):
    """One verified-shape config of the problem, built by the project's own emit/build (sm90 on Hopper)."""
    from fact_ray.toolchain import detect
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.search_spaces import space

    arch = detect(nvcc=None).arch
    cfg = next(c for c in space(problem, arch, policy, 8) if c.split_k == 1)
    (source,) = emit([cfg], arch)
    lib = build(source, str(tmp))
    assert lib.ok, lib.log[-3000:]
    return cfg, lib, source.symbols[0]


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ["bias", "bias_residual"])
def test_native_gemm_matches_the_python_path_and_torch(native, tmp_path_factory, epilogue):
    from fact_ray.realize.kernel import GemmKernel, torch_op
    from fact_ray.types import Precision

    problem = GemmProblem(M=256, N=128, K=64, dtype="bfloat16", epilogue=epilogue)
    cfg, lib, sym = _gemm_library(problem, Precision.BF16, Path(CACHE))
    kid = dispatch.register_gemm(lib.path, sym, problem, cfg.split_k)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(2, 128, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    bias = torch.randn(128, device="cuda", dtype=torch.bfloat16, generator=g)
    res = torch.randn(2, 128, 128, device="cuda", dtype=torch.bfloat16, generator=g) \
        if epilogue == "bias_residual" else None
    out = native.gemm(a, w, bias, res, kid)
    ctypes_kernel = GemmKernel(lib, cfg, problem)
    py = ctypes_kernel(a, w, bias, res)
    ref = torch_op(problem)(a.double(), w.double(), bias.double(), None if res is None else res.double())
    torch.cuda.synchronize()
    assert out.shape == (2, 128, 128) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, py, rtol=0, atol=0)  # the same kernel, the same arguments
    # what trials time (tune._time_all): the composed module's call, not the ctypes wrapper
    timed = dispatch.composed_gemm(ctypes_kernel, torch.device("cuda"))
    assert timed is not ctypes_kernel
    torch.testing.assert_close(timed(a, w, bias, res), out, rtol=0, atol=0)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    # under torch.compile the op is opaque and still the same kernel
    compiled = torch.compile(lambda a, w, b, r: native.gemm(a, w, b, r, kid) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(a, w, bias, res), out * 2, rtol=0, atol=0)


@pytest.mark.gpu
def test_native_gemm_refuses_bad_operands_with_one_clear_error(native):
    from fact_ray.types import Precision

    problem = GemmProblem(M=256, N=128, K=64, dtype="bfloat16", epilogue="bias")
    cfg, lib, sym = _gemm_library(problem, Precision.BF16, Path(CACHE))
    kid = dispatch.register_gemm(lib.path, sym, problem, cfg.split_k)
    a = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="A is Float"):
        native.gemm(a.float(), w, bias, None, kid)
    with pytest.raises(ValueError, match="needs bias"):
        native.gemm(a, w, None, None, kid)
    with pytest.raises(ValueError, match="not contiguous"):
        native.gemm(a.t().contiguous().t(), w, bias, None, kid)
    shifted = torch.empty(a.numel() + 8, device="cuda", dtype=a.dtype)[1:1 + a.numel()].view_as(a)  # 2 bytes off
    with pytest.raises(ValueError, match="16-byte aligned"):
        native.gemm(shifted.copy_(a), w, bias, None, kid)
    torch.cuda.synchronize()  # nothing was launched on a refused call; the context is fine


@pytest.mark.gpu
def test_native_norm_and_attention_match_the_python_path(native):
    from fact_ray.realize.attention_family import AttentionFamily, AttentionProblem
    from fact_ray.realize.build import build
    from fact_ray.realize.norm import emit_norm
    from fact_ray.realize.norm_family import NormFamily, NormProblem
    from fact_ray.toolchain import detect

    arch = detect(nvcc=None).arch
    tmp = CACHE
    norm_p = NormProblem(rows=256, cols=512, kind="layernorm", dtype="bfloat16", eps=1e-5, has_weight=True,
                         has_bias=True)
    norm_lib = build(emit_norm("bfloat16", arch), tmp)
    assert norm_lib.ok, norm_lib.log[-3000:]
    kid = dispatch.register_fused(norm_lib.path, "norm", norm_p)
    norms, attns = NormFamily(), AttentionFamily()
    x, w, b = norms.make_inputs(norm_p, "cuda", 0)
    y = native.norm(x, w, b, norm_p.eps, "layernorm", kid)
    torch.testing.assert_close(y, norms.kernel_fn(norm_p, norm_lib)(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(y.float(), torch.nn.functional.layer_norm(x.float(), (512,), w.float(), b.float()),
                               rtol=2e-2, atol=2e-2)

    attn_p = AttentionProblem(B=2, H=4, S=128, D=64, dtype="bfloat16", causal=True, scale=64 ** -0.5,
                              spelling="sdpa")
    (source, *_) = attns.sources(attns.candidates(attn_p, "bf16", arch, 1), arch)
    from fact_ray.realize.build import build as build_one

    attn_lib = build_one(source, tmp)
    assert attn_lib.ok, attn_lib.log[-3000:]
    kid = dispatch.register_fused(attn_lib.path, source.configs[0].template, attn_p)
    q, k, v = attns.make_inputs(attn_p, "cuda", 1)
    o = native.attention(q, k, v, True, attn_p.scale, kid)
    assert o.stride() == attns.kernel_fn(attn_p, attn_lib)(q, k, v).stride()
    torch.testing.assert_close(o, attns.kernel_fn(attn_p, attn_lib)(q, k, v), rtol=0, atol=0)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(o.float(), ref, rtol=3e-2, atol=3e-2)
