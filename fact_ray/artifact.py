"""The deployable artifact of a composition: one folder that restores the composed module without nvcc or the table.

    <artifact>/manifest.json        what was composed, for which model, arch, GPU, toolchain and policy
    <artifact>/libs/<sha256>.so     every compiled library the kernels live in, named by content

`save` writes the folder next to its destination and moves it into place with one `os.replace`, so a crash leaves
no half-written artifact. It refuses a composed module that has not passed `fact_ray.compose.check` (only an
explicit `allow_unchecked=True` saves one, marked unchecked in the manifest; tests use it on CPU-only machines).

`load` re-captures the model, re-discovers its patterns, checks that every stored pattern is still there, loads the
stored libraries and composes: it never runs nvcc, never tunes and never opens the pattern table. It refuses, in
one line naming both sides, an artifact made for another arch, another torch or CUTLASS version, another model,
or one whose library bytes do not match their recorded sha256. Every check on the folder itself (names,
hashes, the optional signature) runs before any of the model's code, and the libraries are loaded from a private
copy of the bytes that were hashed: see `artifact_trust`.

`compose_from_table` is the `fact-ray compose` pipeline (capture, discover, winners from the table, compose,
check on the GPU, save); `load_report` prints what an artifact holds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from fact_ray import artifact_trust as trust
from fact_ray.errors import ArtifactError, CompileError, ComposeError, NotAvailable, first_line
from fact_ray.toolchain import Host, detect
from fact_ray.types import AnyConfig, Arch, Precision, config_from_dict, to_jsonable

if TYPE_CHECKING:
    from fact_ray.config import Settings

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBS = "libs"


# --------------------------------------------------------------------------------------------- save


def _jsonable(v: Any) -> Any:
    v = to_jsonable(v)
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def manifest_of(composed: Any, *, host: Host | None = None, allow_unchecked: bool = False) -> dict[str, Any]:
    """The manifest of `composed`, made on `host` (default: this machine, asked once)."""
    from fact_ray.compose import CHECK_ATTR, composition_of

    comp = composition_of(composed)
    report = getattr(composed, CHECK_ATTR, None)
    if report is not None and not report.passed:
        raise ComposeError(f"{comp.model_name}: the composed module failed its end-to-end check ({report.reason}); "
                           "it is not saved")
    if report is None and not allow_unchecked:
        raise ComposeError(f"{comp.model_name}: the composed module has not passed the end-to-end check "
                           "(fact_ray.compose.check, on a GPU); an unchecked composition is never saved")
    if comp.arch is None:
        raise ComposeError(f"{comp.model_name}: no pattern was replaced, so there is no arch to save an artifact for")
    if host is None:
        host = _this_host()
    patterns = [{
        "match_key": r.match_key, "rule": r.rule, "family": r.family, "anchor": r.anchor, "nodes": list(r.nodes),
        "op": r.op, "config": _jsonable(r.config), "problem": _jsonable(r.problem),
        "library": f"{LIBS}/{r.library_sha256}.so", "sha256": r.library_sha256, "symbol": r.symbol,
        "speedup": _jsonable(r.speedup), "kernel": r.kernel,
    } for r in comp.replacements]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "fact-ray-composition",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": comp.model_name, "hash": comp.model_hash, "graph_hash": comp.graph_hash,
                  "capture": comp.capture},
        "arch": comp.arch.value,
        "gpu": host.gpu_name,
        # nvcc, CUTLASS, torch, the bench method, and what is recorded beside them (driver, cuBLAS, cuDNN)
        "toolchain": host.recorded(),
        "policy": comp.policy.value,
        "check": None if report is None else _jsonable(report),
        "patterns": patterns,
        "kept": list(comp.kept),
        # What the whole-module guarantee kept the composition for (fact_ray/guarantee.py); None when it did not run.
        "guarantee": _guarantee_json(composed),
        "fallbacks": [{"match_key": k, "reason": why} for k, why in comp.fallbacks],
    }


def _guarantee_json(composed: Any) -> Any:
    from fact_ray.guarantee import guarantee_of

    g = guarantee_of(composed)
    return None if g is None else {**_jsonable(g), "summary": g.summary}


def _this_host() -> Host:
    """This machine, with nvcc's version where there is one: saving may ask nvcc, loading never does."""
    try:
        return detect()
    except NotAvailable:
        return detect(nvcc=None)


