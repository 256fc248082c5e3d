"""What the server's modules import, read from their source (ast): the graph that
tests/test_imports.py checks for cycles and tests/test_layers.py for layers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server"


def module_name(path: Path, root: Path = ROOT) -> str:
    """`server/push/hub.py` -> `server.push.hub`; a folder's `__init__.py` is the folder."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def server_modules(server: Path = SERVER, root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(server.rglob("*.py"))}


def imported(path: Path, name: str,
             modules: set[str] | dict[str, Path]) -> list[tuple[str, str, int]]:
    """Each import of `path` (module `name`) as (target, imported name, line). The target is
    the module or folder that is imported (`from server.core import model` -> server.core.model),
    or the module a name is taken from; a name is "" when a whole module is imported."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            full = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                child = f"{full}.{alias.name}"
                if child in modules:
                    found.append((child, "", node.lineno))
                else:
                    found.append((full, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, "", node.lineno) for a in node.names)
    return found


def import_graph(server: Path = SERVER, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the server modules it imports (a folder counts as its `__init__`)."""
    modules = server_modules(server, root)
    return {name: {target for target, _, _ in imported(path, name, modules)
                   if target in modules and target != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle once, as a path that returns to its first module."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                key = frozenset(path)
                if key not in seen:
                    seen.add(key)
                    found.append([*path, start])
            elif nxt not in path and nxt > start:  # each cycle from its smallest module
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found
