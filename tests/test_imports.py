"""The house's layering, checked: no import circle in fact_ray (none among imports run at import time; in discover/
and realize/ none even through imports inside functions), no module importing a higher layer (imports inside
functions counted), and every module importable first, on its own.

Layers, low to high: types/errors/config (and events) < capture < discover < realize < compose/artifact/deploy <
actors/tracking/progress/nightly < farm < bench/doctor/fleet < cli (and the package's own `fact_ray.load`);
`search_spaces` and `pattern_table` import nothing of ours above types and errors. A module may import its own
layer and lower ones.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> folder (pyproject's package-dir mapping)
PACKAGES = {"fact_ray": "fact_ray", "fact_ray.actors": "actors", "fact_ray.search_spaces": "search_spaces",
            "fact_ray.pattern_table": "pattern_table"}
LAYERS = [
    ("fact_ray.types", "fact_ray.errors", "fact_ray.config", "fact_ray.events", "fact_ray.redact", "fact_ray.fsutil",
     "fact_ray.toolchain"),
    ("fact_ray.search_spaces", "fact_ray.pattern_table"),
    ("fact_ray.capture", "fact_ray.capture_cache", "fact_ray.buckets"),
    ("fact_ray.discover",),
    ("fact_ray.realize",),
    ("fact_ray.compose", "fact_ray.artifact", "fact_ray.inference", "fact_ray.guarantee", "fact_ray.deploy",
     "fact_ray.shapes", "fact_ray.layouts", "fact_ray.reference", "fact_ray.artifact_trust", "fact_ray.fastcall",
     "fact_ray.entry"),
    ("fact_ray.actors", "fact_ray.tracking", "fact_ray.progress", "fact_ray.nightly", "fact_ray.night_tracking",
     "fact_ray.report_html", "fact_ray.shared_cache"),
    ("fact_ray.farm",),
    ("fact_ray.bench", "fact_ray.doctor", "fact_ray.fleet"),
    ("fact_ray.cli", "fact_ray"),  # the package itself: `fact_ray.load`, a facade like the CLI
]
# all that search_spaces and pattern_table may import of ours: the nouns, the errors, and leaf modules beside them
# (the table key's toolchain part, redaction, file helpers), which import nothing but types and errors
BOTTOM = {"fact_ray.types", "fact_ray.errors", "fact_ray.redact", "fact_ray.fsutil", "fact_ray.toolchain"}


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted((REPO / folder).rglob("*.py")):
            parts = list(f.relative_to(REPO / folder).with_suffix("").parts)
            if pkg == "fact_ray" and parts[0] in ("actors", "search_spaces", "pattern_table"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([pkg, *parts])] = f
    return found


MODULES = modules()


def _resolve(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(path: Path, top_only: bool = False) -> set[str]:
    """Every fact_ray module `path` imports, wherever the import statement is (functions included; with
    `top_only` only those run at import time), except under `if TYPE_CHECKING:`."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and getattr(ch.test, "id", None) == "TYPE_CHECKING":
                continue
            if top_only and isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(ch, ast.Import):
                out.update(_resolve(a.name) for a in ch.names if a.name.startswith("fact_ray"))
            elif isinstance(ch, ast.ImportFrom) and (ch.module or "").startswith("fact_ray"):
                # `from fact_ray import __file__` reads the package's path; it is no import of its code
                out.update(_resolve(f"{ch.module}.{a.name}") for a in ch.names if not a.name.startswith("__"))
            visit(ch)

    visit(ast.parse(path.read_text()))
    return out


GRAPH = {m: imports_of(p) - {m} for m, p in MODULES.items()}
AT_IMPORT = {m: imports_of(p, top_only=True) - {m} for m, p in MODULES.items()}
# discover/ and realize/ (and between them): not even a function-level import may close a circle
STAGES = {m: {t for t in ts if t.startswith(("fact_ray.discover", "fact_ray.realize"))}
          for m, ts in GRAPH.items() if m.startswith(("fact_ray.discover", "fact_ray.realize"))}


def layer(module: str) -> int:
    best = (-1, -1)  # (length of the matching prefix, layer)
    for i, names in enumerate(LAYERS):
        for n in names:
            inside = module == n or (n != "fact_ray" and module.startswith(n + "."))
            if inside and len(n) > best[0]:
                best = (len(n), i)
    if best[1] < 0:
        raise AssertionError(f"{module} has no layer: add it to LAYERS")
    return best[1]


def test_the_scan_sees_the_tree():
    assert {"fact_ray.realize.family", "fact_ray.realize.pipeline", "fact_ray.discover.match",
            "fact_ray.actors.executor", "fact_ray.pattern_table.row"} <= set(MODULES)
    assert "fact_ray.realize.family" in GRAPH["fact_ray.realize.pipeline"]
    assert "fact_ray.realize.attention_family" in GRAPH["fact_ray.realize.family"]  # an import inside a function


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    """No circle among the imports that run at import time, anywhere; none at all (imports inside functions
    counted) in discover/ and realize/."""
    assert circles(AT_IMPORT) == []
    assert circles(STAGES) == []
    assert circles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the check can fail


def test_no_module_imports_a_higher_layer():
    wrong = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
             for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if layer(t) > layer(m)]
    assert wrong == []
    for pkg in ("fact_ray.search_spaces", "fact_ray.pattern_table"):
        above = [f"{m} imports {t}" for m, targets in sorted(GRAPH.items()) if m.startswith(pkg)
                 for t in sorted(targets) if not t.startswith(pkg) and t not in BOTTOM]
        assert above == []


@pytest.mark.parametrize("pkg", ["fact_ray.discover", "fact_ray.realize", "fact_ray.actors",
                                 "fact_ray.search_spaces", "fact_ray.pattern_table", "fact_ray"])
def test_every_module_imports_first_on_its_own(pkg):
    """In one interpreter (torch and Ray imported once, they are not ours), every module of `pkg` is imported
    with no fact_ray module loaded before it: an import circle would fail here, whatever the order."""
    names = [m for m in MODULES if m == pkg or (m.startswith(pkg + ".") and (pkg != "fact_ray" or m.count(".") == 1))]
    code = (
        "import importlib, sys, torch, ray\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'fact_ray' or m.startswith('fact_ray.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
