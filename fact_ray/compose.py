"""Composition: a captured graph plus the winners of its patterns -> one module that calls the winning kernels.

The module is the captured graph made runnable again (`ExportedProgram.module()` for an export capture, the FX
trace for an FX capture), with each matched subgraph that has a winner replaced by a call to its kernel: the
native dispatcher's `torch.ops.fact_ray_native.gemm(a, b, bias, residual, kernel)` (attention, norm alike; no
Python on the hot path, realize/dispatch.py) or, only where that extension cannot be built (said once) or
FACT_RAY_DISPATCH=python asks, the Python custom op `torch.ops.fact_ray.<name>(a, b, bias, residual)`. Matches
without a winner keep their PyTorch ops. The result is
a `torch.fx.GraphModule` holding the original's very parameters and buffers (same objects, same state-dict
names) and taking the original's arguments; `module.fact_ray` is the `Composition` describing what was replaced,
which `fact_ray.artifact.save` writes down.

Matches name graph nodes of the *lifted* export graph (parameters as placeholders `p_fc1_weight`); the runnable
module reads parameters with `get_attr` nodes instead, so operands are mapped through their state-dict names.

`check` is the end-to-end proof a composed module needs before it is saved or reported: float64 original vs
composed, fresh random inputs, several seeds, the policy's tolerance (measuring.md). It needs a GPU: the
kernels are CUDA code.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from fact_ray import entry
from fact_ray.errors import CannotImplement, ComposeError, NotAvailable, UserError
from fact_ray.fastcall import use_python_bindings
from fact_ray.realize import dispatch
from fact_ray.realize import family as families
from fact_ray.realize.verify import precision_mode
from fact_ray.types import (
    AnyConfig,
    Arch,
    file_sha256,
    Library,
    Match,
    Precision,
    Source,
    TensorMeta,
    content_hash,
    to_jsonable,
)

# What compose returns: the rewritten, runnable graph module, with `.fact_ray` (a Composition) attached.
ComposedModule = torch.fx.GraphModule

COMPOSITION_ATTR = "fact_ray"
CHECK_ATTR = "fact_ray_check"


@dataclass(frozen=True)
class KernelChoice:
    """The realization chosen for one match key: a config inside a compiled library."""

    config: AnyConfig
    library_path: str
    symbol: str
    speedup: float = float("nan")  # over the PyTorch op, as measured when it was selected (for reports)


@dataclass(frozen=True)
class Replacement:
    """One subgraph replaced by one custom op call."""

    match_key: str
    rule: str
    family: str
    anchor: str
    nodes: tuple[str, ...]
    op: str  # qualified op name: fact_ray_native.gemm|attention|norm, or fact_ray.<name> (Python custom op)
    config: AnyConfig
    problem: Any  # the family's problem: GemmProblem, AttentionProblem, NormProblem, ...
    symbol: str
    library_path: str
    library_sha256: str
    speedup: float = float("nan")
    kernel: str = ""  # the native dispatcher's kernel id ("" on the Python custom-op path)


@dataclass(frozen=True)
class Composition:
    model_name: str
    model_hash: str
    graph_hash: str  # content hash of the captured Graph (structure, shapes, dtypes): what the rewrite relied on
    capture: str  # "export" | "fx"
    policy: Precision
    arch: Arch | None  # of the kernels used; None when nothing was replaced
    replacements: tuple[Replacement, ...]
    kept: tuple[str, ...]  # match keys that keep their PyTorch ops (no winner)
    inputs: tuple[TensorMeta | None, ...] = field(default=())  # the user inputs as captured (check draws these)
    # (match key, one line) for winners whose kernel cannot take the operands as the graph holds them (a strided
    # view, fact_ray.layouts): they keep their PyTorch ops, and their keys are in `kept` too.
    fallbacks: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True)
class CheckReport:
    """Outcome of the end-to-end float64 check of a composed module."""

    passed: bool
    policy: Precision
    tolerance: float
    seeds: tuple[int, ...]
    rel_errs: tuple[float, ...]  # worst relative Frobenius error over the outputs, per seed
    max_abs_errs: tuple[float, ...]
    device: str = ""
    reason: str = ""  # why it failed, one line

    @property
    def worst_rel_err(self) -> float:
        return max(self.rel_errs, default=float("nan"))


# --------------------------------------------------------------------------------------------- helpers


_DEVICE_ARG = re.compile(r"device=[a-z]+(:[0-9]+)?")


def graph_hash(graph: Any) -> str:
    """A content hash of a fact_ray Graph without its model name and hash: two captures of the same model code
    at the same shapes give the same value, in any process and on any device (a model captured on the CPU when it
    was composed is often loaded onto a GPU, and `torch.arange(..., device=x.device)` records where it ran)."""
    nodes = json.dumps(to_jsonable(graph.nodes), sort_keys=True, default=str)
    return content_hash("graph", graph.capture, _DEVICE_ARG.sub("device", nodes))


sha256_file = file_sha256  # the artifact and its tests name it so


def parse_families(text: str | None) -> frozenset[str]:
    """`--families`: which pattern families a composition may replace, from a comma list of family names or "gemm"
    (every GEMM family: plain, bias, bias+activation, bias+residual, batched, SwiGLU). Empty: all of them."""
    from fact_ray.discover.rules import GEMM_FAMILIES

    if not text or not text.strip():
        return frozenset()
    known = {*GEMM_FAMILIES, *families.served()}
    chosen: set[str] = set()
    for name in (t.strip() for t in text.split(",") if t.strip()):
        if name == "gemm":
            chosen.update(GEMM_FAMILIES)
        elif name in known:
            chosen.add(name)
        else:
            raise UserError(f"--families: unknown family {name!r} (known: gemm, {', '.join(sorted(known))})")
    return frozenset(chosen)


def _choice(value: Any) -> KernelChoice:
    if isinstance(value, KernelChoice):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (3, 4):
        return KernelChoice(*value)
    raise TypeError(f"a winner is a KernelChoice or (config, library_path, symbol), got {type(value).__name__}")


def library_for(choice: KernelChoice, digest: str | None = None) -> Library:
    """A Library record for one stored .so holding one config under `symbol`. Its key is the file's sha256, so the
    custom op's name (derived from it) is the same wherever the same bytes are loaded."""
    digest = digest or sha256_file(choice.library_path)
    source = Source(name=f"lib_{digest[:16]}", arch=choice.config.arch, code="", configs=(choice.config,),
                    symbols=(choice.symbol,))
    return Library(source=source, key=digest, ok=True, path=choice.library_path)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A node-for-node copy keeping names (a fresh graph has no collisions) and the codegen (pytree in/out)."""
    new = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def runnable_module(captured: Any) -> torch.fx.GraphModule:
    """A fresh runnable copy of the captured graph sharing the original's parameters and buffers."""
    if captured.exported is not None:
        gm = captured.exported.module()  # lifted state back to attributes; same tensors as the model's
        _drop_export_checks(gm)
        return entry.direct_entry(_follow_input_device(gm), captured.inputs)
    gm = captured.graph_module
    gm = torch.fx.GraphModule(gm, _copy_graph(gm.graph), class_name=type(gm).__name__)
    return _follow_input_device(gm)


