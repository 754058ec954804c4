"""The import graph of prh_fast: no cycles, and a few layer rules.

Every module under ``prh_fast/`` is parsed (not imported) and each ``import`` / ``from ... import``
at any depth (inside functions too) is an edge to the prh_fast module it names; relative imports
are resolved, and ``from pkg import name`` points at ``pkg.name`` when that is a module, else at
``pkg``.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = "prh_fast"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict:
    """Module name -> path for every ``.py`` file under the package."""
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _known(name: str, mods: dict) -> str | None:
    """The module ``name`` is or lives in (``a.b.attr`` -> ``a.b``), None outside prh_fast."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(module: str, node, mods: dict) -> set:
    """The prh_fast modules one import statement of ``module`` imports."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module.split(".")
            if mods[module].name != "__init__.py":
                package = package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [base + "." + a.name for a in node.names]
    out = set()
    for name in names:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            target = _known(name, mods)
            if target is not None and target != module:
                out.add(target)
    return out


@functools.lru_cache(maxsize=1)
def _graph() -> dict:
    mods = _modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _targets(module, node, mods)
    return {m: frozenset(v) for m, v in graph.items()}


def import_graph() -> dict:
    """Module -> the prh_fast modules it imports (parsed once per test session)."""
    return dict(_graph())


def find_cycle(graph: dict) -> list | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        colour[start] = GREY
        path = [start]
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                stack.pop()
            elif colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 20
    # prh_fast.cli imports its subcommands' modules inside functions only
    assert "prh_fast.cli_extract" in graph["prh_fast.cli"]
    assert "prh_fast.grid" in graph["prh_fast"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle among prh_fast modules: " + " -> ".join(cycle)


# (lower layer, higher modules it must not import)
LAYER_RULES = [
    ("prh_fast.knn", ("prh_fast.grid", "prh_fast._align", "prh_fast._stream_align",
                      "prh_fast.cli", "prh_fast._cli_common", "prh_fast.cli_extract",
                      "prh_fast.cli_store", "prh_fast.demo", "prh_fast.distributed")),
    ("prh_fast.metrics", ("prh_fast.grid", "prh_fast._align", "prh_fast._stream_align",
                          "prh_fast.cli", "prh_fast._cli_common", "prh_fast.cli_extract",
                          "prh_fast.cli_store", "prh_fast.demo", "prh_fast.distributed")),
    ("prh_fast.store", ("prh_fast.grid", "prh_fast._align", "prh_fast._stream_align",
                        "prh_fast.cli", "prh_fast._cli_common", "prh_fast.cli_extract",
                        "prh_fast.cli_store", "prh_fast.demo", "prh_fast.distributed")),
    ("prh_fast._align", ("prh_fast.grid", "prh_fast._stream_align", "prh_fast.cli",
                         "prh_fast.demo", "prh_fast.distributed")),
    ("prh_fast._stream_align", ("prh_fast.grid", "prh_fast.cli", "prh_fast.demo",
                                "prh_fast.distributed")),
    # the backend registry lives in prh_fast.knn (the rule above); the configuration it reads
    # sits below every computation
    ("prh_fast._config", ("prh_fast.knn", "prh_fast.metrics", "prh_fast.store", "prh_fast.grid",
                          "prh_fast._align", "prh_fast.cli", "prh_fast.distributed")),
    ("prh_fast._cli_common", ("prh_fast.cli", "prh_fast.cli_extract", "prh_fast.cli_store")),
    # the package's __init__ imports everything: modules it imports must not import it back
    ("prh_fast._info", ("prh_fast",)),
]
#: Leaf modules: they import nothing from prh_fast.
LEAVES = ["prh_fast.errors", "prh_fast._io", "prh_fast._version", "prh_fast._log"]


@pytest.mark.parametrize("lower, forbidden", LAYER_RULES, ids=[r[0] for r in LAYER_RULES])
def test_layer_rules(lower, forbidden):
    graph = import_graph()
    assert any(_under(m, lower) for m in graph), f"{lower}: no such module"
    bad = []
    for module in sorted(graph):
        if not _under(module, lower):
            continue
        for target in sorted(graph[module]):
            # "prh_fast" forbids the package itself, not its submodules
            hit = [f for f in forbidden
                   if (target == f if f == PACKAGE else _under(target, f))]
            if hit:
                bad.append(f"{module} imports {target}")
    assert not bad, "layer rule broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_from_prh_fast(leaf):
    graph = import_graph()
    assert leaf in graph, f"{leaf}: no such module"
    assert not graph[leaf], f"{leaf} imports {sorted(graph[leaf])}"
