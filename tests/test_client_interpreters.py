"""The client on every interpreter its `requires-python` allows (3.9 and 3.10 here; the
suite itself runs the newest): a fresh venv per interpreter found under ~/.pyenv, the client
installed from clients/python with its dependencies from PyPI, and a script that reports to
a real taskpush server: sync and async reports, an async `@task_notifier` job, and a hung
taskpush whose timeout must not raise into the caller. A missing interpreter skips, except
in CI (CI set), where it fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.procs import ServerProcess
from tests.workers_support import CLIENT_DIR, history, rest

PYENV = Path(os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))) / "versions"
VERSIONS = ["3.9", "3.10"]

SCRIPT = textwrap.dedent('''
    import asyncio, json, socket, sys
    import taskpush_client as tp

    url, key = sys.argv[1], sys.argv[2]
    tag = "py%d%d" % sys.version_info[:2]
    client = tp.Client(url, key, max_delay=0.0, backoff=0.02)
    svc = tp.TaskNotificationService(client)
    out = {}

    svc.register_task(tag + "-sync", 1, "t")
    out["sync"] = svc.notify_started(tag + "-sync").wait()["ok"]
    svc.notify_completed(tag + "-sync", result={"n": 1}).wait()

    async def reports():
        svc.register_task(tag + "-async", 1, "t")
        first = await svc.notify_started(tag + "-async")
        last = await svc.notify_completed(tag + "-async", result=[1, 2])
        return first["ok"] and last["ok"]

    out["async"] = asyncio.run(reports())

    @tp.task_notifier(task_id=tag + "-job", user_id=1, task_type="t", service=svc)
    async def job():
        await tp.progress(50, "half way")
        out["job_body"] = not tp.is_cancelled()  # the cancel watcher runs here too
        return {"done": True}

    out["job"] = asyncio.run(job())

    # A taskpush that accepts connections and never answers: `await` and `wait()` give up
    # after `wait` and return None; nothing raises into the caller.
    hung = socket.create_server(("127.0.0.1", 0))
    stuck = tp.Client("http://127.0.0.1:%d" % hung.getsockname()[1], key, max_delay=0.0,
                      wait=0.3, timeout=30)

    async def hung_reports():
        stuck.register(tag + "-hung", 1, "t")
        return await stuck.event(tag + "-hung", "running")

    out["hung_await"] = asyncio.run(hung_reports())
    out["hung_wait"] = stuck.event(tag + "-hung", "completed").wait()
    out["flushed"] = client.flush(20)
    client.close()
    print(json.dumps(out))
    sys.stdout.flush()
    import os; os._exit(0)  # the stuck client's sender is still waiting on the hung socket
''')


def interpreter(version: str) -> Path:
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"))
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"Python {version} is not installed under {PYENV}")
        pytest.skip(f"Python {version} is not installed under {PYENV}")
    return found[-1]


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_the_client_on_older_pythons(version: str, tmp_path: Path, server: ServerProcess
                                     ) -> None:
    python = interpreter(version)
    source = tmp_path / "src"  # a copy: the build's own files stay out of the checkout
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", str(source)], env=env,
                             capture_output=True, text=True, timeout=600, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    run = subprocess.run([str(venv / "bin" / "python"), "-c", SCRIPT, server.url, API_KEY],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["sync"] is True and out["async"] is True
    assert out["job_body"] is True and out["job"] == {"done": True}
    assert out["hung_await"] is None and out["hung_wait"] is None
    assert out["flushed"] is True
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    tag = "py" + version.replace(".", "")
    assert rest(server, "GET", f"/api/task/task/{tag}-sync/status")["result"] == {"n": 1}
    assert rest(server, "GET", f"/api/task/task/{tag}-async/status")["result"] == [1, 2]
    assert [e["status"] for e in history(server, f"{tag}-job")] == [
        "pending", "running", "progress", "completed"]
