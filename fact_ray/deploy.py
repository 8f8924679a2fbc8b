"""Deploying a composed module beyond Python's graph: `torch.export`, then an AOTInductor package.

A composed module calls `torch.ops.fact_ray_native.{gemm,attention,norm}` ops (realize/dispatch.py; or, where
the native dispatcher cannot be built, Python custom ops `torch.ops.fact_ray.<name>`). `torch.export` keeps them
as calls (their Meta / fake implementations give shapes), and AOTInductor compiles the rest of the graph into C++
and calls our ops through its proxy executor, which looks each op up in the dispatcher by name; a native op's
last argument names its kernel by content. So a process that runs the package needs the kernels registered
first: `register_artifact` does that from an artifact folder alone (no model, no nvcc, no table), and
`load_package` registers, then loads. Both export and packaging run under `torch.no_grad()`: the
composed module is inference only (fact_ray/inference.py).

`package_artifact` is `fact-ray compose --package`: the artifact's module on the local GPU, exported at the
model's example shapes and packaged into `<artifact>/aoti/model.pt2` (written beside, then moved into place).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Sequence

from fact_ray.errors import ArtifactError, ComposeError, first_line

PACKAGE = Path("aoti") / "model.pt2"


def export(module: Any, inputs: Sequence[Any]) -> Any:
    """`torch.export.export` of a composed module (or any module) at the shapes of `inputs`, under no_grad."""
    import torch

    try:
        with torch.no_grad():
            return torch.export.export(module, tuple(inputs))
    except Exception as e:  # an export failure is reported as this composition's, in one line
        raise ComposeError(f"torch.export of the composed module failed: {first_line(e, 240)}") from e


def package(module: Any, inputs: Sequence[Any], path: str | os.PathLike) -> Path:
    """Export `module` and compile it with AOTInductor into the package file `path` (written atomically)."""
    import torch

    program = export(module, inputs)
    final = Path(path).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def register_artifact(artifact: str | os.PathLike) -> tuple[str, ...]:
    """Register every kernel of an artifact in this process from its manifest and libraries; returns what it
    registered: the native dispatcher's kernel ids, or the Python custom ops' names.
    The artifact is checked as `fact_ray.load` checks it (arch, toolchain, library bytes)."""
    from fact_ray import artifact_trust as trust
    from fact_ray.artifact import _checked_artifact, _config_from
    from fact_ray.compose import KernelChoice, library_for
    from fact_ray.realize import dispatch, family

    # The same checks as fact_ray.load, in the same place: libraries hashed and loaded from one private copy.
    manifest, staged = _checked_artifact(artifact, trust.key_from_env(), None, None)
    names = []
    # The path the composition took: a native kernel id in the manifest needs the native dispatcher here too.
    native = any(pat.get("kernel") for pat in manifest["patterns"])
    if native:
        try:
            dispatch.load()
        except Exception as e:  # DispatchUnavailable: the package calls ops this process cannot provide
            raise ArtifactError(f"artifact {artifact} calls the native dispatcher's ops, which cannot be built "
                                f"here: {first_line(e, named=False)}") from None
    for pat in manifest["patterns"]:
        cfg = _config_from(pat["config"])
        choice = KernelChoice(cfg, staged[pat["library"]][0], pat["symbol"])
        library = library_for(choice, pat["sha256"])
        fam = family.for_config(cfg)
        if fam is None:
            raise ArtifactError(f"artifact {artifact}: no kernel family has template {cfg.template!r} "
                                f"({pat['rule']})")
        binding = fam.bind(fam.problem_type(**dict(pat["problem"])), cfg, library, pat["symbol"], native,
                           pat["sha256"])
        # What the package calls: the op and, for a native op, the kernel id (manifests before the native
        # dispatcher name the Python op without its namespace).
        called = (pat["op"] if "." in pat["op"] else f"fact_ray.{pat['op']}", pat.get("kernel", ""))
        if (binding.name, binding.kernel) != called:  # the manifest's problem does not give back that call
            raise ArtifactError(f"artifact {artifact}: pattern {pat['rule']} registers {binding.name} "
                                f"{binding.kernel}, the composition called {called[0]} {called[1]}".rstrip())
        names.append(binding.kernel or binding.name)
    return tuple(names)


def load_package(path: str | os.PathLike, artifact: str | os.PathLike | None = None) -> Any:
    """Register the artifact's ops (default: the artifact the package lies in, if it lies in one), then load the
    package. Ops registered otherwise (already in this process) need no artifact."""
    import torch

    from fact_ray.artifact import MANIFEST

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such AOTInductor package")
    if artifact is None and p.parent.name == PACKAGE.parent.name and (p.parent.parent / MANIFEST).is_file():
        artifact = p.parent.parent  # packaged by `fact-ray compose --package` inside its artifact
    if artifact is not None:
        register_artifact(artifact)
    return torch._inductor.aoti_load_package(str(p))


def package_artifact(artifact: str | os.PathLike, model: Any) -> Path:
    """`fact-ray compose --package`: the artifact's composed module on the local GPU, packaged inside it."""
    from fact_ray.artifact import load
    from fact_ray.capture import load_model, under_policy
    from fact_ray.artifact import read_manifest

    import torch

    loaded = under_policy(load_model(str(model)) if isinstance(model, (str, os.PathLike)) else model,
                          read_manifest(artifact)["policy"])
    composed = load(artifact, loaded, device="cuda")
    inputs = tuple(x.to("cuda") if isinstance(x, torch.Tensor) else x for x in loaded.inputs)
    return package(composed, inputs, Path(artifact) / PACKAGE)
