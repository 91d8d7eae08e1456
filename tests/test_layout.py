"""The packages of comfyq import each other one way only: no import cycle between two packages (or
top-level modules), counting every import, those inside functions too (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import comfyq

ROOT = Path(comfyq.__file__).parent


def unit(module: str) -> str:
    """The package (``api``) or top-level module (``app``) of ``comfyq.api.jobs`` and the like."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "comfyq"


def imports(path: Path, module: str) -> set[str]:
    """The comfyq modules that ``path`` (module ``module``) imports, relative imports resolved."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("comfyq.")}


def package_graph() -> dict[str, set[str]]:
    """Package (or top-level module) -> the others it imports."""
    modules: dict[Path, str] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        modules[path] = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    units = {unit(m) for m in modules.values()} - {"comfyq"}
    graph: dict[str, set[str]] = {u: set() for u in units}
    for path, module in modules.items():
        here = unit(module)
        # ``from comfyq import __version__`` names no package: only packages and modules count.
        found = {unit(m) for m in imports(path, module)} & units
        graph.setdefault(here, set()).update(found - {here})
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first walk (empty when the graph is acyclic)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_walk_finds_a_cycle_and_resolves_relative_imports() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    v2 = package_graph()["v2"]
    assert "api" in v2 and "store" in v2  # v2 builds on both: the graph sees real imports


def test_no_import_cycle_between_packages() -> None:
    graph = package_graph()
    assert "v2" not in graph["api"]  # the Comfy API v2 plugs into api through comfyq.app
    assert cycles(graph) == []
