"""The layout of cmr_utils: no import circles among its modules, and no module grown into a grab-bag.

The import graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` statement counts, at module level or inside a function (a lazy import that closes a
circle is still a circle), relative or absolute.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "cmr_utils"
# cmr_utils' largest modules hold about 500 lines; the grab-bags that were split held 806 and 880
MAX_LINES = 600


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir`` (``__init__.py`` names its package)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that importing ``name`` (file ``path``) imports, directly."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[:-(node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            targets.add(base)
            # ``from package import module`` imports the module too
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    # importing a.b.c runs a/__init__ and a/b/__init__ first; this module's own packages are already running
    own_packages = {".".join(name.split(".")[:k]) for k in range(1, len(name.split(".")) + 1)}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix in known and prefix not in own_packages:
                edges.add(prefix)
    return edges


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (module-level and function-level)."""
    modules = module_names(package_dir)
    return {name: _imported_modules(name, path, set(modules)) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed path per strongly connected component with a cycle, e.g. ``[a, b, a]`` (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_closed_path(graph, set(component)) for component in components]


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path inside ``component`` from its first module back to it (breadth-first: a shortest one)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if successor not in parents:
                    parents[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_graph_sees_lazy_relative_absolute_and_package_imports(tmp_path):
    package = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import g  # lazy, relative\n    return g\n",
        "b.py": "import pkg.c as c  # absolute\n",
        "c.py": "from pkg import a  # a module imported from its package\n",
        "d/__init__.py": "from . import e\n",
        "d/e.py": "from .. import leaf\nfrom ..leaf import h\n",
        "leaf.py": "import json\n",
        "uses_d.py": "from pkg.d.e import h\n",
    })
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.d.e"}
    assert graph["pkg.d.e"] == {"pkg.leaf"}  # its own package pkg.d is already running: no edge
    assert graph["pkg.uses_d"] == {"pkg.d", "pkg.d.e"}  # importing pkg.d.e runs pkg/d/__init__ first
    assert graph["pkg.leaf"] == set() and graph["pkg"] == set()
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_a_module_importing_its_own_package_init_through_a_sibling_is_a_cycle(tmp_path):
    # pkg/sub/__init__ imports sub.x, and sub.x imports pkg.y, which imports pkg.sub: sub -> x -> y -> sub
    package = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "sub/__init__.py": "from .x import f\n",
        "sub/x.py": "from ..y import g\n",
        "y.py": "def g():\n    from .sub import f\n",
    })
    assert import_cycles(import_graph(package)) == [["pkg.sub", "pkg.sub.x", "pkg.y", "pkg.sub"]]


def test_cmr_utils_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 10 and sum(map(len, graph.values())) > 10  # it did read the package and its imports
    cycles = import_cycles(graph)
    assert not cycles, "import circles in cmr_utils: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_no_module_is_a_grab_bag(path):
    n_lines = len(path.read_text().splitlines())
    assert n_lines <= MAX_LINES, (
        f"{path.relative_to(PACKAGE_DIR.parent)} has {n_lines} lines (at most {MAX_LINES}): split it by concern "
        "into modules named for what each holds"
    )
