"""The package's shape: dependencies run one way, no import cycles, short functions.

Read from the source with ``ast`` (imports inside functions count too), so a
lazy import cannot hide a cycle.  The layer order is the one docs/architecture.md
describes; a module may import only modules of its own or a lower layer.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Set

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nnsim_fast"

#: Lower number = lower layer.  Every module of the package must be listed.
LAYERS = {
    "_checks": 0, "options": 0, "_version": 0,
    "ops": 1,
    "psi": 2, "storage": 2,
    "state": 3,
    "indices": 4, "estimators": 5, "pairs": 5,
    "kernels": 6,
    "_fileformat": 7, "_distributed": 7, "sketch": 7,
    "exact": 8,
    "compare": 9,
    "extract": 10, "baselines": 10, "krr": 10,
    "datasets": 11, "models": 11, "plot": 11,
    "app": 12, "cli": 12,
    "__init__": 13,
}
MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" or len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path) -> Set[str]:
    """Top-level package modules that ``path`` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts)        # 1 for nnsim_fast/x.py
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:                               # relative: climb to the package
                climb = node.level - (depth - 1)
                if climb > 1:
                    continue
                if climb == 1 or node.level == depth:
                    base = (node.module or "").split(".")[0]
                    targets = [base] if base else [alias.name.split(".")[0] for alias in node.names]
                else:                                    # inside a subpackage, sibling import
                    continue
            elif node.module and node.module.split(".")[0] == "nnsim_fast":
                rest = node.module.split(".")[1:]
                targets = [rest[0]] if rest else [alias.name.split(".")[0] for alias in node.names]
            else:
                continue
            found.update(targets)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nnsim_fast" and len(parts) > 1:
                    found.add(parts[1])
    return {name for name in found if name != "_C"}


def _graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph.setdefault(name, set()).update(_imports(path) - {name})
    return graph


def test_every_module_has_a_layer():
    assert set(_graph()) <= set(LAYERS), sorted(set(_graph()) - set(LAYERS))


def test_dependencies_run_one_way():
    upward = [(module, target) for module, targets in _graph().items() for target in targets
              if LAYERS[target] > LAYERS[module]]
    assert not upward, f"modules importing a higher layer: {upward}"


def test_no_import_cycles():
    graph = _graph()
    state: Dict[str, int] = {}

    def visit(node: str, trail: list) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                pytest.fail(f"import cycle: {' -> '.join(trail + [node, target])}")
            if target not in state:
                visit(target, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines} lines)")
    assert not long, long


def test_no_benchmark_harness_ships_in_the_package():
    assert not list(PACKAGE.rglob("bench*.py")) or \
        all("app" in p.parts for p in PACKAGE.rglob("bench*.py"))
    sources = "".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "pytest_benchmark" not in sources
