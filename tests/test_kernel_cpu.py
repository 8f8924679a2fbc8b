"""GemmKernel, load_library, register_op and torch_op on a CPU.

The ctypes path is exercised for real: a small host library that implements the fr_gemm_args ABI (a plain
C++ GEMM over host pointers) is compiled with g++ and loaded through the same code that loads CUTLASS
libraries. Only the CUDA launch itself (stream, device pointers) is left to the GPU tests.
"""

import ctypes
import shutil
import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fact_ray.errors import CannotImplement, CompileError, LaunchError
from fact_ray.realize import kernel as K
from fact_ray.realize.kernel import FrGemmArgs, GemmKernel, check_operands, register_op, torch_op
from fact_ray.realize.verify import verify
from fact_ray.types import Arch, GemmProblem, KernelConfig, Library, Precision, Source

TEMPLATES = Path(K.__file__).parent / "templates"
FIELDS = [name for name, _ in FrGemmArgs._fields_]

# The ABI of the brief, used when the emit helper's fr_abi.h is not there (yet).
_STRUCT = """
typedef struct {
  const void* A; const void* B; const void* C; void* D; const void* bias;
  int64_t M, N, K, L;
  int64_t lda, ldb, ldc, ldd;
  int64_t batch_stride_a, batch_stride_b, batch_stride_c, batch_stride_d;
  float alpha, beta;
  int32_t split_k;
  int32_t sm_count;
  void* workspace; size_t workspace_size;
  void* stream;
} fr_gemm_args;
"""

HOST_LIB = r"""
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#if USE_HEADER
#include "fr_abi.h"
#else
STRUCT
#endif

extern "C" {
int fr_abi_version(void) { return ABI; }
fr_gemm_args fr_test_last;
size_t fr_test_offsets(size_t* out) {
  size_t i = 0;
  OFFSETS
  return sizeof(fr_gemm_args);
}

// D[l] = A[l] @ B[l]^T (+ bias) (+ beta * C), fp32, B stored [N, K]: what a TN kernel computes.
static int gemm_tn(const fr_gemm_args* a, float extra) {
  fr_test_last = *a;
  if (a->workspace_size && !a->workspace) return 11;
  if (a->workspace) memset(a->workspace, 0x5a, a->workspace_size);  // must be a real buffer of that size
  for (int64_t l = 0; l < a->L; ++l)
    for (int64_t m = 0; m < a->M; ++m)
      for (int64_t n = 0; n < a->N; ++n) {
        const float* A = (const float*)a->A + l * a->batch_stride_a + m * a->lda;
        const float* B = (const float*)a->B + l * a->batch_stride_b + n * a->ldb;
        float acc = 0.f;
        for (int64_t k = 0; k < a->K; ++k) acc += A[k] * B[k];
        acc *= a->alpha;
        if (a->bias) acc += ((const float*)a->bias)[n];
        if (a->C) acc += a->beta * ((const float*)a->C)[l * a->batch_stride_c + m * a->ldc + n];
        ((float*)a->D)[l * a->batch_stride_d + m * a->ldd + n] = acc + extra;
      }
  return 0;
}

size_t tn_workspace(const fr_gemm_args* a) { return (size_t)(a->M * 4); }
int tn_can_implement(const fr_gemm_args* a) { return a->K % 4 != 0; }   // like an alignment-4 kernel
int tn_run(const fr_gemm_args* a) { return gemm_tn(a, 0.f); }

size_t off_workspace(const fr_gemm_args* a) { return 0; }
int off_can_implement(const fr_gemm_args* a) { return 0; }
int off_run(const fr_gemm_args* a) { return gemm_tn(a, 0.5f); }          // wrong by 0.5 everywhere

size_t noimpl_workspace(const fr_gemm_args* a) { return 0; }
int noimpl_can_implement(const fr_gemm_args* a) { return 3; }
int noimpl_run(const fr_gemm_args* a) { return 0; }

size_t fail_workspace(const fr_gemm_args* a) { return 0; }
int fail_can_implement(const fr_gemm_args* a) { return 0; }
int fail_run(const fr_gemm_args* a) { return 7; }
}
"""

