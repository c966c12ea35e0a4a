"""The layers of the code base: which package may import which, and no import cycles.

    launch  ->  runtime  ->  stages  ->  comms  ->  core

A package may import its own modules and those of the layers to its right, never one
to its left: the transport knows nothing of stages or the runtime, stages know nothing
of the runtime, and ``core`` (config loading, the live-settings vocabulary) imports
nothing of the project. Every import counts, including those inside functions and
under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("launch", "runtime", "stages", "comms", "core")
"""Left to right: each may import only itself and what stands to its right."""


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports, for every module of the layers."""
    modules = {_module_name(path, root): path for layer in LAYERS for path in (root / layer).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from a.b import c`` imports the module a.b.c when there is one, else a.b.
                targets.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                               else node.module for alias in node.names)
        graph[name] = {t for t in targets if t.split(".")[0] in LAYERS and t != name}
    return graph


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a layer to the importer's left, as 'importer -> imported'."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{src} -> {dst}" for src, targets in graph.items() for dst in targets
                  if rank[dst.split(".")[0]] < rank[src.split(".")[0]])


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_layer_imports_a_layer_above_it():
    graph = import_graph()
    assert {"core.config", "comms.links", "stages.base", "runtime.planner", "launch.mirror"} <= set(graph)
    assert upward_imports(graph) == []


def test_core_imports_nothing_of_the_project_but_itself():
    graph = import_graph()
    assert all(dst.startswith("core.") for src, targets in graph.items() if src.startswith("core") for dst in targets)


def test_there_is_no_import_cycle():
    assert import_cycles(import_graph()) == []


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    for layer, source in {"comms": "from runtime.x import y\n", "runtime": "import comms.a\n",
                          "core": "", "stages": "", "launch": ""}.items():
        (tmp_path / layer).mkdir()
        (tmp_path / layer / ("a.py" if layer == "comms" else "x.py")).write_text(source)
    graph = import_graph(tmp_path)
    assert graph["comms.a"] == {"runtime.x"} and graph["runtime.x"] == {"comms.a"}
    assert upward_imports(graph) == ["comms.a -> runtime.x"]
    assert import_cycles(graph) == [["comms.a", "runtime.x"]]
