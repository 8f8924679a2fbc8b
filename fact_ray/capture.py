"""Model reference -> traced graph with shapes and dtypes on every node.

Two ways in: a KernelBench-format file (defines `Model`, `get_inputs()`, `get_init_inputs()`), or
`pkg.module:factory`, a callable returning `(module, example_inputs)`.

Capture uses `torch.export.export(strict=False)`, which traces with fake tensors: the model is never run at full
size on the CPU. The graph is kept as exported (no decompositions), so node names stay those of the
ExportedProgram that composition rewrites later; the discover rules read every spelling of an op (linear, addmm,
mm, matmul, bmm, t, ...) themselves. Only where export fails do we fall back to `torch.fx.symbolic_trace`, and the
returned notes say so.

Placeholders carry `kind` (input | parameter | buffer | constant) and, in `kwargs`, `fqn` (the state-dict name)
and, for buffers and constants, `content`: a tag naming a recognised value ("tril", "triu1",
"causal_additive", "scalar=<v>"). Discovery only sees the Graph, never tensor values, and a causal mask is most
often a buffer; the tag is how a rule can tell a causal mask from any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import logging
import operator
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from fact_ray.errors import CaptureError, ModelInvalid, ModelNotFound, ModelRaised, first_line
from fact_ray.types import Graph, Node, Ref, TensorMeta

KERNELBENCH_HINT = "a KernelBench-format .py file defines Model, get_inputs() and get_init_inputs()"
_FACTORY_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_CONTENT_MAX_NUMEL = 1 << 24  # larger buffers are not inspected for a mask pattern


@dataclass
class LoadedModel:
    """A user's model, built and in eval mode, with its example inputs."""

    module: torch.nn.Module
    inputs: tuple[Any, ...]
    name: str
    model_hash: str
    ref: str = ""
    # Builds the same model again (Model(*get_init_inputs()), or the factory's module): the float64 reference is a
    # fresh instance loaded with this one's state (fact_ray.reference), never a deep copy that closures escape.
    rebuild: Optional[Callable[[], torch.nn.Module]] = field(default=None, repr=False, compare=False)
    # The shape buckets the model file names with get_shapes() (fact_ray.shapes); empty when it names none.
    buckets: tuple[Any, ...] = ()


@dataclass(frozen=True, eq=False)
class Captured:
    """The traced graph plus the torch objects later stages need (profiling, composition)."""

    graph: Graph
    exported: torch.export.ExportedProgram | None  # None when FX captured the model
    graph_module: torch.fx.GraphModule  # ep.graph_module (parameters lifted to placeholders) or the FX trace
    inputs: tuple[Any, ...]
    method: str  # "export" | "fx"
    notes: tuple[str, ...] = field(default=())

    def flat_args(self) -> tuple[Any, ...]:
        """Arguments that run `graph_module` as captured: for export, parameters, buffers and constants (lifted
        to placeholders) followed by the user inputs, in placeholder order; for FX, the user inputs."""
        if self.exported is None:
            return tuple(self.inputs)
        return exported_args(self.exported, self.inputs)