def save(composed: Any, path: str | os.PathLike, *, host: Host | None = None, allow_unchecked: bool = False,
         key: bytes | None = None) -> Path:
    """Write the artifact folder atomically and return its path. See the module doc for what is refused.
    With a key (`key=`, else FACT_RAY_ARTIFACT_KEY) the manifest is signed (artifact_trust)."""
    from fact_ray.compose import composition_of, sha256_file

    manifest = manifest_of(composed, host=host, allow_unchecked=allow_unchecked)
    comp = composition_of(composed)
    final = Path(path).absolute()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        (tmp / LIBS).mkdir(parents=True)
    except OSError as e:
        raise ArtifactError(f"cannot write the artifact at {final}: {e.strerror or e}") from None
    try:
        for r in comp.replacements:
            dest = tmp / LIBS / f"{r.library_sha256}.so"
            if dest.exists():
                continue
            shutil.copyfile(r.library_path, dest)
            if sha256_file(str(dest)) != r.library_sha256:  # the .so changed since compose read it
                raise ArtifactError(f"library {r.library_path} changed after composition (sha256 differs)")
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        key = key if key is not None else trust.key_from_env()
        if key:
            (tmp / trust.SIGNATURE).write_text(trust.signature_of(manifest_bytes, key) + "\n")
        _install(tmp, final)
    except OSError as e:
        raise ArtifactError(f"cannot write the artifact at {final}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Move the finished folder into place; an older artifact there is moved aside first, then removed."""
    trash = None
    if final.exists():
        trash = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------- load


def read_manifest(path: str | os.PathLike, *, key: bytes | None = None) -> dict[str, Any]:
    """The manifest, checked: its signature when a key is given, every field load reads, every library name
    content-addressed inside the folder. One ArtifactError line for anything damaged or foreign."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"{p}: no such artifact folder")
    try:
        raw = (p / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{p}: no {MANIFEST} (not a fact-ray artifact)") from None
    except OSError as e:
        raise ArtifactError(f"{p}/{MANIFEST} cannot be read ({e})") from None
    trust.check_signature(p, raw, key)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{p}/{MANIFEST} cannot be read ({str(e)[:160]})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "fact-ray-composition":
        raise ArtifactError(f"{p}/{MANIFEST} is not a fact-ray composition manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{p}: artifact schema version {manifest.get('schema_version')}, this fact-ray reads "
                            f"{SCHEMA_VERSION}")
    trust.validate_manifest(manifest, str(p))
    return manifest


def check_target(manifest: Mapping[str, Any], *, expect_arch: Arch | str | None = None,
                 expect_toolchain: Mapping[str, str] | None = None, where: str = "artifact") -> None:
    """Refuse an artifact made for another arch or toolchain. `expect_*` stand in for the local machine (tests,
    or preparing a deployment elsewhere); by default the local GPU and installed packages are asked."""
    art_arch = manifest["arch"]
    art_gpu = f" ({manifest['gpu']})" if manifest.get("gpu") else ""
    local = detect(nvcc=None)
    if expect_arch is not None:
        here, desc = Arch(expect_arch), "the expected target"
    elif local.capability is None:
        here, desc = None, "this machine (no CUDA GPU)"
    else:
        major, minor = local.capability
        here, desc = local.arch, f"this machine's {local.gpu_name} (sm_{major}{minor})"
    if here is None:
        raise ArtifactError(f"{where} was built for {art_arch}{art_gpu}; {desc} cannot run its kernels")
    if here.value != art_arch:
        raise ArtifactError(f"{where} was built for {art_arch}{art_gpu}, {desc} is {here.value}: its kernels "
                            "cannot run here")
    versions = {"torch": local.torch, "cutlass": local.cutlass, **(expect_toolchain or {})}
    theirs = manifest.get("toolchain", {})
    for key, label in (("torch", "torch"), ("cutlass", "CUTLASS")):
        if str(theirs.get(key, "")) != str(versions[key]):
            raise ArtifactError(f"{where} was made with {label} {theirs.get(key) or '(unknown)'}, this machine has "
                                f"{label} {versions[key] or '(none)'}: compose it again here")


def _config_from(data: Mapping[str, Any]) -> AnyConfig:
    if not isinstance(data, dict):
        raise ArtifactError("a stored kernel config is not a JSON object")
    try:
        return config_from_dict(data)
    except ValueError as e:
        raise ArtifactError(str(e)) from None


def load(artifact: str | os.PathLike, model: Any, *, inputs: Any = None, device: Any = None,
         expect_arch: Arch | str | None = None, expect_toolchain: Mapping[str, str] | None = None,
         key: bytes | None = None, _checked: Mapping[str, Any] | None = None) -> Any:
    """Restore a composed module from an artifact folder, for `model`: a model reference (file or
    `pkg.mod:factory`), a `fact_ray.capture.LoadedModel`, or an `nn.Module` together with `inputs`.
    The module runs the model's own parameters; no nvcc, no tuning, no pattern table. With a key (`key=`, else
    FACT_RAY_ARTIFACT_KEY) only an artifact signed with it loads."""
    from fact_ray.capture import capture, under_policy
    from fact_ray.compose import KernelChoice, compose
    from fact_ray.compose import graph_hash as graph_hash_of
    from fact_ray.discover import discover
    from fact_ray.shapes import load_dispatch, read_dispatch

    where = f"artifact {artifact}"
    key = key if key is not None else trust.key_from_env()
    dispatch = read_dispatch(artifact)
    if dispatch is not None:  # several shape buckets: a ShapeDispatch over one composition per bucket
        # Every bucket is checked (names, signature, target, library bytes) before the model's code runs.
        checked = {str(Path(artifact) / e): _checked_artifact(Path(artifact) / e, key, expect_arch, expect_toolchain)
                   for e in trust.bucket_folders(artifact, dispatch)}
        return load_dispatch(artifact, dispatch, _loaded_model(model, inputs), device=device,
                             expect_arch=expect_arch, expect_toolchain=expect_toolchain, key=key, _checked=checked)
    if _checked is not None and str(artifact) in _checked:
        manifest, staged = _checked[str(artifact)]
    else:
        manifest, staged = _checked_artifact(artifact, key, expect_arch, expect_toolchain)
    digests = {private: digest for private, digest in staged.values()}

    loaded = _loaded_model(model, inputs)
    want = manifest["model"]
    if loaded.model_hash and loaded.model_hash != want["hash"]:
        raise ArtifactError(f"{where} is for model {want['name']} (hash {want['hash'][:12]}), not {loaded.name} "
                            f"(hash {loaded.model_hash[:12]})")
    loaded = under_policy(loaded, manifest["policy"])  # the dtype the artifact was composed in
    captured = capture(_inputs_beside_parameters(loaded))
    if graph_hash_of(captured.graph) != want["graph_hash"]:
        raise ArtifactError(f"{where} is for model {want['name']}: the graph of {loaded.name} differs from it "
                            "(other code, shapes or dtypes)")
    policy, arch = Precision(manifest["policy"]), Arch(manifest["arch"])
    matches = discover(captured.graph, arch, policy)
    found = {m.key for m in matches}
    winners: dict[str, KernelChoice] = {}
    for pat in manifest["patterns"]:
        if pat["match_key"] not in found:
            raise ArtifactError(f"{where}: pattern {pat['rule']} ({pat['match_key'][:60]}) is not in {loaded.name}")
        speedup = pat.get("speedup")
        winners[pat["match_key"]] = KernelChoice(
            config=_config_from(pat["config"]), library_path=staged[pat["library"]][0],
            symbol=pat["symbol"], speedup=float("nan") if speedup is None else float(speedup))
    try:
        composed = compose(captured, matches, winners, policy, arch=arch, digests=digests)
    except CompileError as e:  # a library that will not load or speaks another ABI: the artifact's fault
        raise ArtifactError(f"{where}: {first_line(e, named=False)}") from None
    composed.fact_ray_manifest = manifest
    if device is not None:
        composed.to(device)
    return composed


def _checked_artifact(artifact: str | os.PathLike, key: bytes | None, expect_arch: Any,
                      expect_toolchain: Any) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """(manifest, staged libraries) of one artifact folder, every check done (no model code runs here)."""
    manifest = read_manifest(artifact, key=key)
    check_target(manifest, expect_arch=expect_arch, expect_toolchain=expect_toolchain, where=f"artifact {artifact}")
    return manifest, trust.stage_libraries(Path(artifact), manifest)


def _loaded_model(model: Any, inputs: Any) -> Any:
    """`load`'s model argument as a LoadedModel: a reference, a LoadedModel, or an nn.Module with inputs."""
    from fact_ray.capture import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(str(model))
    import torch

    if not isinstance(model, torch.nn.Module) or inputs is None:
        raise ArtifactError("load needs a model reference, or an nn.Module with inputs= (example inputs)")
    return LoadedModel(module=model.eval(), inputs=tuple(inputs), name=type(model).__name__, model_hash="")


