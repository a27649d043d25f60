"""The import graph of ``kd`` and ``recipes``, read from the source with ``ast`` (nothing is
imported): the value types are a leaf, the library never imports the recipes, and no two
modules of the library import each other, directly or through others.

An import counts wherever it stands: at the top of a module or inside a function (a lazy
import is how a cycle hides, not how it goes away). Imports under ``if TYPE_CHECKING:``
are left out, since they never run. ``from kd.x import y`` is an edge to ``kd.x.y`` when
``y`` is a submodule, else to ``kd.x``. A module's implicit import of its parent packages
is not an edge (every submodule would otherwise be in a cycle with a package whose
``__init__`` imports one of its submodules); an explicit ``from kd.data import ...`` is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kd", "recipes")

#: the cycles still in the code, each the set of modules of one strongly connected
#: component, e.g. ``frozenset({"kd.recipe", "kd.regimes"})``. Every entry is a debt, not a
#: permission: fix the cycle, then delete its entry (the test fails on an entry that no
#: longer matches the code). Empty since issue 24 broke divergences <-> chunked and
#: data.lm <-> data.mlm, the only two.
KNOWN_CYCLES: list[frozenset[str]] = []


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """``{dotted name: path}`` of every module of ``packages`` under ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that runs, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """The modules of ``modules`` that ``name`` imports: ``{module: True if any of its
    imports of it stands at module level (runs at import time), else False}``."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(n) for n in _top_level_imports(tree)}
    out: dict[str, bool] = {}

    def add(target: str, node: ast.AST) -> None:
        if target in modules and target != name:
            out[target] = out.get(target, False) or id(node) in top_level

    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
            continue
        if node.level:  # relative: from the module's package (its own name for a package)
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            add(sub if sub in modules else source, node)
    return out


def _top_level_imports(tree: ast.Module):
    """Imports that run when the module is imported: module level, including inside
    module-level ``if`` / ``try`` / ``with`` blocks, but not in functions or classes' methods."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, bool]]:
    """``{module: {imported module: at import time?}}`` over the modules of ``packages``."""
    modules = find_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict[str, bool]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return sorted(found, key=sorted)


def describe(component: frozenset[str], graph: dict[str, dict[str, bool]]) -> str:
    """The component's edges, ``a -> b`` (``(lazy)`` when only inside functions)."""
    edges = [f"{a} -> {b}" + ("" if graph[a][b] else " (lazy)")
             for a in sorted(component) for b in sorted(graph[a]) if b in component]
    return "{" + ", ".join(sorted(component)) + "}: " + "; ".join(edges)


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, bool]]:
    return import_graph()


def test_the_graph_sees_the_modules_it_should(graph):
    # a guard on the reader itself: an empty or wrong graph would pass every check below
    for name in ("kd", "kd.signals", "kd.divergences", "kd.chunked", "kd.data", "kd.data.lm",
                 "kd.data.sources", "recipes"):
        assert name in graph
    assert "kd.signals" in graph["kd.chunked"] and graph["kd.chunked"]["kd.signals"]
    assert "kd.chunked" in graph["kd.divergences"]


def test_signals_is_a_leaf(graph):
    assert graph["kd.signals"] == {}, f"kd.signals imports {sorted(graph['kd.signals'])}; it must import nothing of kd"


def test_the_library_never_imports_the_recipes(graph):
    bad = {a: sorted(b for b in targets if b == "recipes" or b.startswith("recipes."))
           for a, targets in graph.items() if a == "kd" or a.startswith("kd.")}
    assert not {a: b for a, b in bad.items() if b}


def test_the_value_types_and_the_sources_are_off_every_cycle(graph):
    # the cycles this layout broke (issue 24): divergences <-> chunked, data.lm <-> data.mlm
    on_cycles = set().union(*cycles(graph))
    for name in ("kd.signals", "kd.divergences", "kd.chunked", "kd.data.lm", "kd.data.mlm", "kd.data.sources"):
        assert name not in on_cycles, next(describe(c, graph) for c in cycles(graph) if name in c)


def test_no_import_cycles_but_the_known_ones(graph):
    found = cycles(graph)
    new = [c for c in found if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, "import cycles: " + " | ".join(describe(c, graph) for c in new)
    stale = [sorted(k) for k in KNOWN_CYCLES if k not in found]
    assert not stale, f"KNOWN_CYCLES entries no longer in the code (delete them): {stale}"


def test_the_reader_finds_cycles_lazy_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a\n")  # a lazy import closes a -> b -> a
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import e\n")
    (pkg / "sub" / "e.py").write_text("from ..a import x\nfrom .. import b\n")
    g = import_graph(tmp_path, ("pkg",))
    assert g["pkg.b"] == {"pkg.a": False}
    assert g["pkg.a"] == {"pkg.b": True}
    assert g["pkg.c"] == {}  # TYPE_CHECKING only
    assert g["pkg.sub"] == {"pkg.sub.e": True}
    assert g["pkg.sub.e"] == {"pkg.a": True, "pkg.b": True}
    assert cycles(g) == [frozenset({"pkg.a", "pkg.b"})]
    assert describe(cycles(g)[0], g) == "{pkg.a, pkg.b}: pkg.a -> pkg.b; pkg.b -> pkg.a (lazy)"