def exported_args(ep: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The flat arguments of `ep.graph_module`: lifted state and constants, then the user inputs, in order."""
    user = iter(inputs)
    out = []
    for spec in ep.graph_signature.input_specs:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            out.append(next(user))
        elif spec.target in ep.state_dict:
            out.append(ep.state_dict[spec.target])
        else:
            out.append(ep.constants[spec.target])
    return tuple(out)


# --------------------------------------------------------------------------------------------- loading


def load_model(ref: str) -> LoadedModel:
    """Build the model a reference names; every failure a user can cause is a typed, one-line error.

    `ref@shapes=<bucket>` (fact_ray.shapes.shaped_ref) is the same model with example inputs at the bucket's
    shapes."""
    import dataclasses

    from fact_ray.buckets import inputs_for, split_ref

    ref = str(ref)
    base, bucket = split_ref(ref)
    if bucket is not None:
        loaded = load_model(base)
        return dataclasses.replace(loaded, inputs=inputs_for(loaded.inputs, bucket), ref=ref)
    if _FACTORY_REF.match(ref) and not Path(ref).exists():
        return _load_factory(ref)
    return _load_file(ref)


# The dtype a precision policy runs the whole model in (measuring.md: bf16 weights and inputs under bf16). fp32 and
# tf32 keep float32; they differ in what math the kernels may use, not in the model's dtype.
POLICY_MODEL_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def under_policy(loaded: LoadedModel, policy: Any) -> LoadedModel:
    """The model as `policy` runs it: under bf16/fp16 its floating parameters, buffers and example inputs are
    converted (in place for the module), so discovery sees bf16 GEMMs and composition needs no casts around them.
    Integer and boolean tensors are left alone."""
    name = getattr(policy, "value", policy)
    if name not in POLICY_MODEL_DTYPE:
        raise ValueError(f"unknown precision policy {policy!r} (one of {', '.join(POLICY_MODEL_DTYPE)})")
    dtype = POLICY_MODEL_DTYPE[name]
    if dtype == torch.float32:
        return loaded
    loaded.module.to(dtype)
    inputs = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                   for x in loaded.inputs)
    return LoadedModel(module=loaded.module, inputs=inputs, name=loaded.name, model_hash=loaded.model_hash,
                       ref=loaded.ref, rebuild=loaded.rebuild, buckets=loaded.buckets)


def _load_file(ref: str) -> LoadedModel:
    path = Path(ref)
    if path.is_dir():
        raise ModelInvalid(f"{ref}: is a folder, not a model file ({KERNELBENCH_HINT})")
    if not path.is_file():
        raise ModelNotFound(f"{ref}: no such file (give a KernelBench-format .py file, or pkg.module:factory)")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelInvalid(f"{ref}: cannot read the file ({first_line(e, 160)})") from None
    digest = hashlib.sha256(source.encode()).hexdigest()
    # A unique module name per content, so two model files both called model.py never collide in sys.modules.
    mod_name = f"fact_ray_user_model_{digest[:16]}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelInvalid(f"{ref}: not a Python file ({KERNELBENCH_HINT})")
    if mod_name in sys.modules:  # this very source was imported before: importing it again could clash
        mod = sys.modules[mod_name]  # (a custom op defined twice), and would give the same module anyway
    else:
        mod = _import_file(ref, mod_name, spec)
    return _build(ref, path.stem, mod, source)


def _import_file(ref: str, mod_name: str, spec: Any) -> Any:
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses and pickling inside the user's file look themselves up here
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        sys.modules.pop(mod_name, None)
        raise ModelInvalid(f"{ref}:{e.lineno}: syntax error: {e.msg}") from None
    except KeyboardInterrupt:
        sys.modules.pop(mod_name, None)
        raise
    except BaseException as e:  # as in _call: whatever the user's file raises is its error
        sys.modules.pop(mod_name, None)
        raise ModelRaised(f"{ref}: importing the file raised {first_line(e, 160)}") from e
    return mod


def _build(ref: str, name: str, mod: Any, source: str) -> LoadedModel:
    model_cls = getattr(mod, "Model", None)
    if model_cls is None or not callable(model_cls):
        raise ModelInvalid(f"{ref}: defines no `Model` class ({KERNELBENCH_HINT})")
    get_inputs = getattr(mod, "get_inputs", None)
    if get_inputs is None or not callable(get_inputs):
        raise ModelInvalid(f"{ref}: defines no get_inputs() ({KERNELBENCH_HINT})")
    get_init = getattr(mod, "get_init_inputs", None)

    init = _call(get_init, f"{ref}: get_init_inputs()") if callable(get_init) else []
    if not isinstance(init, (list, tuple)):
        raise ModelInvalid(f"{ref}: get_init_inputs() must return a list, got {type(init).__name__}")
    module = _call(lambda: model_cls(*init), f"{ref}: Model(*get_init_inputs())")
    if not isinstance(module, torch.nn.Module):
        raise ModelInvalid(f"{ref}: Model(...) built a {type(module).__name__}, not a torch.nn.Module")
    inputs = _call(get_inputs, f"{ref}: get_inputs()")
    if not isinstance(inputs, (list, tuple)):
        raise ModelInvalid(f"{ref}: get_inputs() must return a list, got {type(inputs).__name__}")
    model_hash = hashlib.sha256((source + "\0" + repr(list(init))).encode()).hexdigest()
    get_shapes = getattr(mod, "get_shapes", None)
    buckets: tuple[Any, ...] = ()
    if callable(get_shapes):
        from fact_ray.buckets import buckets_from

        buckets = buckets_from(_call(get_shapes, f"{ref}: get_shapes()"), ref)
    return LoadedModel(module=module.eval(), inputs=tuple(inputs), name=name, model_hash=model_hash, ref=ref,
                       rebuild=lambda: model_cls(*init), buckets=buckets)


def _load_factory(ref: str) -> LoadedModel:
    mod_name, attr = ref.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ModelNotFound(f"{ref}: no module named {mod_name!r} (check the name and PYTHONPATH)") from None
        raise ModelRaised(f"{ref}: importing {mod_name} raised {first_line(e, 160)}") from e
    except SyntaxError as e:
        raise ModelInvalid(f"{ref}: {e.filename}:{e.lineno}: syntax error: {e.msg}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # as in _call
        raise ModelRaised(f"{ref}: importing {mod_name} raised {first_line(e, 160)}") from e
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        raise ModelInvalid(f"{ref}: module {mod_name} has no callable {attr!r}")
    result = _call(factory, f"{ref}: {attr}()")
    if (not isinstance(result, (tuple, list)) or len(result) != 2 or not isinstance(result[0], torch.nn.Module)
            or not isinstance(result[1], (tuple, list))):
        raise ModelInvalid(f"{ref}: the factory must return (torch.nn.Module, example_inputs as a tuple or list)")
    module, inputs = result
    try:
        source = inspect.getsource(mod)
    except (OSError, TypeError):
        source = getattr(mod, "__file__", "") or mod_name  # compiled module: its path stands for its source
    model_hash = hashlib.sha256((source + "\0" + repr(attr)).encode()).hexdigest()
    return LoadedModel(module=module.eval(), inputs=tuple(inputs), name=ref, model_hash=model_hash, ref=ref,
                       rebuild=lambda: _rebuilt_by_factory(factory, ref))


def _rebuilt_by_factory(factory: Any, ref: str) -> torch.nn.Module:
    result = _call(factory, f"{ref}: rebuilding the model")
    return result[0]


def _call(fn: Any, what: str) -> Any:
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the user's code: SystemExit, or its own BaseException subclass, is its error
        raise ModelRaised(f"{what} raised {first_line(e, 160)}") from e


# --------------------------------------------------------------------------------------------- capture


def capture(loaded: LoadedModel) -> Captured:
    """Trace the model into a Graph: torch.export (fake tensors, nothing runs at full size), FX only if that fails."""
    try:
        with _quiet():
            ep = torch.export.export(loaded.module, tuple(loaded.inputs), strict=False)
    except Exception as e_export:
        _raise_if_forward_raises(loaded)
        try:
            gm, notes = _fx_trace(loaded)
        except ModelRaised:
            raise
        except Exception as e_fx:
            raise CaptureError(
                f"{_who(loaded)}: cannot trace the model: torch.export failed ({first_line(e_export, 160)}) and "
                f"torch.fx failed ({first_line(e_fx, 160)}); Python branches on tensor values are the usual cause"
            ) from e_fx
        note = f"torch.export failed ({first_line(e_export, 160)}); captured with torch.fx.symbolic_trace instead"
        graph = Graph(model_name=loaded.name, model_hash=loaded.model_hash, capture="fx",
                      nodes=tuple(_fx_nodes(gm, loaded.module)))
        return Captured(graph=graph, exported=None, graph_module=gm, inputs=tuple(loaded.inputs), method="fx",
                        notes=(note, *notes))
    graph = Graph(model_name=loaded.name, model_hash=loaded.model_hash, capture="export",
                  nodes=tuple(_export_nodes(ep)))
    return Captured(graph=graph, exported=ep, graph_module=ep.graph_module, inputs=tuple(loaded.inputs),
                    method="export")


def _who(loaded: LoadedModel) -> str:
    return loaded.ref or loaded.name


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep torch's own failure dumps (graph listings, guard warnings) off the user's terminal: a failed trace
    is reported as one typed error line, and the exception itself keeps the details for --debug."""
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.CRITICAL)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _tracing_limits() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'fake tensors cannot follow this model', not 'the model is broken'."""
    from torch._subclasses import fake_tensor as ft
    from torch.fx.experimental import symbolic_shapes as ss

    names = [(ft, "DataDependentOutputException"), (ft, "DynamicOutputShapeException"),
             (ft, "UnsupportedOperatorException"), (ft, "UnsupportedFakeTensorException"),
             (ss, "GuardOnDataDependentSymNode")]
    return tuple(getattr(m, n) for m, n in names if isinstance(getattr(m, n, None), type))


def _raise_if_forward_raises(loaded: LoadedModel) -> None:
    """Export failed: tell a model whose forward is broken (ModelRaised) from one that is merely untraceable.

    First run forward on fake copies of the inputs (cheap at any size); only if that raises something other than
    a tracing limit do we confirm with one real run, so a model is never blamed for a limit of fake tensors.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in loaded.inputs)
        with _quiet(), mode, torch.no_grad():
            loaded.module(*fake)
        return
    except _tracing_limits():
        return
    except Exception:
        pass
    try:
        with torch.no_grad():
            loaded.module(*loaded.inputs)
    except Exception as e:
        raise ModelRaised(f"{_who(loaded)}: forward raised {first_line(e, 160)}") from e


