"""The package's shape, checked on its source (ARCHITECTURE: data flows one way, every
boundary a module boundary): no import cycles, the layers import only downwards, no private
names cross modules, no `except ImportError` fallbacks for our own modules, and every import
deferred into a function says why.

The graph covers every import statement anywhere in a module (inside functions and
``TYPE_CHECKING`` blocks too): a cycle hidden by a late import is still a cycle."""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = {"tests", ".venv", "docs", ".git", "build", "benchmarks"}

# Which layer may import which (a module of a layer may always import its own layer).
LAYERS = {
    "common": set(),
    "models": {"common"},
    "privacy": {"common", "models"},
    "client": {"common", "models", "privacy"},
    "server": {"common", "models", "privacy"},
    "simulation": {"common", "models", "privacy", "client", "server"},
}
# Files another engineer owns whose in-function imports are left for a later pass.
DEFERRED_SWEEP = ("client/importers/", "models/features.py", "models/coach.py", "models/evaluation.py", "client/store.py")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module (or package) imported
    names: tuple[str, ...]
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(("restwise",) + parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


@lru_cache(maxsize=None)
def source_files(*, benchmarks: bool = False) -> tuple[Path, ...]:
    skip = SKIP - ({"benchmarks"} if benchmarks else set())
    out = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith((".", "__"))]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return tuple(sorted(out))


@lru_cache(maxsize=None)
def parsed(path: Path) -> tuple[str, ast.Module]:
    """Each file read and parsed once for all the tests of this module."""
    text = path.read_text(encoding="utf-8")
    return text, ast.parse(text)


@lru_cache(maxsize=None)
def imports_of(path: Path) -> tuple[Import, ...]:
    tree = parsed(path)[1]
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(sub) for sub in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(me, alias.name, (), node.lineno, id(node) in in_function))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append(Import(me, target, tuple(a.name for a in node.names), node.lineno, id(node) in in_function))
    return tuple(out)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in source_files()}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for me, path in files.items():
        for imp in imports_of(path):
            if not imp.target.startswith("restwise"):
                continue
            targets = {imp.target} | {f"{imp.target}.{n}" for n in imp.names}
            edges[me] |= {t for t in targets if t in files and t != me}
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "root"


def test_the_graph_is_read():
    files = {module_name(p) for p in source_files()}
    assert {"restwise.privacy.release", "restwise.models.registry", "restwise.simulation.runner",
            "restwise.common.errors", "restwise.server.app"} <= files


def test_no_import_cycles(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_each_layer_imports_only_the_layers_below(graph):
    wrong = [
        f"{a} -> {b}" for a, bs in graph.items() for b in sorted(bs)
        if layer(a) in LAYERS and layer(b) in LAYERS and layer(b) != layer(a) and layer(b) not in LAYERS[layer(a)]
    ]
    assert wrong == []
    # In particular: server and client never import each other.
    assert not [a for a, bs in graph.items() if layer(a) == "server" and any(layer(b) == "client" for b in bs)]
    assert not [a for a, bs in graph.items() if layer(a) == "client" and any(layer(b) == "server" for b in bs)]


def test_no_private_name_is_imported_across_modules():
    private = []
    for path in source_files(benchmarks=True):
        for imp in imports_of(path):
            if imp.target.startswith("restwise") and imp.target != imp.module:
                private += [f"{imp.module}:{imp.line} <- {imp.target}.{n}" for n in imp.names
                            if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_no_import_error_fallback_for_our_own_modules():
    """A missing Restwise component is a crash at import, never a quieter path."""
    found = []
    for path in source_files(benchmarks=True):
        for node in ast.walk(parsed(path)[1]):
            if not isinstance(node, ast.Try):
                continue
            caught = set()
            for handler in node.handlers:
                types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                caught |= {t.id for t in types if isinstance(t, ast.Name)}
            if not caught & {"ImportError", "ModuleNotFoundError"}:
                continue
            for sub in node.body:
                for inner in ast.walk(sub):
                    names = []
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("restwise"):
                        names.append(inner.module)
                    if isinstance(inner, ast.Import):
                        names += [a.name for a in inner.names if a.name.startswith("restwise")]
                    if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "__import__":
                        names.append("__import__(...)")
                    found += [f"{path.relative_to(REPO)}:{node.lineno} ({n})" for n in names]
    assert found == []


def _says_why(lines: list[str], lineno: int) -> bool:
    """An import deferred into a function carries a comment: on its line, or on the line
    above its block of consecutive imports."""
    i = lineno - 1
    if "#" in lines[i]:
        return True
    while i > 0 and re.match(r"^\s*(from \S+ import |import )", lines[i - 1]):
        i -= 1
    return i > 0 and lines[i - 1].strip().startswith("#")


def test_every_deferred_import_says_why():
    unexplained = []
    for path in source_files(benchmarks=True):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(DEFERRED_SWEEP):
            continue
        lines = parsed(path)[0].split("\n")
        unexplained += [f"{rel}:{imp.line}" for imp in imports_of(path)
                        if imp.in_function and not _says_why(lines, imp.line)]
    assert unexplained == []


def test_every_package_is_installed_and_the_flower_components_load():
    import importlib
    import tomllib

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = project["tool"]["setuptools"]
    folders = {module_name(p.parent if p.parent != REPO else p) for p in source_files() if p.name == "__init__.py"}
    folders = {f[: -len(".__init__")] if f.endswith(".__init__") else f for f in folders}
    assert folders == set(setuptools["packages"])
    assert set(setuptools["package-dir"]) == folders
    components = project["tool"]["flwr"]["app"]["components"]
    module, _, attr = components["serverapp"].partition(":")
    assert isinstance(getattr(importlib.import_module(module), attr), ServerApp)
    assert module.startswith("restwise.simulation")  # `flwr run .` is a local simulation
    module, _, attr = components["clientapp"].partition(":")
    assert isinstance(getattr(importlib.import_module(module), attr), ClientApp)
