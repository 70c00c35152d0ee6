"""No import cycles inside router/: a lower layer never imports a higher one.

The graph is read from the source (AST), not from ``sys.modules``, so an
import inside a function counts as much as one at the top: both run, and a
lazy import that closes a cycle is a cycle waiting for the wrong import
order. Imports under ``if TYPE_CHECKING:`` do not count (they never run).
Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so it
is an edge to those packages too (except the importer's own packages, which
are already being imported when it runs); ``from a.b import c`` is an edge
to ``a.b`` and, when ``c`` is a module, to ``a.b.c``.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> {imported module: line of the first import of it}
Graph = dict[str, dict[str, int]]


def _modules(root: Path, package: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_import_module(node: ast.AST) -> bool:
    """``importlib.import_module("name")`` (or the bare function) with a constant name."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name == "import_module" and isinstance(node.args[0].value, str)


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom | ast.Call]:
    """Every import that can run, in functions too; not under ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        if isinstance(node, ast.Import | ast.ImportFrom) or (
            isinstance(node, ast.Call) and _is_import_module(node)
        ):
            yield node
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _runtime_imports(child)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, package: str) -> Graph:
    """Who imports whom among the modules of ``package`` (a directory of ``root``)."""
    modules = _modules(root, package)
    graph: Graph = {m: {} for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        here = mod if is_package else mod.rpartition(".")[0]
        own = set(_ancestors(mod))
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            named: list[str] = []
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                named = [source, *(f"{source}.{alias.name}" for alias in node.names)]
            else:
                first = node.args[0]
                assert isinstance(first, ast.Constant)
                named = [str(first.value)]
            for name in named:
                # "import a.b.x" where x is not a module: the deepest module named.
                while name not in modules and "." in name:
                    if isinstance(node, ast.ImportFrom) and name != named[0]:
                        break  # "from a import f": f is a function, a is counted already
                    name = name.rpartition(".")[0]
                if name not in modules or name == mod:
                    continue
                for target in (name, *(a for a in _ancestors(name) if a not in own)):
                    if target in modules and target != mod:
                        graph[mod].setdefault(target, node.lineno)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """One concrete cycle per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group: set[str] = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: Graph, group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt: list[str] = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return [*paths[v], start]
                if w in group and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def describe(graph: Graph, cycle: list[str], modules: dict[str, Path]) -> str:
    steps = [
        f"{a} -> {b} ({modules[a].relative_to(ROOT)}:{graph[a][b]})"
        for a, b in itertools.pairwise(cycle)
    ]
    return "\n  ".join(steps)


def test_router_has_no_import_cycles() -> None:
    graph = import_graph(ROOT, "router")
    assert "router.config_loader" in graph["router.cli"]  # the graph is real
    found = cycles(graph)
    modules = _modules(ROOT, "router")
    assert not found, "import cycles inside router/:\n  " + "\n\n  ".join(
        describe(graph, c, modules) for c in found
    )


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_sees_each_kind_of_import(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            # a lazy import closes a cycle
            "pkg/a.py": "import pkg.b\n",
            "pkg/b.py": "def f():\n    from pkg import a\n",
            # a TYPE_CHECKING import does not; its else branch does
            "pkg/c.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg.d import X\nelse:\n    import json\n",
            "pkg/d.py": "from pkg.c import *\n",
            # a package whose __init__ imports a module that imports the package
            "pkg/sub/__init__.py": "from pkg.sub.e import E\n",
            "pkg/sub/e.py": "from pkg.sub import f\nE = 1\n",
            "pkg/sub/f.py": "",
            # a relative import, and an import of a module that runs a package __init__
            "pkg/g.py": "from . import h\n",
            "pkg/h.py": "import pkg.other.deep\n",
            "pkg/other/__init__.py": "from ..g import *\n",
            "pkg/other/deep.py": "",
            # importlib with a constant name
            "pkg/i.py": "import importlib\nimportlib.import_module('pkg.j')\n",
            "pkg/j.py": "from pkg.i import nothing\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert "pkg.d" not in graph["pkg.c"]
    found = sorted(sorted(c[:-1]) for c in cycles(graph))
    assert found == [
        ["pkg.a", "pkg.b"],
        ["pkg.g", "pkg.h", "pkg.other"],
        ["pkg.i", "pkg.j"],
        ["pkg.sub", "pkg.sub.e"],
    ]
