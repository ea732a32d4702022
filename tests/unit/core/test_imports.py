"""The core's module graph: a DAG (no circle, TYPE_CHECKING imports included), flows that never import each other,
and no I/O library anywhere in it (the core is facts and the time in, actions out)."""

from __future__ import annotations

import ast
from pathlib import Path

import kvmha.manager.core

CORE = Path(kvmha.manager.core.__file__).parent
PACKAGE = "kvmha.manager.core"
FLOWS = {"hostflow", "powersync", "scheduler", "operator", "linkloss"}
FORBIDDEN = {"asyncio", "grpc", "sqlalchemy", "libvirt", "time", "threading", "socket", "kvmha.proto", "random"}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, also inside `if TYPE_CHECKING:` (a circle for the reader all the same)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == PACKAGE:  # from kvmha.manager.core import facts
                found.update(f"{PACKAGE}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in CORE.glob("*.py"):
        if path.stem == "__init__":
            continue
        edges[path.stem] = {
            name.removeprefix(f"{PACKAGE}.") for name in _imports(path) if name.startswith(f"{PACKAGE}.")
        }
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_core_has_no_import_circle() -> None:
    assert find_cycle(graph()) is None, f"import circle: {' -> '.join(find_cycle(graph()) or [])}"


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_flows_do_not_import_each_other() -> None:
    edges = graph()
    for flow in FLOWS:
        assert not edges[flow] & FLOWS, f"{flow} imports {edges[flow] & FLOWS}: ask through a Protocol instead"


def test_the_core_does_no_io() -> None:
    for path in CORE.glob("*.py"):
        bad = {name for name in _imports(path) if name.split(".")[0] in FORBIDDEN or name in FORBIDDEN}
        assert not bad, f"{path.name} imports {bad}"