class _ThroughModules(torch.fx.Tracer):
    """Trace into torch.nn modules too, so nn.Linear shows up as linear(x, weight, bias) like in export."""

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False


class _Recorder(torch.fx.Interpreter):
    """Runs the FX graph once and keeps, per node, its TensorMeta, or its value when it is plain Python (shape
    arithmetic such as B, T, C = x.shape): the conversion folds those into literals, as export does."""

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        n.meta["fact_ray_meta"] = tensor_meta(value)
        if _is_plain(value):
            n.meta["fact_ray_value"] = tuple(value) if isinstance(value, (list, tuple)) else value
        return value


def _is_plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    return isinstance(v, (bool, int, float)) and not isinstance(v, torch.Tensor)


def _fx_trace(loaded: LoadedModel) -> tuple[torch.fx.GraphModule, tuple[str, ...]]:
    with _quiet():
        graph = _ThroughModules().trace(loaded.module)
    gm = torch.fx.GraphModule(loaded.module, graph, class_name=type(loaded.module).__name__)
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in loaded.inputs)
        with _quiet(), mode, torch.no_grad():
            _Recorder(gm).run(*fake)
        return gm, ()
    except Exception:
        pass
    # The op that stopped export stops fake tensors too: read the shapes off one real run instead.
    for n in gm.graph.nodes:
        n.meta.pop("fact_ray_meta", None)
        n.meta.pop("fact_ray_value", None)
    try:
        with torch.no_grad():
            _Recorder(gm).run(*loaded.inputs)
    except Exception as e:
        raise ModelRaised(f"{_who(loaded)}: forward raised {first_line(e, 160)}") from e
    return gm, ("shapes were read off one eager run of the model on the CPU (fake tensors could not follow it)",)


