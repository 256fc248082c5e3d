"""The server's modules form a layered graph: no module imports one that imports it back.

Every import counts, `TYPE_CHECKING` ones and imports inside functions included: a cycle
hidden from the interpreter is still two modules that cannot be understood apart."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"


def _imports(path: Path, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x, y
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == "server":
                parts = node.module.split(".")
                names = parts[1:2] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("server.") and "." in a.name)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {p.stem: p for p in SERVER.glob("*.py")}
    return {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}


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


def test_no_module_of_server_imports_one_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_type_checking_import(tmp_path: Path) -> None:
    # the check itself: a cycle made only of a TYPE_CHECKING import is found
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n")
    modules = {"a", "b"}
    graph = {name: _imports(tmp_path / f"{name}.py", modules) for name in modules}
    assert cycles(graph) == [["a", "b", "a"]]
