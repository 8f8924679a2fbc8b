"""Where an AOTInductor package of a composed module goes wrong (issue 18's open test): the composed MLP of
tests/models/compose_mlp.py with its fc1+GELU on a real CUTLASS kernel, compared stage by stage against the
composed module in eager: torch.export's program, then AOTInductor packages of (a) the composed module, (b) the
native op alone with its weights as parameters, (c) the native op alone with everything as inputs, (d) the same
module with the native op swapped for aten (no custom op at all), once in a process that never loads our
extension and once in one that has it loaded with a kernel registered. Each package is compiled and run in a child
process of its own, so a segfault (session 6 saw one) costs its line, not the report; the child registers the
kernel from the library path, runs the package and saves its output. For a wrong output it says which simple
alteration of the computation it matches, and it copies the lines of each package's generated C++ and extern-node
JSON that call our op. Writes JSON with --out; GPU only.

    python benchmarks/aoti_diag.py --out /tmp/aoti-diag.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = str(REPO / "tests" / "models" / "compose_mlp.py")

# The child: register the kernel (the native dispatcher, then the library), package the saved program, load, run.
CHILD = textwrap.dedent("""
    import pickle, sys, torch
    if sys.argv[6] == "ext":  # else a process that never loads our extension or a kernel library
        from fact_ray.realize import dispatch
        dispatch.load()
        dispatch.register_gemm(sys.argv[3], sys.argv[4], pickle.load(open(sys.argv[5], "rb")))
    program = torch.export.load(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(program, package_path=sys.argv[1].replace("-program.pt2", "-aoti.pt2"))
    print("packaged", path, flush=True)
    runner = torch._inductor.aoti_load_package(str(path))
    print("loaded", flush=True)
    with torch.no_grad():
        out = runner(*inputs)
    torch.cuda.synchronize()
    torch.save(out, sys.argv[1].replace("-program.pt2", ".out"))
    print("ran", flush=True)
""")


def _err(got, want) -> float:
    return float((got.float() - want.float()).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import pickle

    import torch
    import torch.nn.functional as F

    from fact_ray.capture import capture, load_model
    from fact_ray.compose import KernelChoice, compose
    from fact_ray.deploy import export
    from fact_ray.discover import discover
    from fact_ray.realize.build import build
    from fact_ray.realize.emit import emit
    from fact_ray.search_spaces import space
    from fact_ray.toolchain import detect
    from fact_ray.types import GemmProblem, Precision

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
    print(composed.code)
    rep = next(r for r in composed.fact_ray.replacements)
    (work / "problem.pkl").write_bytes(pickle.dumps(rep.problem))
    kid = rep.kernel
    op = torch.ops.fact_ray_native.gemm.default
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64, device="cuda")
    report: dict = {"arch": str(arch), "torch": torch.__version__, "kernel": kid}
    w1, b1, w2, b2 = (t.detach() for t in (ref.fc1.weight, ref.fc1.bias, ref.fc2.weight, ref.fc2.bias))

    class Alone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(w1.clone()), torch.nn.Parameter(b1.clone())

        def forward(self, a):
            return op(a, self.w, self.b, None, kid)

    class AllInputs(torch.nn.Module):
        def forward(self, a, w, b):
            return op(a, w, b, None, kid)

    class Aten(torch.nn.Module):  # the same MLP without our op: is AOTInductor itself right here?
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = ref.fc1, ref.fc2

        def forward(self, a):
            return a + self.fc2(F.gelu(self.fc1(a)))

    with torch.no_grad():
        want = composed(x)
        report["composed_vs_eager"] = _err(want, ref(x))
        program = export(composed, (x,))
        print(program.graph_module.code)
        report["export_program"] = _err(program.module()(x), want)
        alone_want = op(x, w1, b1, None, kid)
        alternatives = {
            "right": want,
            "no_gelu": x + F.linear(F.linear(x, w1, b1), w2, b2),
            "no_bias1": x + F.linear(F.gelu(F.linear(x, w1)), w2, b2),
            "no_residual": F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
            "zero_fc1": x + F.linear(torch.zeros(2, 8, 128, device="cuda"), w2, b2),
            "x_only": x,
            "fc1_alone": alone_want,
            "fc1_no_gelu": F.linear(x, w1, b1),
            "fc1_no_bias": F.gelu(F.linear(x, w1)),
        }
        # simplest first: a call cut off by its time limit still says whether AOTInductor itself, and our op
        # alone, are right (session 7's 130 s reached only the composed case, which segfaulted loading)
        # aten_only twice: in a process without our extension and in one with it loaded and a kernel registered
        # (does its presence alone break AOTInductor's load, as a symbol clash would?)
        cases = {"aten_only_no_ext": (Aten(), (x,), ref(x)), "aten_only": (Aten(), (x,), ref(x)),
                 "all_inputs": (AllInputs(), (x, w1, b1), alone_want),
                 "alone": (Alone().cuda(), (x,), alone_want), "composed": (composed, (x,), want)}
    lines: list[str] = []
    for name, (module, inputs, expected) in cases.items():
        mpath, ipath = work / f"{name}-program.pt2", work / f"{name}.inputs"
        torch.export.save(export(module, inputs), mpath)
        torch.save(inputs, ipath)
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(mpath), str(ipath), lib.path,
                               source.symbols[0], str(work / "problem.pkl"),
                               "noext" if name.endswith("_no_ext") else "ext"],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        row: dict = {"rc": done.returncode, "stages": [ln for ln in done.stdout.splitlines()
                                                       if ln.split(" ")[0] in ("packaged", "loaded", "ran")]}
        if done.returncode != 0:
            row["stderr"] = done.stderr[-2500:]
        out = work / f"{name}.out"
        if out.is_file():
            got = torch.load(out).cuda()
            row["err"] = _err(got, expected)
            row["matches"] = {k: _err(got, v) for k, v in alternatives.items() if v.shape == got.shape}
        pkg = work / f"{name}-aoti.pt2"
        if pkg.is_file():
            with zipfile.ZipFile(pkg) as z:
                for member in z.namelist():
                    if member.endswith((".cpp", ".json")):
                        text = z.read(member).decode("utf-8", "replace")
                        hits = [ln for ln in text.splitlines() if "fact_ray" in ln or "proxy_executor" in ln]
                        if hits:
                            lines += [f"--- {name}: {member}"] + hits[:30]
        report[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "stderr"}), flush=True)
        if "stderr" in row:
            print(row["stderr"][-1500:])
    report["package_lines"] = lines
    print("\n".join(lines[:150]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