# --------------------------------------------------------------------------------------------- graph conversion


def tensor_meta(value: Any) -> TensorMeta | None:
    """TensorMeta of a (fake) tensor, of the first tensor of a list or tuple, or of FX's TensorMetadata."""
    if isinstance(value, (list, tuple)) and not hasattr(value, "shape"):
        for v in value:
            m = tensor_meta(v)
            if m is not None:
                return m
        return None
    if isinstance(value, torch.Tensor):
        return TensorMeta(shape=tuple(int(s) for s in value.shape), dtype=dtype_name(value.dtype),
                          stride=tuple(int(s) for s in value.stride()))
    if all(hasattr(value, a) for a in ("shape", "dtype", "stride")) and isinstance(value.dtype, torch.dtype):
        return TensorMeta(shape=tuple(int(s) for s in value.shape), dtype=dtype_name(value.dtype),
                          stride=tuple(int(s) for s in value.stride))
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def content_tag(t: torch.Tensor) -> str:
    """Name a buffer's value when it is one a rule cares about: a causal mask in one of its forms, or a scalar."""
    if not isinstance(t, torch.Tensor) or t.is_complex() or t.device.type == "meta":
        return ""
    if t.numel() == 1:
        return f"scalar={float(t.reshape(()))!r}"
    if t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.numel() > _CONTENT_MAX_NUMEL:
        return ""
    if any(s != 1 for s in t.shape[:-2]):
        return ""
    n = t.shape[-1]
    m = t.detach().reshape(n, n).to("cpu", torch.float64)
    below = torch.ones(n, n, dtype=torch.bool).tril()  # on and below the diagonal: what a causal row may see
    if torch.equal(m, below.to(torch.float64)):
        return "tril"
    if torch.equal(m, (~below).to(torch.float64)):
        return "triu1"
    if bool((m[below] == 0).all()) and bool((m[~below] <= -1e4).all()):
        return "causal_additive"
    return ""


