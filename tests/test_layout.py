"""The package's shape: no import cycles, lower layers never import higher ones, argparse only in the CLI.

Every module of ``src/prunekit`` is parsed with :mod:`ast`, never imported, so the
test is fast and sees imports inside functions too. An import counts wherever it
is written (module level or inside a function), except under ``if TYPE_CHECKING:``
(never executed). ``import a.b`` and ``from a import b`` count as an edge to
``a.b`` (when that is a module) or to ``a``; parent packages that Python runs on
the way are not counted (otherwise everything would depend on ``prunekit/__init__``).

Layers, lowest first (see DESIGN.md §2)::

    _*.py internals < core < training < methods < formats, runtime < apps
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Iterator, Mapping

PACKAGE = "prunekit"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# What each layer must never import (by the first part of the module path below ``prunekit``; "api" is the
# public facade prunekit/__init__.py, which imports nearly everything).
FORBIDDEN: dict[str, frozenset[str]] = {
    "_internal": frozenset({"api", "core", "training", "methods", "formats", "runtime", "apps"}),
    "core": frozenset({"api", "training", "methods", "formats", "runtime", "apps"}),
    "training": frozenset({"api", "methods", "formats", "runtime", "apps"}),
    "methods": frozenset({"api", "formats", "runtime", "apps"}),
    "formats": frozenset({"api", "methods", "apps"}),
    "runtime": frozenset({"api", "methods", "apps"}),
    "api": frozenset({"apps"}),  # the facade gathers every layer but the applications
    "apps": frozenset(),
}

# Genuine exceptions to the layering rule, each with its reason; keep this short.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {
    # `python -m prunekit` must live at the package root and only hands over to the CLI.
    ("prunekit.__main__", "prunekit.apps.cli"): "the `python -m prunekit` entry point",
}

# Known findings in files other engineers are rewriting right now, to be fixed there and then removed
# from here (the test fails once an entry is no longer needed, so this list can only shrink).
# Import edges that close a cycle: (importer, imported) -> where the fix belongs.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}
# Layering violations: (importer, imported) -> why it is still there.
KNOWN_LAYER_VIOLATIONS: dict[tuple[str, str], str] = {}

ARGPARSE_ALLOWED = frozenset({"prunekit.apps.cli"})

Graph = Mapping[str, Iterable[str]]


# -- reading the package ------------------------------------------------------------------------------------------


def module_files(root: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package's name is its ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` except those in the body of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts.pop()  # a module's level 1 is its package; a package's level 1 is itself
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(module: str, source: str, modules: Iterable[str], is_package: bool = False) -> dict[str, int]:
    """Modules of ``modules`` that ``source`` (the text of ``module``) imports -> first line it does so.

    Example:
        >>> imports_of("p.a", "from . import b\\nfrom .c import f\\nimport os", {"p", "p.a", "p.b", "p.c"})
        {'p.b': 1, 'p.c': 2}
    """
    known = set(modules)
    found: dict[str, int] = {}
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _base(module, is_package, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target in known and target != module:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def import_graph(root: Path = SRC, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` for the whole package."""
    files = module_files(root, package)
    return {name: imports_of(name, path.read_text(encoding="utf-8"), files, path.name == "__init__.py")
            for name, path in files.items()}


