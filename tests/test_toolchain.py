"""The toolchain module: versions parsed from the real tools, one builder of the table key's toolchain part, one
arch resolution. CPU only (the real nvcc where it is installed)."""

import ast
import subprocess
from pathlib import Path

import pytest

from fact_ray.errors import NotAvailable
from fact_ray.toolchain import (
    Host,
    Toolchain,
    arch_of,
    detect,
    key_toolchain,
    parse_nvcc_version,
    resolve_nvcc,
    target_arch,
)
from fact_ray.types import Arch

ROOT = Path(__file__).resolve().parents[1]

# `nvcc --version` of the CUDA 12.4 toolkit, as printed (a release other than the one installed here).
NVCC_12_4 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2024 NVIDIA Corporation
Built on Thu_Mar_28_02:18:24_PDT_2024
Cuda compilation tools, release 12.4, V12.4.131
Build cuda_12.4.r12.4/compiler.34097967_0
"""


def test_parse_nvcc_version_of_a_banner_a_line_and_a_bare_version():
    assert parse_nvcc_version(NVCC_12_4) == "12.4.131"
    assert parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.88") == "13.0.88"  # a v2 row's value
    assert parse_nvcc_version("Cuda compilation tools, release 12.8") == "12.8"  # no V build number
    assert parse_nvcc_version(" 13.0.88 ") == "13.0.88"


@pytest.mark.parametrize("text", ["/usr/local/cuda/bin/nvcc", "", "nvcc", "Built on Thu_Mar_28", "release notes"])
def test_parse_nvcc_version_refuses_what_names_no_version(text):
    with pytest.raises(ValueError):
        parse_nvcc_version(text)


@pytest.mark.nvcc
def test_the_real_nvcc_banner_parses_to_its_version_and_never_to_its_path():
    path = resolve_nvcc("nvcc")
    banner = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    version = parse_nvcc_version(banner)
    assert f"V{version}" in banner  # the build number the banner prints, e.g. V13.0.88
    host = detect()
    assert host.nvcc == version and "/" not in host.nvcc and path not in host.nvcc
    assert detect() is host  # asked once per process
    key = key_toolchain(host)
    assert key == Toolchain(cuda=version, cutlass=host.cutlass, torch=host.torch, bench_method=host.bench_method)


def test_detect_without_nvcc_records_the_rest_and_makes_no_key():
    host = detect(nvcc=None)
    import torch

    assert host.nvcc == "" and host.torch == torch.__version__ and host.torch_cuda == (torch.version.cuda or "")
    assert (host.capability is None) == (not torch.cuda.is_available()) and (host.gpu_name == "") == (
        host.capability is None)
    assert set(host.recorded()) >= {"nvcc", "cutlass", "torch", "bench_method", "driver", "cublas", "cudnn"}
    with pytest.raises(NotAvailable, match="no nvcc version"):
        key_toolchain(host)


def test_a_missing_nvcc_is_not_available(tmp_path):
    with pytest.raises(NotAvailable, match="nvcc not found"):
        detect(str(tmp_path / "no-nvcc"))


def test_the_key_names_nvcc_cutlass_torch_and_the_bench_method_only():
    a = Host(nvcc="13.0.88", cutlass="4.2.0.0", torch="2.11.0+cu130", driver="580.95.05", cublas="13.0.2.14",
             cudnn="91200", gpu_name="NVIDIA H200", capability=(9, 0))
    b = Host(nvcc="13.0.88", cutlass="4.2.0.0", torch="2.11.0+cu130", driver="590.10", cublas="13.1.0.3",
             cudnn="91300", gpu_name="NVIDIA H100 80GB HBM3", capability=(9, 0))
    assert key_toolchain(a) == key_toolchain(b)  # recorded, not keyed: rows stay reusable across drivers
    for changed in (Host(nvcc="13.1.20", cutlass="4.2.0.0", torch="2.11.0+cu130"),
                    Host(nvcc="13.0.88", cutlass="4.3.0.0", torch="2.11.0+cu130"),
                    Host(nvcc="13.0.88", cutlass="4.2.0.0", torch="2.12.0+cu130"),
                    Host(nvcc="13.0.88", cutlass="4.2.0.0", torch="2.11.0+cu130", bench_method="2")):
        assert key_toolchain(changed).fingerprint != key_toolchain(a).fingerprint


def test_a_cluster_key_takes_the_compiler_from_the_compile_node_and_the_rest_from_the_gpu_node():
    gpu_node = Host(torch="2.11.0+cu130", driver="580.95.05", gpu_name="NVIDIA H200", capability=(9, 0))
    compile_node = Host(nvcc="13.0.88", cutlass="4.2.0.0", torch="2.11.0+cpu")
    both = gpu_node.built_by(compile_node)
    assert key_toolchain(both) == Toolchain("13.0.88", "4.2.0.0", "2.11.0+cu130", gpu_node.bench_method)
    assert both.driver == "580.95.05" and both.arch == Arch.SM90


def _calls_to(name: str, path: Path) -> list[str]:
    """The functions of `path` that call `name(...)` ("<module>" for module level)."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.Call):
                f = child.func
                if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                    found.append(where)
            visit(child, inner)

    visit(tree, "<module>")
    return found