def canonical_target(target: Any) -> str:
    """ATen op overloads print as 'aten.linear.default'; getitem is 'getitem'; other callables by their name."""
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        s = str(target)
        return s if s.count(".") >= 2 else s + ".default"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    return f"{mod}.{name}" if mod else name


def convert_arg(a: Any) -> Any:
    """FX argument -> plain value: Ref for nodes, tuples for lists, 'torch.<name>' for dtypes and layouts."""
    if isinstance(a, torch.fx.Node):
        return Ref(a.name)
    if isinstance(a, (list, tuple)):
        return tuple(convert_arg(x) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((str(k), convert_arg(v)) for k, v in a.items()))
    if isinstance(a, (torch.dtype, torch.layout, torch.memory_format)):
        return str(a)
    if isinstance(a, torch.device):
        return f"device={a}"
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(a)
    return repr(a)


def _kwargs(kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((k, convert_arg(v)) for k, v in kwargs.items())


def _export_nodes(ep: Any) -> Iterator[Node]:
    kinds = {"USER_INPUT": "input", "PARAMETER": "parameter", "BUFFER": "buffer", "CONSTANT_TENSOR": "constant"}
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs if hasattr(s.arg, "name")}
    for n in ep.graph_module.graph.nodes:
        meta = tensor_meta(n.meta.get("val"))
        if n.op == "placeholder":
            spec = specs.get(n.name)
            kind = kinds.get(spec.kind.name, spec.kind.name.lower()) if spec else "input"
            extra: list[tuple[str, Any]] = []
            if spec is not None and spec.target is not None:
                extra.append(("fqn", spec.target))
                value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
                if kind in ("buffer", "constant") and isinstance(value, torch.Tensor):
                    tag = content_tag(value)
                    if tag:
                        extra.append(("content", tag))
            yield Node(name=n.name, op="placeholder", target=kind, kwargs=tuple(extra), meta=meta, kind=kind)
        elif n.op == "output":
            yield Node(name=n.name, op="output", target="output", args=convert_arg(n.args))
        else:
            yield Node(name=n.name, op=n.op, target=canonical_target(n.target), args=convert_arg(n.args),
                       kwargs=_kwargs(n.kwargs), meta=meta)


