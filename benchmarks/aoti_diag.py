"""Where an AOTInductor package of a composed module goes wrong (issue 18's open test): the composed MLP of
tests/models/compose_mlp.py with its fc1+GELU on a real CUTLASS kernel, compared stage by stage against the
composed module in eager: torch.export's program, AOTInductor's package, and a package of the native op alone.
For a wrong stage it says which simple alteration of the composed computation the output matches (no GELU,
no bias, no residual, transposed weight, zero input), and copies the package's generated C++ lines that call
our op. Writes JSON with --out; GPU only.

    python benchmarks/aoti_diag.py --out /tmp/aoti-diag.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = str(REPO / "tests" / "models" / "compose_mlp.py")


def _err(got, want) -> float:
    return float((got.float() - want.float()).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from fact_ray.capture import capture, load_model
    from fact_ray.compose import KernelChoice, compose
    from fact_ray.deploy import export, package
    from fact_ray.discover import discover
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.types import GemmProblem
    from fact_ray.search_spaces import space
    from fact_ray.toolchain import detect
    from fact_ray.types import Precision

    arch = detect(nvcc=None).arch
    problem = GemmProblem(M=16, N=128, K=64, epilogue="bias_act", activation="gelu")
    cfg = next(c for c in space(problem, arch, Precision.FP32)
               if c.template == "sm80_gemm" and c.opclass == "simt" and c.split_k == 1)
    work = Path(tempfile.mkdtemp(prefix="aoti-diag-"))
    (source,) = emit([cfg], arch)
    lib = build(source, str(work / "build"))
    if not lib.ok:
        print(lib.log[-2000:])
        return 1
    winner = KernelChoice(cfg, lib.path, source.symbols[0], speedup=1.0)

    loaded = load_model(MODEL)
    captured = capture(loaded)
    matches = discover(captured.graph, arch, Precision.FP32)
    fc1 = next(m for m in matches if m.rule == "linear_bias_act")
    composed = compose(captured, matches, {fc1.key: winner}, Precision.FP32).to("cuda")
    ref = loaded.module.to("cuda")
    print("composed graph:")
    print(composed.graph if hasattr(composed, "graph") else composed)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64, device="cuda")
    report: dict = {"arch": str(arch), "torch": torch.__version__}
    with torch.no_grad():
        want = composed(x)
        report["composed_vs_eager"] = _err(want, ref(x))
        w1, b1, w2, b2 = ref.fc1.weight, ref.fc1.bias, ref.fc2.weight, ref.fc2.bias
        alternatives = {
            "no_gelu": x + F.linear(F.linear(x, w1, b1), w2, b2),
            "no_bias1": x + F.linear(F.gelu(F.linear(x, w1)), w2, b2),
            "no_residual": F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
            "zero_fc1": x + F.linear(torch.zeros(2, 8, 128, device="cuda"), w2, b2),
            "gelu_tanh": x + F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2),
            "x_only": x,
        }

        program = export(composed, (x,))
        print(program.graph_module.code)
        report["export_program"] = _err(program.module()(x), want)

        pkg = package(composed, (x,), work / "model.pt2")
        aoti = torch._inductor.aoti_load_package(str(pkg))
        got = aoti(x)
        report["aoti"] = _err(got, want)
        report["aoti_second_call"] = _err(aoti(x), want)
        report["aoti_matches"] = {k: _err(got, v) for k, v in alternatives.items()}

        # The native op alone in a package: does AOTInductor pass our op its operands as we do?
        op = torch.ops.fact_ray_native.gemm.default
        kid = next(n.args[-1] for n in composed.graph.nodes
                   if n.op == "call_function" and "fact_ray_native" in str(n.target))

        class Alone(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(w1.detach().clone())
                self.b = torch.nn.Parameter(b1.detach().clone())

            def forward(self, a):
                return op(a, self.w, self.b, None, kid)

        alone = Alone().cuda()
        alone_want = alone(x)
        report["alone_vs_eager_fc1"] = _err(alone_want, F.gelu(F.linear(x, w1, b1)))
        alone_pkg = package(alone, (x,), work / "alone.pt2")
        alone_got = torch._inductor.aoti_load_package(str(alone_pkg))(x)
        report["alone_aoti"] = _err(alone_got, alone_want)
        report["alone_aoti_matches"] = {
            "no_gelu": _err(alone_got, F.linear(x, w1, b1)),
            "no_bias": _err(alone_got, F.gelu(F.linear(x, w1))),
            "zeros": float(alone_got.abs().max()),
            "w_transposed_view": _err(alone_got, F.gelu(x @ w1.reshape(64, 128) + b1)),
        }

        # Inputs as weights (nothing lifted to constants): does the constant store change anything?
        class AllInputs(torch.nn.Module):
            def forward(self, a, w, b):
                return op(a, w, b, None, kid)

        inputs_pkg = package(AllInputs().cuda(), (x, w1.detach(), b1.detach()), work / "inputs.pt2")
        inputs_got = torch._inductor.aoti_load_package(str(inputs_pkg))(x, w1.detach(), b1.detach())
        report["inputs_aoti"] = _err(inputs_got, alone_want)

    lines = []
    for p in (pkg, alone_pkg):
        with zipfile.ZipFile(p) as z:
            for name in z.namelist():
                if name.endswith((".cpp", ".json")) and "fact_ray" in (text := z.read(name).decode("utf-8", "replace")):
                    lines.append(f"--- {p.name}:{name}")
                    lines += [ln for ln in text.splitlines() if "fact_ray" in ln or "proxy" in ln.lower()][:40]
    report["package_lines"] = lines
    print("\n".join(lines[:120]))
    print(json.dumps({k: v for k, v in report.items() if k != "package_lines"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