def _inputs_beside_parameters(loaded: Any) -> Any:
    """The same model with its example inputs moved to where its parameters live: a module that was composed and
    moved to a GPU keeps CPU example inputs, and tracing it would mix devices."""
    import dataclasses

    import torch

    where = next((t.device for t in (*loaded.module.parameters(), *loaded.module.buffers())), None)
    if where is None:
        return loaded
    inputs = tuple(x.to(where) if isinstance(x, torch.Tensor) else x for x in loaded.inputs)
    return dataclasses.replace(loaded, inputs=inputs)


def load_report(path: str | os.PathLike) -> str:
    """What an artifact holds, for a person: model, target, toolchain, check, and one line per kernel (per shape
    bucket, after the bucket rule, for a dispatch artifact)."""
    from fact_ray.shapes import read_dispatch

    dispatch = read_dispatch(path)
    if dispatch is not None:
        head = [f"dispatch   {Path(path)}: {len(dispatch['buckets'])} shape bucket(s), rule {dispatch['rule']} "
                f"(any other shape runs {dispatch['untuned']})"]
        head += [f"  not composed: shapes {sk['spec']}: {sk['reason']}" for sk in dispatch.get("skipped", [])]
        return "\n".join(head + [f"\n[shapes {b['spec']}]\n" + load_report(Path(path) / b["artifact"])
                                 for b in dispatch["buckets"]])
    m = read_manifest(path)
    tc = m.get("toolchain", {})
    chk = m.get("check")
    if chk is None:
        check_line = "NOT CHECKED end to end (saved with allow_unchecked)"
    else:
        errs = [e for e in chk.get("rel_errs", []) if e is not None]
        check_line = (f"{'passed' if chk.get('passed') else 'FAILED'} on {chk.get('device', '?')}: worst relative "
                      f"error {max(errs) if errs else float('nan'):.3g} (tolerance {chk.get('tolerance')}), "
                      f"seeds {chk.get('seeds')}")
    lines = [
        f"artifact   {Path(path)}",
        f"model      {m['model']['name']} (hash {m['model']['hash'][:12]}, {m['model']['capture']})",
        f"target     {m['arch']} {m.get('gpu') or '(GPU unknown)'}, policy {m['policy']}",
        f"toolchain  nvcc {tc.get('nvcc') or '?'} | CUTLASS {tc.get('cutlass') or '?'} | torch {tc.get('torch') or '?'}"
        f" | bench method {tc.get('bench_method') or '?'}",
        f"runtime    driver {tc.get('driver') or '?'} | cuBLAS {tc.get('cublas') or '?'} | "
        f"cuDNN {tc.get('cudnn') or '?'}",
        f"check      {check_line}",
        f"kernels    {len(m['patterns'])} pattern(s) replaced, {len(m.get('kept', []))} kept as PyTorch ops",
        f"guarantee  {(m.get('guarantee') or {}).get('summary') or 'not run (every trial winner composed)'}",
    ]
    for fb in m.get("fallbacks", []):  # said once, here: winners whose kernel cannot take the graph's operands
        lines.append(f"  fallback: {fb['reason']}")
    for p in m["patterns"]:
        sp = p.get("speedup")
        lines.append(f"  {p['rule']:<22} at {p['anchor']:<14} {p['config']['name']}  "
                     f"{'x%.2f' % sp if sp is not None else 'speedup ?'}  [{p['sha256'][:12]}]")
    for d in (m.get("guarantee") or {}).get("dropped", []):
        lines.append(f"  dropped {d['rule']:<14} at {d['anchor']:<14} {d['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- pipeline


def compose_from_table(ref: str, settings: Settings, out_dir: str | os.PathLike,
                       families: frozenset[str] = frozenset(), *, against: str | None = "eager",
                       compile_mode: str | None = None, say: Any = lambda _: None) -> Path:
    """`fact-ray compose MODEL`: the table's winners for this model, toolchain and arch, composed, checked end to end
    on the local GPU and saved to `out_dir`. Without a GPU nothing is saved (an unchecked composition never is).
    `families` (compose.parse_families) limits the kernels to those families; the rest keep their PyTorch ops.
    `against` ("eager", "compile" or None) runs the whole-module guarantee (fact_ray/guarantee.py) before the
    check: only replacements that make the module faster stay, and the manifest records the end-to-end ratio."""
    from fact_ray.capture import capture, load_model, under_policy
    from fact_ray.compose import KernelChoice, check, compose, composition_of
    from fact_ray.discover import discover
    from fact_ray.pattern_table import PatternTable, TableKey
    from fact_ray.toolchain import key_toolchain, target_arch

    policy = settings.policy
    here = detect(nvcc=None)
    gpu = here.capability is not None
    arch = target_arch(settings.arch, here.capability, here.gpu_name)
    if arch is None:
        raise NotAvailable("no CUDA GPU: composing needs one to check the result end to end (pass --arch to see "
                           "what the table holds for a GPU elsewhere)")
    loaded = under_policy(load_model(ref), policy)
    captured = capture(loaded)
    matches = discover(captured.graph, arch, policy)
    # The toolchain the table keys on is the one the libraries were built with: this host's nvcc names it.
    host = detect(settings.nvcc)
    toolchain = key_toolchain(host)
    table = PatternTable(settings.resolved_table_uri)
    libdir = str(Path(settings.home) / "compose-libs")
    winners: dict[str, KernelChoice] = {}
    for m in matches:
        if m.key in winners or (families and m.family not in families):
            continue
        row = table.best(TableKey.of(m.key, policy, arch, toolchain))
        # Only a verified kernel faster than the PyTorch op replaces it; anything else keeps the PyTorch op.
        if (row is None or not row.valid or row.config is None or not row.library_uri or not row.library_symbol
                or not (row.speedup or 0.0) > 1.0):
            continue
        path = table.fetch_library(row.library_uri, libdir)
        winners[m.key] = KernelChoice(row.config, path, row.library_symbol, row.speedup)
    if gpu and against is not None and winners:
        composed = _guarded(captured, matches, winners, policy, arch, loaded, against, compile_mode, say)
    else:
        composed = compose(captured, matches, winners, policy, arch=arch)
    if not gpu:
        n = len(composition_of(composed).replacements)
        raise NotAvailable(f"{loaded.name}: {n} pattern(s) composed from the table, but there is no CUDA GPU to check "
                           "the module end to end; an unchecked composition is never saved")
    report = check(loaded.module, composed, policy, example_inputs=loaded.inputs, rebuild=loaded.rebuild)
    if not report.passed:
        raise ComposeError(f"{loaded.name}: the composed module failed its end-to-end check ({report.reason}); "
                           "nothing saved")
    return save(composed, out_dir, host=host)


def _guarded(captured: Any, matches: Any, winners: Any, policy: Precision, arch: Arch, loaded: Any, against: str,
             compile_mode: str | None, say: Any) -> Any:
    """The guarantee on the local GPU, on the model's own weights and example inputs (moved there)."""
    import torch

    from fact_ray.guarantee import guarded_compose

    original = loaded.module.to("cuda").eval()
    inputs = tuple(x.to("cuda") if isinstance(x, torch.Tensor) else x for x in loaded.inputs)
    return guarded_compose(captured, matches, winners, policy, original=original, inputs=inputs, arch=arch,
                           against=against, compile_mode=compile_mode, say=say)

