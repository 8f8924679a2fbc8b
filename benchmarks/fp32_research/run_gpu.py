"""fp32-class accuracy from Hopper tensor cores: run every research variant on every target shape.

    python3 benchmarks/fp32_research/run_gpu.py --out $OUT/fp32.json

Loads the .so files of benchmarks/fp32_research/build/ (built here with nvcc when missing or out of date,
see build.py), and for each shape and variant configuration:
  - checks the result on fresh torch.rand inputs against torch float64 (rel Frobenius error, max abs error,
    allclose atol=rtol=1e-4 against the float64 and against the torch fp32 result, NaN-poisoned output,
    bitwise repeatability over two runs);
  - times the GEMM interleaved with torch's fp32 matmul (TF32 off), CUDA events, warm-up, median of --reps,
    a 256 MiB L2 flush before every timed call, the two callers alternating order;
  - adds the split pass (A per call; B per call or once at compose time) to give three speedups:
    gemm only, with A split (weights pre-split), with both split.
Each library runs in a child process: a crash or a hang costs that one configuration (recorded with its
reason), the child is restarted without it, and the run goes on. JSON goes to --out; a table is printed last.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build as fr_build  # noqa: E402  (sibling module; this folder is not a package)

# name -> (L, M, N, K): torch.bmm(A[L,M,K], B[L,K,N]) as in benchmarks/probe_fp32.py
SHAPES = {
    "square4096": (1, 4096, 4096, 4096),
    "bmm": (128, 512, 2048, 1024),
    "largeK": (1, 256, 256, 524288),
    "qkv": (1, 65536, 2304, 768),
    "proj": (1, 65536, 768, 3072),
    "fc": (1, 65536, 3072, 768),
}
DEFAULT_SHAPES = ["square4096", "bmm", "largeK", "qkv", "proj"]
LIBS = ["promo_a", "promo_b", "sm80_3xtf32"]
STATUS = {0: "ok", 1: "cannot_implement", 2: "workspace_too_small", 3: "init_failed", 4: "run_failed",
          5: "launch_error"}
STAGGER = 1 << 30
NEVER = 1 << 20
HANGS_PER_VARIANT = 2  # promotion group (k-tiles) longer than any K here: no promotion until the end
TOL_REL = 1e-5
TOL_ALLCLOSE = 1e-4
DEVICE = "cuda"

# Knob plans per variant name. G: promotion group in k-tiles (chain = G * tile K elements of the 3K
# concatenation); stagger: the two consumer warpgroups promote half a group apart; splits: stream-K
# (-1 heuristic, >1 split-K) or 2.x serial split-K.
PLANS: dict[str, list[dict]] = {
    "stock_c128x128x32": [{"G": 1}, {"G": 4}],
    "p1_c128x128x32": [{"G": 1}, {"G": 2}, {"G": 2, "stagger": 1}, {"G": 4}, {"G": 4, "stagger": 1},
                       {"G": 8, "stagger": 1}, {"G": NEVER}],
    "plain_c128x128x32": [{}],
    "p1_c128x192x32": [{"G": 1}, {"G": 4, "stagger": 1}],
    "p1_c128x256x32": [{"G": 1}, {"G": 4, "stagger": 1}],
    "p1_c128x128x64": [{"G": 1}, {"G": 2, "stagger": 1}],
    "p1_pp64x128x32": [{"G": 1}, {"G": 4}],
    "p1_c128x128x32_sk": [{"G": 1, "splits": -1}, {"G": 4, "stagger": 1, "splits": -1}],
    "p1_c128x128x32_cl2x1": [{"G": 1}, {"G": 4, "stagger": 1}],
}
LARGE_K_EXTRA: dict[str, list[dict]] = {
    "p1_c128x128x32_sk": [{"G": 4, "stagger": 1, "splits": 16}, {"G": 4, "stagger": 1, "splits": 32}],
}


def plan(name: str, meta: dict, shape: str) -> list[dict]:
    if meta.get("family") == "sm80_3xtf32":
        return [{"splits": 32}, {"splits": 64}] if shape == "largeK" else [{"splits": 1}]
    knobs = PLANS.get(name, [{"G": 1}] if meta.get("mainloop") != "plain" else [{}])
    return knobs + (LARGE_K_EXTRA.get(name, []) if shape == "largeK" else [])


def knob_label(k: dict) -> str:
    parts = []
    if "G" in k:
        parts.append("G=never" if k["G"] >= NEVER else f"G={k['G']}")
    if k.get("stagger"):
        parts.append("stagger")
    if "splits" in k and k["splits"] != 1:
        parts.append(f"splits={k['splits']}")
    return ",".join(parts) or "-"


def config_id(lib: str, shape: str, variant: str, k: dict) -> str:
    return f"{lib}/{shape}/{variant}/{knob_label(k)}"


# ------------------------------------------------------------------------------------------------ child

def _child(a: argparse.Namespace) -> int:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    dev = torch.device(DEVICE)
    out = open(a.jsonl, "a", buffering=1)
    skip_spec = json.loads(Path(a.skip).read_text()) if a.skip else {}
    skip = set(skip_spec.get("ids", []))
    skip_variants = set(skip_spec.get("variants", []))  # variants that hung: not run again

    def emit(rec: dict) -> None:
        out.write(json.dumps(rec, default=str) + "\n")
        out.flush()

    lib = ctypes.CDLL(str(fr_build.so_path(a.child)))
    split = ctypes.CDLL(str(fr_build.so_path("split")))
    lib.fr_variant_name.restype = ctypes.c_char_p
    lib.fr_variant_meta.restype = ctypes.c_char_p
    lib.fr_workspace.restype = ctypes.c_size_t
    lib.fr_workspace.argtypes = [ctypes.c_int] * 5 + [ctypes.c_uint32, ctypes.c_int]
    lib.fr_run.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + \
        [ctypes.c_int] * 4 + [ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    split.fr_split.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 3 + \
        [ctypes.c_longlong] * 3 + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    variants = []
    for i in range(lib.fr_num_variants()):
        variants.append((i, lib.fr_variant_name(i).decode(), json.loads(lib.fr_variant_meta(i)),
                         lib.fr_variant_mmas_per_ktile(i)))

    def stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    flush_buf = torch.empty(64 * 1024 * 1024, device=dev, dtype=torch.float32)  # 256 MiB > L2

    def flush() -> None:
        flush_buf.zero_()

    def median_spread(ts: list[float]) -> tuple[float, float, float]:
        s = sorted(ts)
        q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]  # noqa: E731
        return q(0.5), q(0.1), q(0.9)

    def bench_pair(f_ref, f_cand) -> tuple[tuple, tuple]:
        for _ in range(a.warmup):
            f_ref(); f_cand()
        torch.cuda.synchronize()
        evs = []
        for r in range(a.reps):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                flush()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                (f_ref if which == 0 else f_cand)()
                e.record()
                evs.append((which, s, e))
        torch.cuda.synchronize()
        t0 = [s.elapsed_time(e) for w, s, e in evs if w == 0]
        t1 = [s.elapsed_time(e) for w, s, e in evs if w == 1]
        return median_spread(t0), median_spread(t1)

    def bench_one(f) -> tuple:
        for _ in range(a.warmup):
            f()
        torch.cuda.synchronize()
        evs = []
        for _ in range(a.reps):
            flush()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); f(); e.record()
            evs.append((s, e))
        torch.cuda.synchronize()
        return median_spread([s.elapsed_time(e) for s, e in evs])

    def do_split(X, Y, L, R, K, sb, sr, sk, mask) -> None:
        rc = split.fr_split(X.data_ptr(), Y.data_ptr(), L, R, K, sb, sr, sk, 3, mask, stream())
        if rc != 0:
            raise RuntimeError(f"fr_split returned {rc}")

    def accuracy(D, ref64, out32) -> dict:
        Dd = D.double()
        diff = Dd - ref64
        nan = bool(torch.isnan(D).any().item())
        return {
            "rel": (diff.norm() / ref64.norm()).item(),
            "max_abs": diff.abs().max().item(),
            "max_rel_elem": (diff.abs() / ref64.abs().clamp_min(1e-30)).max().item(),
            "allclose_ref": bool(torch.allclose(Dd, ref64, rtol=TOL_ALLCLOSE, atol=TOL_ALLCLOSE)),
            "allclose_torch": bool(torch.allclose(D, out32, rtol=TOL_ALLCLOSE, atol=TOL_ALLCLOSE)),
            "nan": nan,
        }

    def make_call(vi, ops, D, M, N, kk, L, promo, splits, ws):
        """One configuration's launch, with its arguments bound now (not late, as a loop closure would)."""
        a_ptr, b_ptr, d_ptr, ws_ptr, ws_n = ops[0].data_ptr(), ops[1].data_ptr(), D.data_ptr(), ws.data_ptr(), ws.numel()

        def call():
            _keep = (ops, D, ws)  # noqa: F841 - the tensors must outlive the pointers
            rc = lib.fr_run(vi, a_ptr, b_ptr, d_ptr, M, N, kk, L, promo, splits, ws_ptr, ws_n, stream())
            if rc:
                raise _Status(rc)
        return call

    def cuda_dead(e: BaseException) -> bool:
        m = str(e)
        return any(w in m for w in ("CUDA error", "illegal", "unspecified launch failure", "misaligned",
                                    "an illegal", "device-side", "cudaError"))

    # -- rounding probe: what does TF32 WGMMA do with the low 13 bits of fp32 operands? --------------
    probe_id = f"{a.child}/probe/tf32_rounding"
    plain = next((v for v in variants if v[2].get("mainloop") == "plain"), None)
    if plain is not None and probe_id not in skip:
        emit({"event": "start", "id": probe_id, "t": time.time()})
        try:
            torch.manual_seed(1)
            M = N = 512
            K = 64
            A = torch.rand(1, M, K, device=dev)
            Bt = torch.rand(1, N, K, device=dev)  # B^T, K-major
            D = torch.full((1, M, N), float("nan"), device=dev)
            ws = torch.empty(max(1, lib.fr_workspace(plain[0], M, N, K, 1, 4, 1)), device=dev, dtype=torch.uint8)
            rc = lib.fr_run(plain[0], A.data_ptr(), Bt.data_ptr(), D.data_ptr(), M, N, K, 1, 4, 1,
                            ws.data_ptr(), ws.numel(), stream())
            torch.cuda.synchronize()

            def rn(x):
                return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)

            def rz(x):
                return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)

            res = {"status": STATUS.get(rc, str(rc)), "M": M, "N": N, "K": K}
            if rc == 0:
                for nm, f in (("exact", lambda x: x), ("rn_inputs", rn), ("rz_inputs", rz)):
                    ref = torch.bmm(f(A).double(), f(Bt).double().transpose(1, 2))
                    res[f"rel_vs_{nm}"] = ((D.double() - ref).norm() / ref.norm()).item()
            emit({"event": "result", "id": probe_id, "kind": "probe", **res})
        except Exception as e:  # noqa: BLE001 - recorded, and a dead context ends the child
            emit({"event": "result", "id": probe_id, "kind": "probe", "status": "error", "error": repr(e)})
            if cuda_dead(e):
                return 3

    for shape in a.shapes:
        L, M, N, K = SHAPES[shape]
        flops = 2.0 * L * M * N * K
        todo = []
        for vi, vname, meta, mmas in variants:
            for k in plan(vname, meta, shape):
                cid = config_id(a.child, shape, vname, k)
                if cid not in skip:
                    todo.append((cid, vi, vname, meta, mmas, k))
        extra_ids = [f"{a.child}/{shape}/torch", f"{a.child}/{shape}/split", f"{a.child}/{shape}/tf32_1x",
                     f"{a.child}/{shape}/e2e"]
        if not todo and all(x in skip for x in extra_ids):
            continue

        # -- inputs, references, baseline ------------------------------------------------------------
        torch.manual_seed(0)
        A = torch.rand(L, M, K, device=dev)
        B = torch.rand(L, K, N, device=dev)
        ref64 = torch.bmm(A.double(), B.double())
        if L == 1:
            A2, B2 = A[0], B[0]
            torch_fn = lambda: torch.mm(A2, B2)  # noqa: E731 - what nn.Linear / @ call for 2-D
        else:
            torch_fn = lambda: torch.bmm(A, B)  # noqa: E731
        out32 = torch_fn().view(L, M, N)
        torch.cuda.synchronize()
        tid = f"{a.child}/{shape}/torch"
        if tid not in skip:
            acc = accuracy(out32, ref64, out32)
            t = bench_one(torch_fn)
            emit({"event": "result", "id": tid, "kind": "torch", "shape": shape, "status": "ok",
                  "op": "mm" if L == 1 else "bmm", "ms": t[0], "ms_p10": t[1], "ms_p90": t[2],
                  "tflops": flops / t[0] / 1e9, **acc})

        family = variants[0][2].get("family") if variants else ""
        split_ms = {"a": 0.0, "b": 0.0}
        A3 = B3 = None
        if family == "sm90_kcat3":
            A3 = torch.empty(L, M, 3 * K, device=dev)
            B3 = torch.empty(L, N, 3 * K, device=dev)
            fa = lambda: do_split(A, A3, L, M, K, M * K, K, 1, 0b100)  # noqa: E731 - [hi|hi|lo]
            fb = lambda: do_split(B, B3, L, N, K, K * N, 1, N, 0b010)  # noqa: E731 - B^T: [hi|lo|hi]
            fa(); fb()
            torch.cuda.synchronize()
            ta, tb = bench_one(fa), bench_one(fb)
            split_ms = {"a": ta[0], "b": tb[0]}
            sid = f"{a.child}/{shape}/split"
            if sid not in skip:
                bytes_a = 4.0 * L * M * K * 4  # read 1, write 3
                bytes_b = 4.0 * L * N * K * 4
                emit({"event": "result", "id": sid, "kind": "split", "shape": shape, "status": "ok",
                      "ms_a": ta[0], "ms_b": tb[0], "ms_a_p90": ta[2], "ms_b_p90": tb[2],
                      "tbps_a": bytes_a / ta[0] / 1e9, "tbps_b": bytes_b / tb[0] / 1e9})

            # the kernel family's 1xTF32 speed on raw operands, beside torch TF32: how far is our tile from
            # cuBLAS before any 3x and promotion cost
            xid = f"{a.child}/{shape}/tf32_1x"
            if plain is not None and xid not in skip:
                emit({"event": "start", "id": xid, "t": time.time()})
                try:
                    Bt = B.transpose(1, 2).contiguous()
                    D1 = torch.empty(L, M, N, device=dev)
                    ws1 = torch.empty(max(1, lib.fr_workspace(plain[0], M, N, K, L, 4, 1)), device=dev,
                                      dtype=torch.uint8)

                    def f1():
                        rc = lib.fr_run(plain[0], A.data_ptr(), Bt.data_ptr(), D1.data_ptr(), M, N, K, L, 4, 1,
                                        ws1.data_ptr(), ws1.numel(), stream())
                        if rc:
                            raise RuntimeError(f"status {STATUS.get(rc, rc)}")

                    def ftf32():
                        torch.backends.cuda.matmul.allow_tf32 = True
                        try:
                            torch_fn()
                        finally:
                            torch.backends.cuda.matmul.allow_tf32 = False

                    f1()
                    torch.cuda.synchronize()
                    rel1 = ((D1.double() - ref64).norm() / ref64.norm()).item()
                    t_t, t_c = bench_pair(ftf32, f1)
                    emit({"event": "result", "id": xid, "kind": "tf32_1x", "shape": shape, "status": "ok",
                          "variant": plain[1], "ms_cutlass": t_c[0], "ms_torch_tf32": t_t[0],
                          "tflops_cutlass": flops / t_c[0] / 1e9, "tflops_torch_tf32": flops / t_t[0] / 1e9,
                          "rel_cutlass": rel1})
                    del Bt, D1, ws1
                except Exception as e:  # noqa: BLE001
                    emit({"event": "result", "id": xid, "kind": "tf32_1x", "shape": shape, "status": "error",
                          "error": repr(e)})
                    if cuda_dead(e):
                        return 3

        # -- every configuration -----------------------------------------------------------------------
        D = torch.empty(L, M, N, device=dev)
        best = None  # (ms, vi, knobs, cid) of the fastest accurate configuration
        for cid, vi, vname, meta, mmas, k in todo:
            rec = {"event": "result", "id": cid, "kind": "config", "lib": a.child, "shape": shape,
                   "variant": vname, "meta": meta, "knobs": k, "label": knob_label(k)}
            if vname in skip_variants:
                emit({**rec, "status": "skipped_variant_hung"})
                continue
            emit({"event": "start", "id": cid, "t": time.time(), "variant": vname})
            try:
                if family == "sm90_kcat3":
                    ops, kk = (A3, B3), 3 * K
                    G = k.get("G", 1)
                    promo = (min(G, NEVER) * max(1, mmas)) | (STAGGER if k.get("stagger") else 0)
                    rec["chain"] = None if G >= NEVER else G * meta["tile"][2]
                else:
                    ops, kk = (A, B), K
                    promo = 0
                splits = k.get("splits", 1)
                wsb = lib.fr_workspace(vi, M, N, kk, L, promo, splits)
                ws = torch.empty(max(1, wsb), device=dev, dtype=torch.uint8)
                fc = make_call(vi, ops, D, M, N, kk, L, promo, splits, ws)

                D.fill_(float("nan"))
                fc()
                torch.cuda.synchronize()
                acc = accuracy(D, ref64, out32)
                first = D.clone()
                D.fill_(float("nan"))
                fc()
                torch.cuda.synchronize()
                rec["deterministic"] = bool(torch.equal(first, D))
                del first
                rec.update(acc)
                t_ref, t_c = bench_pair(torch_fn, fc)
                ms = t_c[0]
                rec.update({
                    "status": "ok", "workspace_bytes": wsb,
                    "ms_gemm": ms, "ms_gemm_p10": t_c[1], "ms_gemm_p90": t_c[2],
                    "ms_torch": t_ref[0], "ms_torch_p10": t_ref[1], "ms_torch_p90": t_ref[2],
                    "tflops_eff": flops / ms / 1e9,
                    "speedup_gemm": t_ref[0] / ms,
                    "speedup_presplit_b": t_ref[0] / (ms + split_ms["a"]),
                    "speedup_full": t_ref[0] / (ms + split_ms["a"] + split_ms["b"]),
                })
                rec["accurate"] = (not acc["nan"] and acc["rel"] <= TOL_REL and acc["allclose_ref"]
                                   and acc["allclose_torch"] and rec["deterministic"])
                if rec["accurate"] and (best is None or ms < best[0]):
                    best = (ms, cid, fc)
            except _Status as s:
                rec.update({"status": STATUS.get(s.code, f"status_{s.code}")})
            except Exception as e:  # noqa: BLE001 - one configuration's failure is recorded, not fatal
                rec.update({"status": "crashed" if cuda_dead(e) else "error", "error": repr(e)[:500]})
                emit(rec)
                if cuda_dead(e):
                    return 3
                continue
            emit(rec)

        # -- end to end for the best accurate configuration: split(s) + GEMM in one timed region --------
        eid = f"{a.child}/{shape}/e2e"
        if best is not None and eid not in skip:
            emit({"event": "start", "id": eid, "t": time.time()})
            _, cid, fc = best
            try:
                if family == "sm90_kcat3":
                    def full():
                        fa(); fb(); fc()

                    def presplit():
                        fa(); fc()

                    t_ref, t_full = bench_pair(torch_fn, full)
                    t_ref2, t_pre = bench_pair(torch_fn, presplit)
                    emit({"event": "result", "id": eid, "kind": "e2e", "shape": shape, "status": "ok",
                          "config": cid, "ms_full": t_full[0], "ms_torch": t_ref[0],
                          "speedup_full": t_ref[0] / t_full[0], "ms_presplit_b": t_pre[0],
                          "speedup_presplit_b": t_ref2[0] / t_pre[0]})
                else:
                    t_ref, t_c = bench_pair(torch_fn, fc)
                    emit({"event": "result", "id": eid, "kind": "e2e", "shape": shape, "status": "ok",
                          "config": cid, "ms_full": t_c[0], "ms_torch": t_ref[0],
                          "speedup_full": t_ref[0] / t_c[0]})
            except Exception as e:  # noqa: BLE001
                emit({"event": "result", "id": eid, "kind": "e2e", "shape": shape, "status": "error",
                      "error": repr(e)[:500]})
                if cuda_dead(e):
                    return 3
        del A, B, ref64, out32, D, A3, B3
        torch.cuda.empty_cache()
    return 0


