"""The npm package in clients/js: its client is static/taskpush.js (no drift), it installs
with `npm install ./clients/js` and imports without React, and its TypeScript declarations
type a usage file under `tsc --strict --noEmit` (misuse marked @ts-expect-error must fail)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.jsenv import JS_DIR, need_node, node_bin, run_node
from tests.procs import ROOT

pytestmark = pytest.mark.slow  # npm and the TypeScript compiler

PACKAGE = ROOT / "clients" / "js"


def test_the_package_client_is_the_script_tag_client() -> None:
    copy = PACKAGE / "taskpush.js"
    assert copy.read_bytes() == (ROOT / "static" / "taskpush.js").read_bytes(), \
        "clients/js/taskpush.js differs from static/taskpush.js: run `npm run build` there"


def test_manifest_exports_esm_with_types_and_react_only_as_optional_peer() -> None:
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert manifest["type"] == "module"
    assert manifest["exports"]["."] == {"types": "./index.d.ts", "default": "./index.js"}
    assert manifest["exports"]["./react"] == {"types": "./react.d.ts", "default": "./react.js"}
    assert "dependencies" not in manifest
    assert manifest["peerDependencies"] == {"react": ">=18"}
    assert manifest["peerDependenciesMeta"]["react"]["optional"] is True
    for name in manifest["files"]:
        assert (PACKAGE / name).is_file(), name
    assert "react" not in (PACKAGE / "index.js").read_text()


def test_build_step_copies_the_source(tmp_path: Path) -> None:
    need_node()
    stale = PACKAGE / "taskpush.js"
    saved = stale.read_bytes()
    try:
        stale.write_text("// stale\n")
        done = run_node("npm", "run", "--silent", "build", cwd=PACKAGE)
        assert done.returncode == 0, done.stderr
        assert stale.read_bytes() == (ROOT / "static" / "taskpush.js").read_bytes()
    finally:
        stale.write_bytes(saved)


def test_npm_install_of_the_folder_works_without_react(tmp_path: Path) -> None:
    need_node()
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    done = run_node("npm", "install", "--no-audit", "--no-fund", "--offline", str(PACKAGE),
                    cwd=app)
    assert done.returncode == 0, done.stderr
    assert json.loads((app / "package.json").read_text())["dependencies"]["taskpush"]
    script = (
        "import Default, { TaskNotificationClient, isTerminal, TRANSPORTS } from 'taskpush';\n"
        "const c = new TaskNotificationClient(1, 'token', { baseUrl: 'http://x' });\n"
        "console.log(JSON.stringify({same: Default === TaskNotificationClient,"
        " state: c.state, transports: TRANSPORTS, terminal: isTerminal('failed')}));\n")
    done = subprocess.run(["node", "--input-type=module", "-e", script], cwd=app,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"same": True, "state": "idle", "terminal": True,
                                       "transports": ["websocket", "sse", "polling"]}
    # the React entry needs React, which this app does not have
    done = subprocess.run(["node", "--input-type=module", "-e", "import 'taskpush/react'"],
                          cwd=app, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "react" in done.stderr


def test_declarations_type_check_strictly() -> None:
    done = run_node(node_bin("tsc"), "-p", str(JS_DIR / "tsconfig.json"), "--strict",
                    "--noEmit")
    assert done.returncode == 0, done.stdout + done.stderr
    # and they are not `any`: without a @ts-expect-error the misuse it marks must not compile
    usage = (JS_DIR / "typed_usage.tsx").read_text()
    assert usage.count("@ts-expect-error") >= 5
    broken = JS_DIR / "typed_usage_broken.tsx"
    config = JS_DIR / "tsconfig_broken.json"
    try:
        broken.write_text(usage.replace("// @ts-expect-error", "// (expected error)"))
        config.write_text(json.dumps({"extends": "./tsconfig.json", "files": [broken.name]}))
        done = run_node(node_bin("tsc"), "-p", str(config))
        errors = [line for line in done.stdout.splitlines() if "error TS" in line]
        assert len(errors) >= 5, done.stdout
    finally:
        broken.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