SYMBOLS = ("tn", "off", "noimpl", "fail")


def host_kernel_class():
    class HostGemmKernel(GemmKernel):
        """The same kernel wrapper over host memory: no stream, no SM count."""

        device_type = "cpu"

        def _stream(self, device):
            return 0

        def _sm_count(self, device):
            return 0

    return HostGemmKernel


HostGemmKernel = host_kernel_class()


def config(name: str, **kw) -> KernelConfig:
    base = dict(template="host", name=name, arch=Arch.SM80, precision=Precision.FP32, element="float",
                opclass="simt", math_op="multiply_add", instruction=(1, 1, 1), tile=(32, 32, 8))
    base.update(kw)
    return KernelConfig(**base)


def _compile_host_lib(out_dir: Path, abi: int, name: str) -> tuple[Path, bool]:
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no host C++ compiler (g++) to build the host ABI library")
    header = TEMPLATES / "fr_abi.h"
    offsets = "\n  ".join(f"out[i++] = offsetof(fr_gemm_args, {f});" for f in FIELDS)
    src = HOST_LIB.replace("STRUCT", _STRUCT).replace("OFFSETS", offsets)
    cpp = out_dir / f"{name}.cpp"
    cpp.write_text(src)
    so = out_dir / f"{name}.so"
    cmd = [gxx, "-O1", "-shared", "-fPIC", f"-DABI={abi}", f"-DUSE_HEADER={int(header.is_file())}",
           "-I", str(TEMPLATES), "-o", str(so), str(cpp)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return so, header.is_file()


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostabi")
    so, used_header = _compile_host_lib(d, 1, "host_abi_v1")
    configs = tuple(config(s) for s in SYMBOLS)
    source = Source(name="host_abi_v1", arch=Arch.SM80, code="", configs=configs, symbols=SYMBOLS)
    lib = Library(source=source, key="hostabi-v1", ok=True, path=str(so))
    return lib, used_header


PROBLEM = GemmProblem(M=24, N=16, K=32, epilogue="bias")


def rand(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


# --------------------------------------------------------------------------------------------- ABI


def test_ctypes_struct_matches_the_c_layout(host_lib):
    lib, used_header = host_lib
    handle = ctypes.CDLL(lib.path)
    out = (ctypes.c_size_t * len(FIELDS))()
    handle.fr_test_offsets.restype = ctypes.c_size_t
    size = handle.fr_test_offsets(out)
    assert size == ctypes.sizeof(FrGemmArgs)
    assert list(out) == [getattr(FrGemmArgs, f).offset for f in FIELDS]


def test_load_library_checks_the_abi_version(tmp_path):
    so, _ = _compile_host_lib(tmp_path, 2, "host_abi_v2")
    source = Source(name="v2", arch=Arch.SM80, code="", configs=(config("tn"),), symbols=("tn",))
    with pytest.raises(CompileError, match="fr_abi version 2.*speaks 1"):
        K.load_library(Library(source=source, key="v2", ok=True, path=str(so)))


def test_load_library_reports_failed_and_missing_builds(tmp_path):
    source = Source(name="x", arch=Arch.SM90, code="", configs=(config("tn"),), symbols=("tn",))
    log = "nvcc warning: something\nkernel.cu(12): error: identifier \"Foo\" is undefined\nmore"
    with pytest.raises(CompileError, match=r'kernel.cu\(12\): error: identifier "Foo" is undefined') as e:
        K.load_library(Library(source=source, key="x", ok=False, log=log))
    assert e.value.log == log
    with pytest.raises(CompileError, match="cannot load"):
        K.load_library(Library(source=source, key="y", ok=True, path=str(tmp_path / "missing.so")))


# --------------------------------------------------------------------------------------------- the kernel


def test_host_kernel_fills_args_and_computes(host_lib):
    lib, _ = host_lib
    cfg = replace(lib.source.configs[0], split_k=3)
    kern = HostGemmKernel(lib, cfg, PROBLEM)
    a, b, bias = rand(2, 12, 32), rand(16, 32), rand(16)  # leading dims fold into M = 24
    out = kern(a, b, bias)
    assert out.shape == (2, 12, 16)
    torch.testing.assert_close(out, torch_op(PROBLEM)(a, b, bias), rtol=1e-5, atol=1e-5)
    last = FrGemmArgs.in_dll(ctypes.CDLL(lib.path), "fr_test_last")
    assert (last.M, last.N, last.K, last.L) == (24, 16, 32, 1)
    assert (last.lda, last.ldb, last.ldd) == (32, 32, 16)
    assert last.C is None and last.beta == 0.0 and last.alpha == 1.0
    assert last.bias == bias.data_ptr() and last.D == out.data_ptr()
    assert last.split_k == 3
    assert last.workspace_size == 24 * 4 and last.workspace is not None
    # the workspace is cached per size: a second call at the same shape reuses it
    kern(a, b, bias)
    assert FrGemmArgs.in_dll(ctypes.CDLL(lib.path), "fr_test_last").workspace == last.workspace


def test_host_kernel_batched_broadcast_and_residual(host_lib):
    lib, _ = host_lib
    prob = GemmProblem(M=8, N=16, K=32, L=3, epilogue="bias_residual", broadcast_b=True)
    kern = HostGemmKernel(lib, lib.source.configs[0], prob)
    a, b, bias, res = rand(3, 8, 32), rand(16, 32), rand(16), rand(3, 8, 16)
    out = torch.full((3, 8, 16), float("nan"))
    assert kern(a, b, bias, res, out=out) is out
    torch.testing.assert_close(out, torch_op(prob)(a, b, bias, res), rtol=1e-5, atol=1e-5)
    last = FrGemmArgs.in_dll(ctypes.CDLL(lib.path), "fr_test_last")
    assert (last.L, last.batch_stride_a, last.batch_stride_b, last.batch_stride_c, last.batch_stride_d) == \
        (3, 8 * 32, 0, 8 * 16, 8 * 16)
    assert last.beta == 1.0 and last.C == res.data_ptr()


def test_host_kernel_passes_verify(host_lib):
    lib, _ = host_lib
    kern = HostGemmKernel(lib, lib.source.configs[0], PROBLEM)
    res = verify(lambda a, b, bias, r, out: kern(a, b, bias, r, out=out), PROBLEM, Precision.FP32, "cpu")
    assert res.ok, res.reason
    off = HostGemmKernel(lib, lib.source.configs[1], PROBLEM)
    res = verify(lambda a, b, bias, r, out: off(a, b, bias, r, out=out), PROBLEM, Precision.FP32, "cpu")
    assert not res.ok and "rel err" in res.reason


def test_status_codes_map_to_typed_errors(host_lib):
    lib, _ = host_lib
    a, b, bias = rand(24, 32), rand(16, 32), rand(16)
    with pytest.raises(CannotImplement, match="can_implement rejects M=24 N=16 K=32 L=1 \\(status 3\\)"):
        HostGemmKernel(lib, lib.source.configs[2], PROBLEM)(a, b, bias)
    with pytest.raises(LaunchError, match="run failed with status 7") as e:
        HostGemmKernel(lib, lib.source.configs[3], PROBLEM)(a, b, bias)
    assert isinstance(e.value, RuntimeError) and e.value.status == "crashed"
    odd = GemmProblem(M=24, N=16, K=30, epilogue="bias")  # tn's can_implement wants K % 4 == 0
    with pytest.raises(CannotImplement, match="can_implement rejects"):
        HostGemmKernel(lib, lib.source.configs[0], odd)(rand(24, 30), rand(16, 30), bias)


def test_cuda_kernel_refuses_host_tensors(host_lib):
    lib, _ = host_lib
    kern = GemmKernel(lib, lib.source.configs[0], PROBLEM)
    with pytest.raises(CannotImplement, match="runs on cuda tensors"):
        kern(rand(24, 32), rand(16, 32), rand(16))


def test_unknown_config_is_a_bug_not_a_candidate_error(host_lib):
    lib, _ = host_lib
    with pytest.raises(ValueError, match="not in library"):
        GemmKernel(lib, config("nope"), PROBLEM)


@pytest.mark.parametrize("case, pattern", [
    ("dtype", "A is float64, the kernel takes float32"),
    ("contiguous", "B is not contiguous"),
    ("aligned", "A is not 16-byte aligned"),
    ("k", "A has K = 16"),
    ("bshape", r"B has shape \(16, 16\)"),
    ("nobias", "needs a bias"),
    ("residual", "takes no residual"),
    ("out", r"D has shape \(24, 8\)"),
])
def test_operand_checks_raise_cannot_implement(case, pattern):
    a, b, bias, res, out = rand(24, 32), rand(16, 32), rand(16), None, None
    if case == "dtype":
        a = a.double()
    elif case == "contiguous":
        b = rand(32, 16).t()
    elif case == "aligned":
        a = rand(24 * 32 + 1)[1:].view(24, 32)  # offset by 4 bytes: contiguous but misaligned
    elif case == "k":
        a = rand(24, 16)
    elif case == "bshape":
        b = rand(16, 16)
    elif case == "nobias":
        bias = None
    elif case == "residual":
        res = rand(24, 16)
    elif case == "out":
        out = rand(24, 8)
    with pytest.raises(CannotImplement, match=pattern):
        check_operands(PROBLEM, a, b, bias, res, out)


# --------------------------------------------------------------------------------------------- custom op


class LinearViaOp(torch.nn.Module):
    def __init__(self, op, n, k):
        super().__init__()
        self.op = op
        self.weight = torch.nn.Parameter(torch.rand(n, k))
        self.bias = torch.nn.Parameter(torch.rand(n))

    def forward(self, x):
        return self.op(x, self.weight, self.bias) * 2.0


def test_custom_op_fake_impl_and_export(host_lib):
    lib, _ = host_lib
    prob = GemmProblem(M=64, N=16, K=32, epilogue="bias")
    op = register_op(HostGemmKernel(lib, lib.source.configs[0], prob), prob)
    assert register_op(HostGemmKernel(lib, lib.source.configs[0], prob), prob) is op  # same content, same op

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        y = op(torch.empty(4, 16, 32), torch.empty(16, 32), torch.empty(16))
        assert y.shape == (4, 16, 16) and y.dtype == torch.float32
        with pytest.raises(ValueError, match="A has K = 8"):
            op(torch.empty(4, 8), torch.empty(16, 32), torch.empty(16))

    mod = LinearViaOp(op, 16, 32)
    ep = torch.export.export(mod, (torch.rand(4, 16, 32),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("fact_ray." + K.op_name(lib.source.configs[0], prob, lib.key)) for t in targets)
    out_node = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out_node.meta["val"].shape) == (4, 16, 16)

    # and the real implementation runs through the library
    x = torch.rand(4, 16, 32)
    torch.testing.assert_close(ep.module()(x), mod(x))
    torch.testing.assert_close(mod(x), 2.0 * torch.nn.functional.linear(x, mod.weight, mod.bias), rtol=1e-5,
                               atol=1e-5)


def test_op_names_are_identifiers_and_differ_by_content():
    c1 = config("cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x128x64_1x2x1_0_tnt_align8")
    p = GemmProblem(M=8, N=8, K=8)
    n1, n2 = K.op_name(c1, p, "k1"), K.op_name(c1, p, "k2")
    assert n1 != n2 and n1.isidentifier() and n1 == K.op_name(c1, p, "k1")
    assert K.op_name(config("128x128-x"), p).isidentifier()


# --------------------------------------------------------------------------------------------- torch op


@pytest.mark.parametrize("act, ref", [
    ("none", lambda y: y),
    ("relu", lambda y: y.clamp_min(0)),
    ("gelu", lambda y: 0.5 * y * (1 + torch.erf(y / 2 ** 0.5))),
    ("gelu_tanh", lambda y: 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))),
    ("silu", lambda y: y * torch.sigmoid(y)),
])
def test_torch_op_activations(act, ref):
    p = GemmProblem(M=5, N=6, K=7, dtype="float64", epilogue="bias_act" if act != "none" else "bias",
                    activation=act)
    a, b, bias = torch.randn(5, 7, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64), \
        torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(torch_op(p)(a, b, bias), ref(a @ b.T + bias))