class _Status(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(STATUS.get(code, str(code)))
        self.code = code


# ----------------------------------------------------------------------------------------------- parent

def _env() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "host": platform.node()}
    try:
        import torch
        info.update({"torch": torch.__version__, "cuda": torch.version.cuda,
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None})
    except Exception as e:  # noqa: BLE001
        info["torch"] = f"unavailable: {e!r}"
    for key, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                     ("git_commit", ["git", "-C", str(HERE), "rev-parse", "HEAD"]),
                     ("nvcc", [fr_build.nvcc_path() or "nvcc", "--version"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            out = r.stdout.strip()
            info[key] = out.splitlines()[-1] if key == "nvcc" and out else out
        except Exception as e:  # noqa: BLE001
            info[key] = f"unavailable: {e!r}"
    try:
        import cutlass_library
        info["cutlass_library"] = getattr(cutlass_library, "__version__", "present")
    except Exception:  # noqa: BLE001
        info["cutlass_library"] = None
    return info


def _run_lib(lib: str, a: argparse.Namespace, records: dict, deadline: float) -> list[str]:
    """Runs one library's child until it finishes, restarting it after a crash or hang; returns notes."""
    notes: list[str] = []
    failed: set[str] = set()
    hung: dict[str, int] = {}  # variant name -> hangs; after HANGS_PER_VARIANT its other configs are skipped
    for attempt in range(40):
        if time.time() > deadline:
            notes.append(f"{lib}: time budget spent before attempt {attempt + 1}")
            return notes
        with tempfile.TemporaryDirectory() as td:
            jsonl, skip = Path(td) / "out.jsonl", Path(td) / "skip.json"
            done = {k for k, v in records.items() if v.get("event") == "result"}
            skip.write_text(json.dumps({"ids": sorted(done | failed),
                                        "variants": sorted(v for v, n in hung.items() if n >= HANGS_PER_VARIANT)}))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", lib, "--jsonl", str(jsonl),
                   "--skip", str(skip), "--reps", str(a.reps), "--warmup", str(a.warmup), "--shapes",
                   ",".join(a.shapes)]
            jsonl.touch()
            proc = subprocess.Popen(cmd, start_new_session=True)
            pos, last_event, started = 0, time.time(), None
            rc, why = None, ""
            while True:
                rc = proc.poll()
                with open(jsonl) as f:
                    f.seek(pos)
                    chunk = f.read()
                    # only whole lines; a partial last line is read again next time
                    cut = chunk.rfind("\n") + 1
                    pos += cut
                for line in chunk[:cut].splitlines():
                    try:
                        ev = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    last_event = time.time()
                    if ev.get("event") == "start":
                        started = ev["id"]
                        records.setdefault(started, {}).update({"variant": ev.get("variant")})
                    else:
                        records[ev["id"]] = ev
                        if ev["id"] == started:
                            started = None
                        if ev.get("kind") == "config":
                            _print_progress(ev)
                if rc is not None:
                    break
                now = time.time()
                limit = a.config_timeout if started else a.idle_timeout
                if now - last_event > limit or now > deadline:
                    why = "hang" if now <= deadline else "budget"
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = -9
                    break
                time.sleep(0.5)
            if rc == 0:
                return notes
            if started is not None:
                status = "hang" if why == "hang" else ("killed_budget" if why == "budget" else "crashed")
                prev = records.get(started, {})
                parts = started.split("/", 3)  # lib/shape/variant/label for configurations
                ident = dict(zip(("lib", "shape", "variant", "label"), parts)) if len(parts) == 4 else {}
                records[started] = {**ident, **prev, "event": "result", "id": started, "status": status,
                                    "kind": prev.get("kind", "config" if ident else "other"), "child_rc": rc}
                failed.add(started)
                notes.append(f"{started}: {status} (child rc {rc})")
                if status == "hang" and records[started].get("variant"):
                    v = records[started]["variant"]
                    hung[v] = hung.get(v, 0) + 1
            elif why:
                notes.append(f"{lib}: child stopped ({why}) between configurations")
            elif rc == 3:
                continue  # the child recorded a crashed configuration and exited: restart without it
            else:
                notes.append(f"{lib}: child exited rc {rc} outside any configuration")
                return notes
            if why == "budget":
                return notes
    notes.append(f"{lib}: gave up after repeated restarts")
    return notes


def _print_progress(ev: dict) -> None:
    if ev.get("status") == "ok":
        print(f"  {ev['id'][:60]:60s} {ev.get('rel', float('nan')):.1e} x{ev.get('speedup_gemm', 0):.2f}"
              f"{'' if ev.get('accurate') else ' !'}", flush=True)
    else:
        print(f"  {ev['id'][:60]:60s} {ev.get('status')} {ev.get('error', '')[:80]}", flush=True)


def _summarise(records: dict, shapes: list[str]) -> list[dict]:
    rows = []
    for shape in shapes:
        torch_rec = next((r for r in records.values() if r.get("kind") == "torch" and r.get("shape") == shape
                          and r.get("status") == "ok"), None)
        cfgs = [r for r in records.values() if r.get("kind") == "config" and r.get("shape") == shape
                and r.get("status") == "ok"]
        row = {"shape": shape, "torch_ms": torch_rec and torch_rec["ms"], "torch_rel": torch_rec and torch_rec["rel"]}
        for fam in ("sm90_kcat3", "sm80_3xtf32"):
            acc = [r for r in cfgs if r["meta"].get("family") == fam and r.get("accurate")]
            if acc:
                key = "speedup_full" if fam == "sm90_kcat3" else "speedup_gemm"
                b = max(acc, key=lambda r: r[key])
                row[fam] = {"config": b["id"], "rel": b["rel"], "speedup_gemm": b["speedup_gemm"],
                            "speedup_presplit_b": b["speedup_presplit_b"], "speedup_full": b["speedup_full"]}
        e2e = [r for r in records.values() if r.get("kind") == "e2e" and r.get("shape") == shape
               and r.get("status") == "ok"]
        row["e2e"] = {r["id"]: {k: r.get(k) for k in ("config", "speedup_full", "speedup_presplit_b")} for r in e2e}
        rows.append(row)
    return rows


def _print_matrix(records: dict, shapes: list[str]) -> None:
    """Every configuration (rows) on every shape (columns): GEMM-only speedup over torch fp32 and rel error;
    '!' marks a configuration that ran but is not accurate."""
    cfgs = [r for r in records.values() if r.get("kind") == "config"]
    rows: dict[str, dict[str, str]] = {}
    for r in cfgs:
        lib, shape, variant, label = (r["id"].split("/", 3) + ["-"] * 4)[:4]
        key = f"{lib}/{variant}/{label}"
        if r.get("status") == "ok":
            cell = f"{r['speedup_gemm']:.2f} {r['rel']:.0e}{'' if r.get('accurate') else '!'}"
        else:
            cell = str(r.get("status"))[:10]
        rows.setdefault(key, {})[shape] = cell
    print("\nGEMM-only speedup over torch fp32 and rel error per configuration ('!' = not accurate)")
    print(f"{'configuration':52s} " + " ".join(f"{s[:12]:>12s}" for s in shapes))
    for key in sorted(rows):
        print(f"{key[:52]:52s} " + " ".join(f"{rows[key].get(s, '-'):>12s}" for s in shapes))


def _print_table(summary: list[dict], records: dict, notes: list[str]) -> None:
    probe = [r for r in records.values() if r.get("kind") == "probe"]
    for p in probe:
        print(f"\nTF32 WGMMA operand rounding probe: {p.get('status')}  "
              + "  ".join(f"{k[7:]}={p[k]:.1e}" for k in p if k.startswith("rel_vs_")))
    bad = [r for r in records.values() if r.get("kind") == "config" and r.get("status") != "ok"]
    inacc = [r for r in records.values() if r.get("kind") == "config" and r.get("status") == "ok"
             and not r.get("accurate")]
    if bad:
        print(f"\nfailed configurations ({len(bad)}):")
        for r in bad[:20]:
            print(f"  {r['id']}: {r.get('status')} {r.get('error', '')[:100]}")
    if inacc:
        print(f"\nran but not accurate ({len(inacc)}; rel > 1e-5, allclose fails, NaN or not repeatable):")
        for r in inacc[:20]:
            print(f"  {r['id']}: rel {r.get('rel', float('nan')):.1e} allclose ref/torch "
                  f"{r.get('allclose_ref')}/{r.get('allclose_torch')} det {r.get('deterministic')}")
    for n in notes[:20]:
        print(f"note: {n}")
    splits = [r for r in records.values() if r.get("kind") == "split" and r.get("lib", r["id"].split("/")[0]) == "promo_a"]
    for r in splits:
        print(f"split pass {r['shape']:11s} A {r['ms_a']:.3f} ms ({r['tbps_a']:.2f} TB/s)  "
              f"B^T {r['ms_b']:.3f} ms ({r['tbps_b']:.2f} TB/s)")
    for r in (r for r in records.values() if r.get("kind") == "tf32_1x" and r.get("status") == "ok"):
        print(f"1xTF32 {r['shape']:11s} {r['variant']} {r['tflops_cutlass']:.0f} TFLOP/s vs torch TF32 "
              f"{r['tflops_torch_tf32']:.0f} (rel {r['rel_cutlass']:.1e})")
    _print_matrix(records, [s for s in SHAPES if any(r.get("shape") == s for r in records.values())])
    print("\nbest accurate configuration per shape (speedup over torch fp32, same process, interleaved)")
    print(f"{'shape':11s} {'torch ms':>9s} {'family':12s} {'config':52s} {'rel':>8s} {'gemm':>6s} "
          f"{'+splitA':>8s} {'full':>6s}")
    for row in summary:
        tm = f"{row['torch_ms']:.3f}" if row.get("torch_ms") else "-"
        fams = [f for f in ("sm90_kcat3", "sm80_3xtf32") if f in row]
        if not fams:
            print(f"{row['shape']:11s} {tm:>9s} (no accurate configuration)")
        for f in fams:
            b = row[f]
            cfg = b["config"].split("/", 2)[-1]
            print(f"{row['shape']:11s} {tm:>9s} {f[:12]:12s} {cfg[:52]:52s} {b['rel']:8.1e} "
                  f"{b['speedup_gemm']:6.2f} {b['speedup_presplit_b']:8.2f} {b['speedup_full']:6.2f}")
        for eid, e in row.get("e2e", {}).items():
            print(f"{'':21s} e2e {eid.split('/')[0]:12s} measured in one region: full x{e['speedup_full']:.2f}"
                  + (f", A split only x{e['speedup_presplit_b']:.2f}" if e.get("speedup_presplit_b") else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, from {', '.join(LIBS)}")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop and write what there is after this")
    ap.add_argument("--config-timeout", type=float, default=60.0, help="a configuration silent this long hangs")
    ap.add_argument("--idle-timeout", type=float, default=240.0, help="a child silent this long between configs")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                    help="parallel nvcc when a library must be built")
    ap.add_argument("--no-build", action="store_true", help="never run nvcc; use the .so files as they are")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    ap.add_argument("--skip", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.shapes = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in a.shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shape: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if a.child:
        return _child(a)
    if not a.out:
        print("--out is required", file=sys.stderr)
        return 2
    t0 = time.time()
    deadline = t0 + a.budget_s
    libs = [x for x in a.libs.split(",") if x]
    env = _env()
    print(f"{env.get('gpu')}  torch {env.get('torch')}  driver {env.get('driver')}", flush=True)
    if not a.no_build:
        builds = fr_build.build(["split", *libs], jobs=a.jobs)
    else:
        builds = [fr_build.BuildResult(n, str(fr_build.so_path(n)),
                                       "cached" if fr_build.so_path(n).exists() else "failed",
                                       message="" if fr_build.so_path(n).exists() else "missing, --no-build")
                  for n in ["split", *libs]]
    for b in builds:
        print(f"build {b.name:12s} {b.status:7s} {b.seconds:5.1f}s {b.message}", flush=True)
    ok = {b.name for b in builds if b.status != "failed"}
    records: dict[str, dict] = {}
    notes: list[str] = []
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if not has_gpu:
        notes.append("no CUDA device: nothing measured")
    elif "split" not in ok:
        notes.append("split library failed to build: nothing measured")
    else:
        for lib in libs:
            if lib not in ok:
                notes.append(f"{lib}: not built, skipped")
                continue
            print(f"[{lib}]", flush=True)
            notes += _run_lib(lib, a, records, deadline)
    summary = _summarise(records, a.shapes)
    result = {"script": "benchmarks/fp32_research/run_gpu.py", "argv": sys.argv[1:], **env,
              "policy": "fp32", "tolerance": {"rel": TOL_REL, "allclose": TOL_ALLCLOSE},
              "shapes": {s: dict(zip("LMNK", SHAPES[s])) for s in a.shapes},
              "builds": [b.__dict__ for b in builds], "notes": notes, "summary": summary,
              "records": list(records.values()), "wall_s": time.time() - t0}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_name(Path(a.out).name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, a.out)
    _print_table(summary, records, notes)
    print(f"\nwrote {a.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
