"""The package's shape (architecture note): no import circle among netengine's modules, counting
imports made inside functions; few imports of its own modules inside functions outside the face
(``__init__.py`` files and ``cli/``); at most 14 top-level modules; the parts import only what
the note allows."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "netengine"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file}; a package is named by its ``__init__.py``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        if path.name.endswith("_pb2.py"):
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` lands in: itself, or the nearest enclosing package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _in_function(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def imports_of(module: str, path: Path, modules: dict[str, Path]):
    """(target module, made inside a function) for each import of a netengine module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        else:
            continue
        if _under_type_checking(node, parents):
            continue
        for name in names:
            if name.split(".")[0] != "netengine":
                continue
            target = _resolve(name, modules)
            if target and target != module:
                yield target, _in_function(node, parents)


@functools.lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> imported modules, and the lazy (function-level) internal imports made
    outside the face."""
    modules = module_files()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy = []
    for module, path in modules.items():
        face = path.name == "__init__.py" or module.startswith("netengine.cli")
        for target, in_function in imports_of(module, path, modules):
            edges[module].add(target)
            if in_function and not face and target != "netengine":
                lazy.append(f"{module} -> {target}")
    return edges, lazy


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_circle_finder_finds_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(edges) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    edges, _ = import_graph()
    found = circles(edges)
    assert not found, "import circles: " + "; ".join(" <-> ".join(g) for g in found)


def test_few_lazy_internal_imports():
    _, lazy = import_graph()
    assert len(lazy) <= 5, "imports of netengine modules inside functions: " + ", ".join(lazy)


def test_at_most_14_top_level_modules():
    # __init__.py (the pycaffe face) and __main__.py (python -m netengine) are package plumbing
    top = [p.name for p in PACKAGE.glob("*.py") if not p.name.startswith("__")]
    assert len(top) <= 14, sorted(top)


@pytest.mark.parametrize("part, forbidden", [
    ("netengine.formats", ("netengine.net", "netengine.solvers", "netengine.layers")),
    ("netengine.layers", ("netengine.net", "netengine.solvers", "netengine.parallel",
                          "netengine.io", "netengine.net_spec", "netengine.cli")),
    ("netengine.data", ("netengine.net", "netengine.solvers", "netengine.layers")),
    ("netengine.ops", ("netengine.net", "netengine.layers", "netengine.blob")),
    ("netengine.net", ("netengine.solvers", "netengine.parallel", "netengine.cli")),
])
def test_parts_import_only_what_the_architecture_allows(part, forbidden):
    edges, _ = import_graph()
    faces = {m for m, path in module_files().items() if path.name == "__init__.py"}
    wrong = [f"{m} -> {t}" for m, targets in edges.items()
             if (m == part or m.startswith(part + ".")) and m not in faces
             for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert not wrong, wrong