def test_torch_op_layouts_batches_and_residual():
    d = torch.float64
    a, b, r = torch.randn(3, 5, 7, dtype=d), torch.randn(3, 7, 6, dtype=d), torch.randn(3, 5, 6, dtype=d)
    bmm = GemmProblem(M=5, N=6, K=7, L=3, dtype="float64", layout_b="row")
    torch.testing.assert_close(torch_op(bmm)(a, b), torch.bmm(a, b))
    res = GemmProblem(M=5, N=6, K=7, L=3, dtype="float64", layout_b="row", epilogue="bias_residual")
    bias = torch.randn(6, dtype=d)
    torch.testing.assert_close(torch_op(res)(a, b, bias, r), torch.bmm(a, b) + bias + r)
    col_a = GemmProblem(M=5, N=6, K=7, dtype="float64", layout_a="col", layout_b="row")
    at, b2 = torch.randn(7, 5, dtype=d), torch.randn(7, 6, dtype=d)
    torch.testing.assert_close(torch_op(col_a)(at, b2), at.T @ b2)
    with pytest.raises(ValueError, match="unknown activation"):
        torch_op(GemmProblem(M=1, N=1, K=1, activation="swish2"))


# --------------------------------------------------------------------------------------------- nvcc


NVCC_LIB = r"""
#include <cuda_runtime.h>
#include <stdint.h>
#include <stddef.h>
STRUCT
__global__ void fill(float* d, int64_t n) { int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; if (i < n) d[i] = 0.f; }
extern "C" {
int fr_abi_version(void) { return 1; }
size_t z_workspace(const fr_gemm_args* a) { return 0; }
int z_can_implement(const fr_gemm_args* a) { return 0; }
int z_run(const fr_gemm_args* a) {
  int64_t n = a->M * a->N * a->L;
  fill<<<(unsigned)((n + 255) / 256), 256, 0, (cudaStream_t)a->stream>>>((float*)a->D, n);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
}
"""


@pytest.mark.nvcc
def test_nvcc_built_library_loads_without_a_gpu(tmp_path):
    nvcc = shutil.which("nvcc")
    cu = tmp_path / "z.cu"
    cu.write_text(NVCC_LIB.replace("STRUCT", textwrap.dedent(_STRUCT)))
    so = tmp_path / "z.so"
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-cudart", "static", "-gencode",
                    "arch=compute_80,code=sm_80", "-o", str(so), str(cu)], check=True, capture_output=True,
                   text=True, timeout=300)
    source = Source(name="z", arch=Arch.SM80, code="", configs=(config("z"),), symbols=("z",))
    lib = Library(source=source, key="z", ok=True, path=str(so))
    kern = GemmKernel(lib, source.configs[0], GemmProblem(M=8, N=8, K=8))  # dlopen + ABI check, no GPU needed
    assert kern.symbol == "z"