# FX records Python-level calls; name them by the ATen packet they dispatch to so the same rules apply.
_OPERATOR_ATEN = {
    operator.add: "aten.add.Tensor", operator.iadd: "aten.add.Tensor", operator.sub: "aten.sub.Tensor",
    operator.mul: "aten.mul.Tensor", operator.imul: "aten.mul.Tensor", operator.truediv: "aten.div.Tensor",
    operator.matmul: "aten.matmul.default", operator.neg: "aten.neg.default", operator.pow: "aten.pow.Tensor_Scalar",
    operator.eq: "aten.eq.Scalar", operator.ne: "aten.ne.Scalar", operator.invert: "aten.bitwise_not.default",
    operator.lt: "aten.lt.Scalar", operator.le: "aten.le.Scalar", operator.gt: "aten.gt.Scalar",
    operator.ge: "aten.ge.Scalar",
}
_VARARG_METHODS = {"view", "reshape", "permute", "expand", "repeat"}
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type_as", "type"}


def _schema_accepts(type_str: str, v: Any) -> tuple[bool, Any]:
    """Whether value v fits an ATen schema argument type (lightly: enough to pick the overload)."""
    optional = type_str.startswith("Optional[")
    if v is None:
        return optional, v
    t = type_str.removeprefix("Optional[").removesuffix("]") if optional else type_str
    if t == "Tensor":
        return isinstance(v, torch.fx.Node), v
    if t.startswith("List[int]") or t.startswith("List[SymInt]"):
        if isinstance(v, int) and not isinstance(v, bool):
            return True, (v,)
        return isinstance(v, (list, tuple)), v
    if t in ("int", "SymInt"):
        return isinstance(v, int) and not isinstance(v, bool), v
    if t == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool), v
    if t == "number":
        return isinstance(v, (int, float, bool)), v
    if t == "bool":
        return isinstance(v, bool), v
    if t == "str":
        return isinstance(v, str), v
    if t.startswith("List[Tensor"):
        return isinstance(v, (list, tuple)), v
    return True, v


def _bind_aten(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, tuple, dict] | None:
    """Pick the ATen overload a Python-level call (x.mean(-1, keepdim=True)) dispatches to and lay its arguments
    out as ATen does (positional up to the last given, keyword-only as keywords)."""
    packet_ = getattr(torch.ops.aten, name, None)
    if packet_ is None:
        return None
    aliases = {"input": "self", "self": "input"}
    for overload in packet_.overloads():
        schema = getattr(packet_, overload)._schema
        params = [a for a in schema.arguments if not a.kwarg_only]
        kw_only = {a.name: a for a in schema.arguments if a.kwarg_only}
        if len(args) > len(params):
            continue
        values: dict[str, Any] = {p.name: v for p, v in zip(params, args)}
        ok, kw_out = True, {}
        for k, v in kwargs.items():
            key = k if (k in values or any(p.name == k for p in params) or k in kw_only) else aliases.get(k, k)
            if any(p.name == key for p in params) and key not in values:
                values[key] = v
            elif key in kw_only:
                kw_out[key] = v
            else:
                ok = False
        if not ok or any(a.name not in kw_out and not a.has_default_value() for a in kw_only.values()):
            continue
        last = max((i for i, p in enumerate(params) if p.name in values), default=-1)
        positional = []
        for p in params[:last + 1]:
            if p.name in values:
                fits, v = _schema_accepts(str(p.type), values[p.name])
            elif p.has_default_value():
                fits, v = True, p.default_value
            else:
                fits, v = False, None
            if not fits:
                ok = False
                break
            positional.append(v)
        if ok and all(p.name in values or p.has_default_value() for p in params):
            return f"aten.{name}.{overload}", tuple(positional), kw_out
    return None


