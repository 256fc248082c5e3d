"""The folders of `server/` are layers, and each may import only what docs/architecture.md
says: `core` (pure rules) imports nothing of the server, `storage` only `core`, `push` and
`service` only `core` and the storage interface, `web` everything but a storage engine, and
the top modules (`app`, `cli`, the package and its two shims) wire them together. No module
takes a private name from another, and none grows past the size a reader can hold, unless
docs/architecture.md says why it must."""

from __future__ import annotations

import ast
import re

from tests.server_imports import ROOT, imported, server_modules

ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300

# layer -> the layers (or `layer.module`) it may import besides itself
MAY_IMPORT: dict[str, set[str]] = {
    "config": set(),
    "core": set(),
    "storage": {"core"},
    "push": {"core", "storage.api"},
    "service": {"core", "storage.api"},
    "web": {"config", "core", "storage.api", "push", "service"},
}
# third-party or standard modules a layer must not import (a prefix matches its submodules)
FORBIDDEN: dict[str, set[str]] = {
    "config": set(),
    "core": {"asyncio", "aiohttp", "asyncpg", "aiosqlite", "sqlite3", "socket",
             "prometheus_client"},
    "storage": {"aiohttp"},
    "push": {"aiohttp", "asyncpg", "aiosqlite", "sqlite3"},
    "service": {"aiohttp.web", "asyncpg", "aiosqlite", "sqlite3"},
    "web": {"asyncpg", "aiosqlite", "sqlite3"},
}
# a driver belongs to its engine's folder only
DRIVERS = {"asyncpg": "server.storage.postgres", "aiosqlite": "server.storage.sqlite",
           "sqlite3": "server.storage.sqlite"}


def layer(module: str) -> str:
    """`server.push.hub` -> push; a module directly in `server/` is `top` (or `config`)."""
    parts = module.split(".")
    if len(parts) >= 3:
        return parts[1]
    return "config" if module == "server.config" else "top"


def allowed(importer: str, target: str) -> bool:
    """May `importer` import the server module `target`?"""
    a, b = layer(importer), layer(target)
    if a == "top" or a == b:
        return True
    return b in MAY_IMPORT[a] or ".".join(target.split(".")[1:3]) in MAY_IMPORT[a]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations() -> list[str]:
    modules = server_modules()
    found: list[str] = []
    for name, path in modules.items():
        where = f"{path.relative_to(ROOT)}"
        for target, _, line in imported(path, name, modules):
            if within(target, "server"):
                if target != name and not allowed(name, target):
                    found.append(f"{where}:{line} {layer(name)} imports {target}")
                # a storage module shared by both engines never reaches into one of them,
                # except the factory that picks one; the engines never import each other
                for engine, other in (("sqlite", "postgres"), ("postgres", "sqlite")):
                    if within(target, f"server.storage.{engine}") and (
                            within(name, f"server.storage.{other}")
                            or (layer(name) == "storage" and name.count(".") == 2
                                and name != "server.storage.engines")):
                        found.append(f"{where}:{line} {name} imports the engine {target}")
                continue
            if layer(name) in FORBIDDEN and any(within(target, f) for f in FORBIDDEN[layer(name)]):
                found.append(f"{where}:{line} {layer(name)} imports {target}")
            for driver, home in DRIVERS.items():
                if within(target, driver) and layer(name) != "top" and not within(name, home):
                    found.append(f"{where}:{line} {name} imports {driver} outside {home}")
    return found


def test_each_folder_imports_only_the_layers_below_it() -> None:
    assert violations() == []


def test_the_layer_rules_see_an_import_that_goes_up() -> None:
    # the check itself, on names: the pure core reaching for the web, push for the
    # settings, a handler for an engine; and the imports that are fine
    assert not allowed("server.core.model", "server.web.rest")
    assert not allowed("server.push.session", "server.config")
    assert not allowed("server.web.rest", "server.storage.sqlite.store")
    assert not allowed("server.web.rest", "server.storage.engines")
    assert not allowed("server.storage.api", "server.app")
    assert allowed("server.web.rest", "server.storage.api")
    assert allowed("server.push.hub", "server.core.model")
    assert allowed("server.app", "server.storage.engines")
    assert allowed("server.web.rest", "server.config")



def private_imports() -> list[str]:
    """`from .x import _name` across modules: a private name is private to its module."""
    modules = server_modules()
    return [f"{path.relative_to(ROOT)}:{line} {target}.{name}"
            for importer, path in modules.items()
            for target, name, line in imported(path, importer, modules)
            if within(target, "server") and name.startswith("_") and not name.startswith("__")]


def test_no_module_imports_a_private_name_of_another() -> None:
    assert private_imports() == []


def exceptions() -> dict[str, str]:
    """The size exceptions docs/architecture.md lists: "- `module` or `module.Class`: why"."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("### Exceptions to the size rule", 1)[1].split("\n#", 1)[0]
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^- `([\w.]+)`[^:\n]*:(.*)$", section, re.M)}


def oversized() -> dict[str, int]:
    """Module or `module.Class` -> its lines, for each past the limits."""
    found: dict[str, int] = {}
    for name, path in server_modules().items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found[name] = lines
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    found[f"{name}.{node.name}"] = size
    return found


def test_no_module_or_class_is_too_big_without_a_reason() -> None:
    listed = exceptions()
    assert all(listed.values()), "each exception says why"
    assert {name: size for name, size in oversized().items() if name not in listed} == {}


def test_every_listed_exception_is_still_needed() -> None:
    # a module split below the limits leaves the list, so the list stays the truth
    assert set(exceptions()) <= set(oversized())