def _package_files() -> list[Path]:
    return [p for d in ("fact_ray", "actors", "pattern_table", "search_spaces") for p in (ROOT / d).rglob("*.py")]


def test_key_toolchain_is_the_only_builder_of_a_table_key_toolchain():
    """Outside key_toolchain a Toolchain is only rebuilt from a stored row, never assembled from a host's parts."""
    builders = {(str(p.relative_to(ROOT)), fn) for p in _package_files() for fn in _calls_to("Toolchain", p)}
    assert builders == {("fact_ray/toolchain.py", "key_toolchain"), ("pattern_table/row.py", "from_record")}


def test_the_arch_comes_from_a_capability_in_one_place():
    """No module but the toolchain maps a compute capability to an arch; the others ask target_arch or a Host."""
    readers = {str(p.relative_to(ROOT)) for p in _package_files() for _ in _calls_to("get_device_capability", p)}
    # tune: the arch of the device it tunes on (through target_arch); doctor: lists every GPU (through arch_of)
    assert readers <= {"fact_ray/toolchain.py", "fact_ray/realize/tune.py", "fact_ray/doctor.py"}, readers
    assert not [p for p in _package_files() if "def arch_for" in p.read_text()]


@pytest.mark.parametrize("wanted, capability, expected", [
    (None, None, None),  # no GPU, nothing asked: the caller decides (discover: sm90; compose: refuses)
    (Arch.SM80, None, Arch.SM80),  # no GPU: what was asked, unchecked (compiles for a GPU elsewhere)
    (None, (9, 0), Arch.SM90),
    (None, (8, 0), Arch.SM80),
    (None, (8, 9), Arch.SM80),  # Ada runs the sm80 kernels
    (Arch.SM80, (9, 0), Arch.SM80),  # 2.x kernels run on Hopper
    (Arch.SM90, (9, 0), Arch.SM90),
])
def test_target_arch(wanted, capability, expected):
    assert target_arch(wanted, capability, "GPU") == expected


@pytest.mark.parametrize("wanted, capability, message", [
    (None, (7, 5), "Tesla T4 \\(sm_75\\) is not a fact-ray target"),
    (None, (10, 0), "not a fact-ray target"),
    (Arch.SM90, (8, 0), "sm90 kernels \\(sm_90a\\) do not run on Tesla T4 \\(sm_80\\)"),
    (Arch.SM80, (7, 5), "sm80 kernels do not run on"),
])
def test_target_arch_refuses_a_gpu_that_cannot_run_it(wanted, capability, message):
    with pytest.raises(NotAvailable, match=message):
        target_arch(wanted, capability, "Tesla T4")


def test_arch_of_a_host_uses_the_same_mapping():
    assert [arch_of(c) for c in (None, (9, 0), (8, 6), (7, 0), (10, 0))] == [None, Arch.SM90, Arch.SM80, None, None]
    assert Host(capability=(8, 0)).arch == Arch.SM80 and Host().arch is None


@pytest.mark.nvcc
def test_build_keys_the_cache_on_the_parsed_nvcc_version():
    from fact_ray.realize import build

    assert build.nvcc_version() == detect().nvcc  # the build cache and the table name the same version


@pytest.mark.gpu
def test_detect_on_a_gpu_records_the_gpu_its_driver_and_cudnn():
    import re

    import torch

    host = detect(nvcc=None)
    assert host.gpu_name == torch.cuda.get_device_name()
    assert host.capability == tuple(torch.cuda.get_device_capability()) and host.arch is not None
    assert host.torch_cuda == torch.version.cuda and host.cudnn == str(torch.backends.cudnn.version())
    assert re.fullmatch(r"\d+(\.\d+)+", host.driver), f"nvidia-smi gave no driver version: {host.driver!r}"
    assert target_arch(None, host.capability, host.gpu_name) == host.arch