def _python_positional(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """A Python function's call as positional arguments in signature order (private _params dropped), so
    F.softmax(x, dim=-1) reads like aten.softmax(x, -1)."""
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    out = []
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name.startswith("_"):
            continue
        out.append(bound.arguments.get(name))
    return tuple(out), {}


def _fold(a: Any) -> Any:
    """Replace references to plain-Python nodes (shape arithmetic) by their recorded values."""
    if isinstance(a, torch.fx.Node) and "fact_ray_value" in a.meta:
        return a.meta["fact_ray_value"]
    if isinstance(a, (list, tuple)):
        return type(a)(_fold(x) for x in a)
    if isinstance(a, dict):
        return {k: _fold(v) for k, v in a.items()}
    return a


def _fx_call(n: torch.fx.Node) -> tuple[str, tuple, dict]:
    """Canonical target and arguments of an FX call, in ATen's terms wherever we can tell them."""
    args, kwargs = _fold(tuple(n.args)), _fold(dict(n.kwargs))
    if n.op == "call_method":
        name = str(n.target)
        if name in _CAST_METHODS:
            return "aten.to.default", args[:1], {}
        if name in _VARARG_METHODS and len(args) > 1 and not isinstance(args[1], (list, tuple)):
            args = (args[0], tuple(args[1:]))  # x.view(a, b) -> view(x, [a, b]) as in ATen
        bound = _bind_aten(name, args, kwargs)
        return bound if bound is not None else (f"aten.{name}.default", args, kwargs)
    target = n.target
    if target in _OPERATOR_ATEN:
        return _OPERATOR_ATEN[target], args, kwargs
    if target is operator.getitem:
        return "getitem", args, kwargs
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return canonical_target(target), args, kwargs
    name = getattr(target, "__name__", "")
    mod = getattr(target, "__module__", "") or ""
    if name and (mod.startswith("torch") or hasattr(torch.ops.aten, name)) and hasattr(torch.ops.aten, name):
        if inspect.isfunction(target):
            laid = _python_positional(target, args, kwargs)
            if laid is not None:
                return f"aten.{name}.default", laid[0], laid[1]
        bound = _bind_aten(name, args, kwargs)
        return bound if bound is not None else (f"aten.{name}.default", args, kwargs)
    return canonical_target(target), args, kwargs


def _fx_nodes(gm: torch.fx.GraphModule, module: torch.nn.Module) -> Iterator[Node]:
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    for n in gm.graph.nodes:
        meta = n.meta.get("fact_ray_meta")
        if n.op == "placeholder":
            yield Node(name=n.name, op="placeholder", target="input", meta=meta, kind="input")
        elif n.op == "get_attr":
            fqn = str(n.target)
            kind = "parameter" if fqn in params else "buffer" if fqn in buffers else "constant"
            attr = params.get(fqn, buffers.get(fqn))
            if attr is None:
                attr = _get_attr(gm, fqn)
            extra: list[tuple[str, Any]] = [("fqn", fqn)]
            if kind != "parameter" and isinstance(attr, torch.Tensor):
                tag = content_tag(attr)
                if tag:
                    extra.append(("content", tag))
            yield Node(name=n.name, op="get_attr", target=kind, kwargs=tuple(extra),
                       meta=meta or tensor_meta(attr), kind=kind)
        elif n.op == "output":
            yield Node(name=n.name, op="output", target="output", args=convert_arg(_fold(n.args)))
        else:
            target, args, kwargs = _fx_call(n)
            yield Node(name=n.name, op="call_function", target=target, args=convert_arg(args),
                       kwargs=_kwargs(kwargs), meta=meta)


def _get_attr(root: torch.nn.Module, fqn: str) -> Any:
    obj: Any = root
    for part in fqn.split("."):
        obj = getattr(obj, part, None)
    return obj
