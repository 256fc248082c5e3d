"""`pip install ./clients/python` in a fresh venv: the client, its one HTTP library and that
library's own dependencies, nothing of the server; and it reports to a real server there,
with no `server` package importable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.procs import ServerProcess
from tests.workers_support import CLIENT_DIR, rest, taskpush_server

pytestmark = pytest.mark.slow  # a fresh venv and pip

SERVER_ONLY = {"taskpush", "aiohttp", "aiosqlite", "uvloop", "prometheus-client",
               "prometheus_client", "pyjwt", "orjson"}

PROBE = textwrap.dedent('''
    import importlib.metadata as md, importlib.util, json, re, sys
    import taskpush_client as tp

    client = tp.Client(sys.argv[1], sys.argv[2], max_delay=0.0)
    client.register("fresh", 1, "t").wait()
    answer = client.event("fresh", "completed", result={"ok": True}).wait()
    client.close()

    def name(text):
        return re.split(r"[ ;<>=!~\\[(]", text, maxsplit=1)[0].lower().replace("_", "-")

    dists = {name(d.metadata["Name"]): [name(r) for r in (d.requires or [])
                                        if "extra ==" not in r] for d in md.distributions()}
    print(json.dumps({"dists": dists, "answer": answer,
                      "server_importable": importlib.util.find_spec("server") is not None,
                      "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                        ("server", "aiohttp", "uvloop", "aiosqlite"))}))
''')


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = taskpush_server(tmp_path)
    yield proc
    proc.cleanup()


def test_fresh_venv_gets_the_client_and_httpx_only(tmp_path: Path, server: ServerProcess
                                                   ) -> None:
    source = tmp_path / "src"  # a copy: the build's own files stay out of the checkout
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                              "-q", str(source)], env=env, capture_output=True, text=True,
                             timeout=300, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([str(python), "-c", PROBE, server.url, API_KEY], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60, check=False)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    dists: dict[str, list[str]] = found["dists"]

    # Everything installed is the client or what httpx (transitively) requires.
    closure, todo = set(), ["taskpush-client"]
    while todo:
        name = todo.pop()
        if name not in closure and name in dists:
            closure.add(name)
            todo.extend(dists[name])
    assert set(dists) - {"pip", "setuptools"} == closure, set(dists) ^ closure
    assert dists["taskpush-client"] == ["httpx"]  # one HTTP library, nothing else
    assert not SERVER_ONLY & set(dists)
    assert not found["server_importable"] and found["modules"] == []
    assert found["answer"]["ok"] is True
    assert rest(server, "GET", "/api/task/task/fresh/status")["result"] == {"ok": True}
