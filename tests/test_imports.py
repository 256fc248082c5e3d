"""The server's modules form a layered graph: no module imports one that imports it back.

Every import counts, `TYPE_CHECKING` ones and imports inside functions included: a cycle
hidden from the interpreter is still two modules that cannot be understood apart."""

from __future__ import annotations

from pathlib import Path

from tests.server_imports import cycles, import_graph


def test_no_module_of_server_imports_one_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_type_checking_import(tmp_path: Path) -> None:
    # the check itself: a cycle made only of a TYPE_CHECKING import is found, across folders
    server = tmp_path / "server"
    (server / "core").mkdir(parents=True)
    (server / "__init__.py").write_text("")
    (server / "core" / "__init__.py").write_text("")
    (server / "a.py").write_text("from .core import b\n")
    (server / "core" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import X\n")
    graph = import_graph(server, tmp_path)
    assert cycles(graph) == [["server.a", "server.core.b", "server.a"]]