# -- the checks (pure functions of a graph, so a synthetic one can prove they catch what they should) ---------------


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (as a path ``a -> ... -> a``) per strongly connected component that has one.

    Example:
        >>> find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]})
        [['a', 'b', 'c', 'a']]
    """
    cycles = []
    for component in _strong_components(graph):
        members = set(component)
        start = min(members)
        if len(members) > 1 or start in graph.get(start, ()):
            cycles.append(_path_back(graph, start, members))
    return sorted(cycles)


def _strong_components(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm, iterative (the package is deep enough to matter for recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def _path_back(graph: Graph, start: str, members: set[str]) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside one component (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child in members and child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle back to it")


def layer_of(module: str, package: str = PACKAGE) -> str:
    """The layer of a dotted module name (a key of :data:`FORBIDDEN`).

    Example:
        >>> layer_of("prunekit.core.pruner"), layer_of("prunekit._io"), layer_of("prunekit")
        ('core', '_internal', 'api')
    """
    parts = module.split(".")[1:]
    if not parts or parts == ["__main__"]:
        return "api"
    return "_internal" if parts[0].startswith("_") else parts[0]


def layer_violations(graph: Graph) -> list[tuple[str, str]]:
    """Every edge ``(importer, imported)`` that goes to a layer the importer must not use.

    Example:
        >>> layer_violations({"prunekit.core.a": ["prunekit.apps.cli", "prunekit._io"]})
        [('prunekit.core.a', 'prunekit.apps.cli')]
    """
    return sorted((src, dst) for src, targets in graph.items() for dst in targets
                  if layer_of(dst) in FORBIDDEN[layer_of(src)])


def _without(graph: Mapping[str, Mapping[str, int]], edges: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    drop = set(edges)
    return {src: [dst for dst in targets if (src, dst) not in drop] for src, targets in graph.items()}


def _where(graph: Mapping[str, Mapping[str, int]], src: str, dst: str) -> str:
    return f"{src} -> {dst} (line {graph[src][dst]} of {src})"


# -- the tests ----------------------------------------------------------------------------------------------------


def test_the_package_is_found_and_parsed():
    graph = import_graph()
    assert {"prunekit", "prunekit.apps.cli", "prunekit.core.pruner", "prunekit.methods.structural.layers"} <= set(graph)
    assert "prunekit.core.schedules" in graph["prunekit"]


def test_no_import_cycles():
    graph = import_graph()
    remaining = _without(graph, KNOWN_CYCLE_EDGES)
    cycles = find_cycles(remaining)
    assert not cycles, "import cycles (one per group of modules that import each other):\n" + "\n".join(
        "  " + " -> ".join(c) + f"\n    group: {', '.join(sorted(_component_of(remaining, c[0])))}" for c in cycles)


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    allowed = {**LAYER_EXCEPTIONS, **KNOWN_LAYER_VIOLATIONS}
    found = [edge for edge in layer_violations(graph) if edge not in allowed]
    assert not found, "layering violations:\n" + "\n".join("  " + _where(graph, *e) for e in found)


def test_known_findings_are_still_there():
    # An entry fixed at its source must leave the allow-lists, so that they only shrink.
    graph = import_graph()
    edges = {(src, dst) for src, targets in graph.items() for dst in targets}
    stale = sorted(set(KNOWN_CYCLE_EDGES) - edges) + sorted(set(KNOWN_LAYER_VIOLATIONS) - set(layer_violations(graph)))
    stale += sorted(set(LAYER_EXCEPTIONS) - edges)
    remaining = find_cycles(graph)
    stale += [e for e in KNOWN_CYCLE_EDGES if not any(_closes(e, c) for c in remaining)]
    assert not stale, f"no longer needed, remove from the allow-lists in tests/test_layout.py: {sorted(set(stale))}"


def _component_of(graph: Graph, module: str) -> list[str]:
    return next(c for c in _strong_components(graph) if module in c)


def _closes(edge: tuple[str, str], cycle: list[str]) -> bool:
    return any(pair == edge for pair in zip(cycle, cycle[1:])) or (edge[0] in cycle and edge[1] in cycle)


def test_only_the_cli_uses_argparse():
    users = []
    for name, path in module_files().items():
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] == "argparse" for n in names) and name not in ARGPARSE_ALLOWED:
                users.append(f"{name} (line {node.lineno})")
    assert not users, f"argparse outside {sorted(ARGPARSE_ALLOWED)}: {users}"


def registration_on_import(module: str, source: str, modules: Iterable[str]) -> list[str]:
    """What ``source`` (the text of ``module``) does at import to fill a registry elsewhere: module-level
    calls of an imported ``register*`` function, and modules of ``modules`` imported and never used (imported
    for their side effect). A module filling its own table (a ``register*`` it defines) builds a constant.

    Example:
        >>> registration_on_import("p.a", "from .reg import register_x\\nregister_x(int)\\nfrom . import b\\n",
        ...                        {"p", "p.a", "p.b", "p.reg"})
        ['line 2: register_x(...) at import', "line 3: module 'b' imported and never used"]
    """
    known = set(modules)
    tree = ast.parse(source)
    imported, module_names = {}, {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            base = _base(module, False, node) if isinstance(node, ast.ImportFrom) else ""
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                imported[name] = node.lineno
                if (f"{base}.{alias.name}" if base else alias.name) in known:
                    module_names[name] = node.lineno
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    found = [f"line {line}: module {name!r} imported and never used" for name, line in module_names.items()
             if name not in used]
    top_level = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for call in (c for node in top_level for c in ast.walk(node) if isinstance(c, ast.Call)):
        name = call.func.id if isinstance(call.func, ast.Name) else ""
        if name.lstrip("_").startswith("register") and name in imported:
            found.append(f"line {call.lineno}: {name}(...) at import")
    return sorted(found)


def test_no_registration_by_import_side_effect():
    files = module_files()
    found = [f"{name} {what}" for name, path in files.items() if path.name != "__init__.py"  # (re-exports)
             for what in registration_on_import(name, path.read_text(encoding="utf-8"), files)]
    assert not found, "registries must be filled explicitly, not by importing a module:\n  " + "\n  ".join(found)


# -- negative controls: the checks catch what they exist for --------------------------------------------------------


def test_a_synthetic_cycle_is_caught_and_reported_as_a_path():
    graph = {"p.a": ["p.b"], "p.b": ["p.c"], "p.c": ["p.a", "p.d"], "p.d": [], "p.e": ["p.e"]}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"], ["p.e", "p.e"]]
    assert find_cycles({"p.a": ["p.b"], "p.b": ["p.c"], "p.c": []}) == []


def test_a_cycle_through_a_function_level_import_counts_but_type_checking_does_not():
    modules = {"p", "p.a", "p.b"}
    lazy = "def f():\n    from .a import g\n    return g\n"
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\nelse:\n    import os\n"
    a = imports_of("p.a", "from . import b\n", modules)
    assert find_cycles({"p.a": a, "p.b": imports_of("p.b", lazy, modules)}) == [["p.a", "p.b", "p.a"]]
    assert find_cycles({"p.a": a, "p.b": imports_of("p.b", typed, modules)}) == []


def test_relative_imports_resolve_from_modules_and_packages():
    modules = {"p", "p.x", "p.x.y", "p.z"}
    assert imports_of("p.x.y", "from ..z import f\nfrom .. import z\nfrom . import q", modules) == {"p.z": 1, "p.x": 3}
    assert imports_of("p.x", "from . import y\nfrom ..z import f", modules, is_package=True) == {"p.x.y": 1, "p.z": 2}


def test_a_synthetic_registration_on_import_is_caught():
    modules = {"p", "p.a", "p.codecs", "p.layers", "p.registry", "p.x"}
    loop = "from .registry import register\nfor t in (1, 2):\n    register(t)\n"
    assert registration_on_import("p.layers", loop, modules) == ["line 3: register(...) at import"]
    own_table = "def _register_defaults():\n    pass\n_register_defaults()\n"
    used = "from . import codecs\nfrom .x import f, unused_name\n\ndef g():\n    return codecs.f(f)\n"
    assert registration_on_import("p.a", own_table, modules) == registration_on_import("p.a", used, modules) == []


def test_a_synthetic_layering_violation_is_caught():
    graph = {
        "prunekit.core.a": ["prunekit._io", "prunekit.methods.obd"],
        "prunekit.training.loop": ["prunekit.core.a"],
        "prunekit.methods.m": ["prunekit.core.a", "prunekit.training.loop", "prunekit.runtime.swap"],
        "prunekit.formats.f": ["prunekit.core.a", "prunekit.apps.cli"],
        "prunekit.apps.cli": ["prunekit.methods.m", "prunekit.formats.f"],
    }
    assert layer_violations(graph) == [("prunekit.core.a", "prunekit.methods.obd"),
                                       ("prunekit.formats.f", "prunekit.apps.cli"),
                                       ("prunekit.methods.m", "prunekit.runtime.swap")]
