"""What the JavaScript tests need from the machine: Debian's Chromium (driven by playwright,
never downloaded), node and npm, and the npm packages of tests/js/package.json (TypeScript,
esbuild, React) installed once into tests/js/node_modules and kept there between runs.

On a developer machine without one of them the tests that need it skip; in CI (`CI` set)
they fail instead, so CI cannot go green without running them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT

JS_DIR = ROOT / "tests" / "js"
CHROMIUM = os.environ.get("TASKPUSH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def need(available: bool, what: str) -> None:
    """Skip without `what` on a dev machine; fail in CI."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI (.ci/run installs it)")
    pytest.skip(f"{what} is not available on this machine")


def need_node() -> None:
    need(shutil.which("node") is not None and shutil.which("npm") is not None, "node and npm")


def npm_modules() -> Path:
    """tests/js/node_modules, installed from tests/js/package.json when it changed (a stamp
    of the manifest's hash is kept beside it), so a second run costs nothing."""
    need_node()
    manifest = JS_DIR / "package.json"
    stamp = JS_DIR / "node_modules" / ".taskpush-stamp"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest):
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=JS_DIR, capture_output=True, text=True, timeout=600,
                              check=False)
        need(done.returncode == 0, f"npm install in tests/js ({done.stderr.strip()[-500:]})")
        stamp.write_text(digest)
    return JS_DIR / "node_modules"


def node_bin(name: str) -> str:
    return str(npm_modules() / ".bin" / name)


def run_node(*args: str, cwd: Path = JS_DIR, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


async def chromium() -> AsyncIterator[Any]:
    """Body of the `browser` fixture (tests/conftest.py): a headless system Chromium with a
    fresh profile."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover - the test extra installs it
        need(False, "the playwright package")
        raise
    need(os.access(CHROMIUM, os.X_OK), f"Chromium at {CHROMIUM}")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                    args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()