def _drop_export_checks(gm: torch.fx.GraphModule) -> None:
    """torch.export's own per-call checks: its input check (a pytree walk and symbolic constraints on every call,
    which on a 2,048-token Llama-style block cost more host time than the graph's fifty ops: profiled on the CPU,
    2 ms of 3.7 ms per call; fact_ray/entry.py's `check_call` checks count, shape and dtype instead) and its
    `_assert_tensor_metadata` nodes."""
    gm.validate_inputs = False
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn" and not n.users]:
        gm.graph.erase_node(node)
    # export's `_assert_tensor_metadata` nodes check, on every call, the dtype of what a `.to(dtype)` received: a
    # tensor the graph itself computed, or a buffer, as captured. Eager code runs no such check, the input check
    # checks what comes from outside, and our kernels check their own operands: they only cost host time.
    for sub in _graph_modules(gm):
        for node in [n for n in sub.graph.nodes if n.op == "call_function" and not n.users
                     and n.target is torch.ops.aten._assert_tensor_metadata.default]:
            sub.graph.erase_node(node)  # recompiled by _follow_input_device, which always comes next


def _graph_modules(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """`gm` and the graphs nested in it: export puts the body of a `with torch.autocast(...)` or a grad-mode block
    in a submodule that a higher-order op calls (HF Llama's rotary embedding is one), and its ops carry the same
    literals and checks as the top graph's."""
    return [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]


def _follow_input_device(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make the graph run on whatever device its inputs are on. Tracing writes the device it ran on into the graph
    as a literal (`torch.arange(T, device=x.device)` becomes `arange(..., device=cpu)`, and export's
    `_assert_tensor_metadata` for `.to(dtype)` checks device=cpu), but a module is usually captured on the CPU and
    then composed, moved and served on a GPU: there the literals create CPU tensors or fail the check ("Tensor
    device mismatch! Expected: cpu, Got: cuda:0"). Literal devices now read the first input's device at run time
    (in a nested graph, its own first input's: what the higher-order op passes it comes from the same module); the
    checks keep their dtype and layout and drop the device. A model that puts a tensor on another device than its
    input on purpose is not supported by this rewrite (none of the suite's models does)."""
    for sub in _graph_modules(gm):
        _follow_device_in(sub.graph)
        sub.recompile()
    return gm


def _follow_device_in(graph: torch.fx.Graph) -> None:
    from fact_ray.capture import canonical_target
    from fact_ray.discover.view import is_assertion

    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    tensors = [n for n in inputs if isinstance(n.meta.get("val", n.meta.get("example_value")), torch.Tensor)]
    # a nested graph's placeholders carry no example values: the operands a higher-order op passes are tensors
    first = (tensors or inputs or [None])[0]
    device_node = None
    for node in list(graph.nodes):
        # a device literal is a keyword (arange(..., device=cpu)) or positional (HF Llama's
        # `inv_freq.to(x.device, torch.float32)` exports as aten.to.device(inv_freq, cpu, float32))
        if node.op != "call_function" or not any(isinstance(v, torch.device)
                                                 for v in (*node.args, *node.kwargs.values())):
            continue
        if is_assertion(canonical_target(node.target)):
            node.args = tuple(None if isinstance(v, torch.device) else v for v in node.args)
            node.kwargs = {k: v for k, v in node.kwargs.items() if not isinstance(v, torch.device)}
            continue
        if first is None:
            continue  # no input to follow: the literal is all there is
        if device_node is None:
            with graph.inserting_after(inputs[-1]):  # after every placeholder: they open the graph
                device_node = graph.call_function(getattr, (first, "device"))
        node.args = tuple(device_node if isinstance(v, torch.device) else v for v in node.args)
        node.kwargs = {k: (device_node if isinstance(v, torch.device) else v) for k, v in node.kwargs.items()}


def _node_index(captured: Any, gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Graph-node name (as discovery saw it) -> node of the runnable module."""
    index = {n.name: n for n in gm.graph.nodes}
    if captured.exported is not None:
        by_target = {str(n.target): n for n in gm.graph.nodes if n.op == "get_attr"}
        for spec in captured.exported.graph_signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if spec.kind.name != "USER_INPUT" and name and spec.target in by_target:
                index[name] = by_target[spec.target]
    return index


def _meta_of(node: torch.fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), val.dtype
    if node.op == "get_attr":  # unlifted parameters carry no "val": read the attribute itself
        obj: Any = node.graph.owning_module
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Tensor):
            return tuple(obj.shape), obj.dtype
    tm = node.meta.get("fact_ray_meta")
    if tm is not None:
        return tm.shape, getattr(torch, tm.dtype)
    return None


def _ancestors_within(nodes: Sequence[torch.fx.Node], inside: set[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    todo = [n for n in nodes if n in inside]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(x for x in n.all_input_nodes if x in inside)
    return seen


# --------------------------------------------------------------------------------------------- compose


def _rewrite(gm: torch.fx.GraphModule, index: dict[str, torch.fx.Node], match: Match, fam: Any, problem: Any,
             binding: dispatch.Binding) -> None:
    """Call the bound op on the match's operands (in the family's order; None where it takes none; then the
    binding's own arguments) in place of the subgraph: cast in and out where the policy's dtype is not the graph's,
    reshape where the kernel's output shape is not the graph's."""
    graph = gm.graph
    operands = dict(match.param("operands", ()) or ())
    roles = list(fam.operands(problem))  # every slot, absent ones as None: the binding's arguments follow them
    absent = [r for r in roles if r is not None and not operands.get(r)]
    if absent:
        raise ComposeError(f"{match.rule} at {match.anchor}: the match names no {' or '.join(absent)} operand")
    wanted = [*match.nodes, match.anchor, *(operands[r] for r in roles if r is not None)]
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ComposeError(f"{match.rule} at {match.anchor}: node {missing[0]} is not in the graph (overlapping "
                           "matches, or a match from another capture)")
    anchor = index[match.anchor]
    present = [index[operands[r]] for r in roles if r is not None]
    anchor_meta = _meta_of(anchor)
    first_meta = _meta_of(present[0]) if present else None
    if anchor_meta is None or first_meta is None:
        raise ComposeError(f"{match.rule} at {match.anchor}: the graph has no shape for the output or operand "
                           f"{roles[0]}")
    kernel_dtype = getattr(torch, problem.dtype)
    with graph.inserting_before(anchor):
        cast = anchor_meta[1] != kernel_dtype  # a bf16/fp16 policy on a wider model: cast in, cast back out
        args = [None if r is None else index[operands[r]] for r in roles]
        out_shape = fam.output_shape(problem, first_meta[0])
        if "residual" in roles and out_shape is not None:
            # An operand the kernel adds to its output takes the output's shape: a residual added after the
            # GEMM's rows were viewed ([B, T, N], GPT-2's Conv1D) is viewed back.
            i = roles.index("residual")
            res = _meta_of(args[i])
            if res is not None and tuple(res[0]) != tuple(out_shape) and math.prod(res[0]) == math.prod(out_shape):
                args[i] = graph.call_function(torch.ops.aten.reshape.default, (args[i], list(out_shape)))
        if cast:
            args = [x if x is None else
                    graph.call_function(torch.ops.aten._to_copy.default, (x,), {"dtype": kernel_dtype})
                    for x in args]
        out = graph.call_function(binding.op, (*args, *binding.extra))
        if out_shape is not None and tuple(out_shape) != anchor_meta[0]:
            if math.prod(out_shape) != math.prod(anchor_meta[0]):
                raise ComposeError(f"{match.rule} at {match.anchor}: the kernel gives {tuple(out_shape)}, the graph "
                                   f"expects {anchor_meta[0]}")
            out = graph.call_function(torch.ops.aten.reshape.default, (out, list(anchor_meta[0])))
        if cast:
            out = graph.call_function(torch.ops.aten._to_copy.default, (out,), {"dtype": anchor_meta[1]})
    _replace_subgraph(graph, index, match, anchor, out, present)


def _replace_subgraph(graph: torch.fx.Graph, index: dict[str, torch.fx.Node], match: Match, anchor: torch.fx.Node,
                      out: torch.fx.Node, operand_nodes: Sequence[torch.fx.Node]) -> None:
    """Route the anchor's users to `out`, then erase the subgraph's nodes the kernel made dead."""
    if "val" in anchor.meta:
        out.meta["val"] = anchor.meta["val"]
    anchor.replace_all_uses_with(out)
    members = [index[n] for n in match.nodes]
    if anchor not in members:
        members.append(anchor)
    # Nodes of the subgraph that feed the kernel (a view of A, a transpose of the weight) stay; the rest must be
    # dead now, or the kernel would not be computing everything the subgraph did.
    keep = _ancestors_within(list(operand_nodes), set(members))
    for node in reversed(members):
        if node in keep:
            continue
        for check in [u for u in node.users if _is_assertion(u)]:  # export's runtime check of a value that is gone
            graph.erase_node(check)
        if node.users:
            users = ", ".join(u.name for u in node.users)
            raise ComposeError(f"{match.rule} at {match.anchor}: intermediate {node.name} is also used by {users}; "
                               "the kernel does not produce it")
        graph.erase_node(node)
    # A later match may read this one's output as an operand (ln_2 reads the attention block's residual add, the
    # MLP projection reads the FC's GELU): by name, which from now on means the kernel's output.
    index[match.anchor] = out


def _is_assertion(node: torch.fx.Node) -> bool:
    """torch.export's `_assert_tensor_metadata` and kin: they read a tensor but compute nothing (discovery does
    not count them as users either, discover/view.py)."""
    from fact_ray.capture import canonical_target
    from fact_ray.discover.view import is_assertion

    return node.op == "call_function" and not node.users and is_assertion(canonical_target(node.target))


def compose(captured: Any, matches: Sequence[Match], winners: Mapping[str, Any], policy: Precision | str, *,
            arch: Arch | str | None = None, digests: Mapping[str, str] | None = None) -> ComposedModule:
    """Rewrite the captured graph so every match with a winner calls its kernel.

    `winners` maps a match key to a `KernelChoice` (or a `(config, library_path, symbol)` tuple); matches whose
    key has none keep their PyTorch ops. `digests` optionally gives the known sha256 of library paths (saves
    rehashing). Raises ComposeError (one line) for anything it cannot rewrite; nothing is skipped silently.
    """
    policy = Precision(policy)
    wanted_arch = Arch(arch) if arch is not None else None
    digests = dict(digests or {})
    gm = runnable_module(captured)
    index = _node_index(captured, gm)

    chosen = [m for m in matches if m.key in winners]
    covered: dict[str, str] = {}
    for m in chosen:
        for n in (*m.nodes, m.anchor):
            if covered.get(n, m.anchor) != m.anchor:
                raise ComposeError(f"matches at {covered[n]} and {m.anchor} both cover node {n}: compose one of them")
            covered[n] = m.anchor

    # Decided once per composition: the native dispatcher unless it cannot be built here (said once) or
    # FACT_RAY_DISPATCH=python; nothing is built when nothing is replaced.
    native = bool(chosen) and dispatch.available()
    replacements: list[Replacement] = []
    fallbacks: list[tuple[str, str]] = []
    for m in chosen:
        choice = _choice(winners[m.key])
        cfg = choice.config
        if wanted_arch is None:
            wanted_arch = cfg.arch
        elif cfg.arch != wanted_arch:
            raise ComposeError(f"kernel {cfg.name} is for {cfg.arch.value}, the composition for {wanted_arch.value}")
        if not Precision(cfg.precision).serves(policy):
            raise ComposeError(f"kernel {cfg.name} was tuned under {cfg.precision.value}, the composition runs "
                               f"under {policy.value}")
        misfit = _operand_misfit(captured, index, m)
        if misfit:  # this replacement keeps its PyTorch op; the others go on (layouts.py)
            fallbacks.append((m.key, f"{m.rule} at {m.anchor} keeps its PyTorch op: {misfit}"))
            continue
        fam = families.for_match(m)
        if fam is None:
            raise ComposeError(f"{m.rule} at {m.anchor}: no kernel family realizes {m.family}")
        try:
            problem = fam.problem(m, policy)
        except CannotImplement as e:
            raise ComposeError(f"{m.rule} at {m.anchor}: {e}") from None
        why = fam.accepts(cfg, problem)
        if why:
            raise ComposeError(f"{m.rule} at {m.anchor}: {why}")
        digest = digests.get(choice.library_path) or sha256_file(choice.library_path)
        digests[choice.library_path] = digest
        library = library_for(choice, digest)
        binding = fam.bind(problem, cfg, library, choice.symbol, native, digest)
        _rewrite(gm, index, m, fam, problem, binding)
        replacements.append(Replacement(
            match_key=m.key, rule=m.rule, family=m.family, anchor=m.anchor, nodes=tuple(m.nodes), op=binding.name,
            config=cfg, problem=problem, symbol=choice.symbol, library_path=choice.library_path,
            library_sha256=digest, speedup=float(choice.speedup), kernel=binding.kernel))

    gm.graph.eliminate_dead_code()  # what only fed a replaced subgraph (a causal mask's slice and compare)
    use_python_bindings(gm)  # eager's own host cost per op (fact_ray/fastcall.py)
    gm.graph.lint()
    entry.recompile(gm)  # keeps the direct entry that recompile() takes away
    fell_back = {k for k, _ in fallbacks}
    kept = tuple(dict.fromkeys(m.key for m in matches if m.key not in winners or m.key in fell_back))
    user_inputs = tuple(n.meta for n in captured.graph.nodes if n.op == "placeholder" and n.kind == "input")
    setattr(gm, COMPOSITION_ATTR, Composition(
        model_name=captured.graph.model_name, model_hash=captured.graph.model_hash,
        graph_hash=graph_hash(captured.graph), capture=captured.method, policy=policy,
        arch=wanted_arch, replacements=tuple(replacements), kept=kept, inputs=user_inputs,
        fallbacks=tuple(fallbacks)))
    if replacements:  # our kernels have no backward: a call with autograd on fails at once (fact_ray/inference.py)
        if hasattr(gm, entry.SPEC_ATTR):
            entry.inference_only(gm)
        else:
            from fact_ray.inference import guard

            guard(gm)
    return gm


def _operand_misfit(captured: Any, index: dict[str, torch.fx.Node], m: Match) -> str:
    """Why m's kernel cannot take its operands as the captured graph holds them ("" when it can)."""
    from fact_ray.layouts import misfit

    operands = dict(m.param("operands", ()) or ())
    metas = {n.name: n.meta for n in captured.graph.nodes}
    offsets = {}
    for name in operands.values():
        val = index[name].meta.get("val") if name in index else None
        if isinstance(val, torch.Tensor):
            offsets[name] = int(val.storage_offset())
    return misfit(m.family, operands, metas, offsets)


def composition_of(module: Any) -> Composition:
    comp = getattr(module, COMPOSITION_ATTR, None)
    if not isinstance(comp, Composition):
        raise ComposeError("not a composed module (made by fact_ray.compose.compose or fact_ray.load)")
    return comp


# --------------------------------------------------------------------------------------------- check


def _draw(metas: Sequence[TensorMeta | None], examples: Sequence[Any] | None, seed: int,
          device: torch.device) -> list[Any]:
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i, meta in enumerate(metas):
        if meta is not None and meta.dtype in ("float32", "float16", "bfloat16", "float64"):
            out.append(torch.randn(meta.shape, generator=gen, device=device, dtype=getattr(torch, meta.dtype)))
        elif examples is not None and i < len(examples):
            x = examples[i]
            out.append(x.to(device) if isinstance(x, torch.Tensor) else x)
        else:
            raise ComposeError(f"input {i} is not a floating-point tensor: pass example_inputs= to check with it")
    return out


def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def check(original: torch.nn.Module, composed: ComposedModule, policy: Precision | str,
          seeds: Sequence[int] = (0, 1, 2), *, device: str | torch.device | None = None,
          example_inputs: Sequence[Any] | None = None, rebuild: Any = None) -> CheckReport:
    """Composed vs the original in float64 on fresh random inputs, per seed, within the policy's tolerance.

    The float64 original is a fresh instance from `rebuild` (`LoadedModel.rebuild`) loaded with `original`'s
    state, or a deep copy where no closure escapes it (fact_ray.reference).

    The report is attached to `composed` (save refuses a module without a passing one) and returned.
    """
    policy = Precision(policy)
    if not torch.cuda.is_available():
        raise NotAvailable("no CUDA GPU: the composed module's kernels cannot run here, so it cannot be checked")
    comp = composition_of(composed)
    dev = torch.device(device or "cuda")
    from fact_ray.reference import float64_reference

    reference = float64_reference(original, rebuild=rebuild, device=dev)
    composed.to(dev)
    rel_errs, max_abs = [], []
    reason = ""
    with torch.no_grad(), precision_mode(policy):
        for seed in seeds:
            inputs = _draw(comp.inputs, example_inputs, seed, dev)
            ref = reference(*[x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                              for x in inputs])
            out = composed(*inputs)
            refs, outs = _leaves(ref), _leaves(out)
            if len(refs) != len(outs):
                raise ComposeError(f"composed module returns {len(outs)} tensors, the original {len(refs)}")
            worst_rel, worst_abs = 0.0, 0.0
            for r, o in zip(refs, outs):
                if tuple(r.shape) != tuple(o.shape):
                    raise ComposeError(f"composed output shape {tuple(o.shape)} != original {tuple(r.shape)}")
                diff = o.double() - r
                norm = float(torch.linalg.vector_norm(r))
                rel = float(torch.linalg.vector_norm(diff)) / (norm if norm > 0 else 1.0)
                mx = float(diff.abs().max()) if diff.numel() else 0.0
                if not bool(torch.isfinite(o).all()):  # NaN or inf never passes
                    rel = mx = float("nan")
                worst_rel = rel if math.isnan(rel) else max(worst_rel, rel)
                worst_abs = mx if math.isnan(mx) else max(worst_abs, mx)
                if math.isnan(worst_rel):
                    break
            rel_errs.append(worst_rel)
            max_abs.append(worst_abs)
            if not reason and (math.isnan(worst_rel) or worst_rel > policy.tolerance):
                reason = (f"seed {seed}: relative error {worst_rel:.3g} exceeds the {policy.value} tolerance "
                          f"{policy.tolerance:g}")
    report = CheckReport(passed=not reason, policy=policy, tolerance=policy.tolerance, seeds=tuple(seeds),
                         rel_errs=tuple(rel_errs), max_abs_errs=tuple(max_abs), device=str(dev), reason=reason)
    setattr(composed, CHECK_ATTR, report)
    return report
