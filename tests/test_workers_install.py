"""The worker extras installed exactly as docs/workers.md says (`pip install
'./clients/python[...]'` in a fresh venv, pip resolving from the package index), then a
task sent and run there by each queue's real worker against a real Redis and a real
taskpush server. Only the venv's packages and the small apps written here are importable:
no test pin can hide a missing or conflicting dependency.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.procs import ROOT, ServerProcess
from tests.workers_support import (
    CLIENT_DIR,
    Browser,
    Redis,
    Worker,
    assert_browser_order,
)

pytestmark = pytest.mark.slow

DOC = ROOT / "docs" / "workers.md"

APPS = {
    "tp_celery.py": '''
        import os
        from celery import Celery
        from taskpush_client import progress
        from taskpush_client.celery import install

        REDIS = "redis+socket://" + os.environ["TP_REDIS_SOCKET"]
        app = Celery("tp_install", broker=REDIS, backend=REDIS)
        app.conf.update(broker_connection_retry_on_startup=True,
                        worker_hijack_root_logger=False)
        install(app)

        @app.task
        def double(n):
            progress(50, "half way")
            return n * 2
    ''',
    "tp_rq.py": '''
        from taskpush_client import progress

        def double(n):
            progress(50, "half way")
            return n * 2
    ''',
    "tp_arq.py": '''
        import os
        from arq.connections import RedisSettings
        from taskpush_client import progress
        from taskpush_client.arq import tracked

        @tracked
        async def double(ctx, n):
            await progress(50, "half way")
            return n * 2

        class WorkerSettings:
            functions = [double]
            redis_settings = RedisSettings(unix_socket_path=os.environ["TP_REDIS_SOCKET"])
            poll_delay = 0.05
    ''',
    "send.py": '''
        """Send one task per queue named on the command line; print their ids."""
        import asyncio, json, os, sys

        SOCKET = os.environ["TP_REDIS_SOCKET"]
        sent = {}
        if "celery" in sys.argv:
            from taskpush_client.celery import for_user
            import tp_celery
            sent["celery"] = tp_celery.double.apply_async((21,), headers=for_user(1)).id
        if "rq" in sys.argv:
            from redis import Redis
            from rq import Queue
            from taskpush_client.rq import enqueue
            import tp_rq
            queue = Queue("tp_install", connection=Redis(unix_socket_path=SOCKET))
            sent["rq"] = enqueue(queue, tp_rq.double, 21, user_id=1).id
        if "arq" in sys.argv:
            from arq import create_pool
            from arq.connections import RedisSettings
            from taskpush_client.arq import enqueue as arq_enqueue

            async def send():
                pool = await create_pool(RedisSettings(unix_socket_path=SOCKET))
                job = await arq_enqueue(pool, "double", 21, user_id=1)
                await pool.aclose()
                return job.job_id

            sent["arq"] = asyncio.run(send())
        print(json.dumps(sent))  # the registrations are delivered at exit (atexit flush)
    ''',
}


def documented_installs() -> dict[str, list[str]]:
    """docs/workers.md's `pip install './clients/python[...]'` lines: extras -> argv."""
    found: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"pip install '\./clients/python\[([a-z,]+)\]'", line)
        if match:
            found[match.group(1)] = shlex.split(line.split("#", 1)[0])
    return found


def install(where: Path, argv: list[str]) -> Path:
    """A fresh venv at `where`, then the documented command run by its own pip from a
    directory holding a copy of clients/python (so the build stays out of the checkout)."""
    shutil.copytree(CLIENT_DIR, where / "clients" / "python", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    assert argv[:2] == ["pip", "install"], argv
    done = subprocess.run([str(venv / "bin" / "pip"), *argv[1:]], cwd=where, env=clean_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], cwd=where,
                           env=clean_env(), capture_output=True, text=True, timeout=120,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    return venv


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout on the path or any taskpush setting."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("TASKPUSH_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.parametrize("extras", ["celery", "celery,rq,arq"])
def test_documented_extras_install_and_run_a_task_on_each_queue(
        extras: str, tmp_path: Path, redis: Redis, server: ServerProcess) -> None:
    argv = documented_installs().get(extras)
    assert argv is not None, f"docs/workers.md has no pip install line for [{extras}]"
    venv = install(tmp_path, argv)
    apps = tmp_path / "apps"
    apps.mkdir()
    for name, text in APPS.items():
        (apps / name).write_text(textwrap.dedent(text))
    queues = extras.split(",")
    env = clean_env(TASKPUSH_URL=server.url, TASKPUSH_API_KEY=API_KEY, PYTHONPATH=str(apps),
                    TP_REDIS_SOCKET=str(redis.socket))
    python, bin_ = str(venv / "bin" / "python"), venv / "bin"
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m, json; print(json.dumps({d: "
         "m.version(d) for d in ('celery', 'kombu', 'redis', 'rq', 'arq') "
         "if any(x.metadata['Name'].lower() == d for x in m.distributions())}))"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    print("installed:", versions.stdout.strip())  # shown when the test fails

    celery = Worker(tmp_path, "celery", [
        str(bin_ / "celery"), "-A", "tp_celery", "worker", "-c", "1", "-l", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"install{len(queues)}@localhost"], env, cwd=apps)
    with Browser(server) as browser:
        sent = subprocess.run([python, "send.py", *queues], cwd=apps, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert sent.returncode == 0, sent.stdout + sent.stderr[-3000:]
        ids: dict[str, str] = json.loads(sent.stdout.strip().splitlines()[-1])
        assert sorted(ids) == sorted(queues)
        celery.start()
        try:
            burst = {"rq": [str(bin_ / "rq"), "worker", "--burst", "-w",
                            "taskpush_client.rq.Worker", "--url", redis.url, "tp_install"],
                     "arq": [str(bin_ / "arq"), "--burst", "tp_arq.WorkerSettings"]}
            for queue in queues:
                if queue in burst:  # runs what is queued, then exits
                    ran = subprocess.run(burst[queue], cwd=apps, env=env, capture_output=True,
                                         text=True, timeout=120, check=False)
                    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
            seen = {queue: browser.until(task_id, timeout=60) for queue, task_id in ids.items()}
        except AssertionError:
            print(celery.output()[-3000:])
            raise
        finally:
            celery.stop()
    for queue, messages in seen.items():
        assert messages[-1]["status"] == "completed", (queue, messages)
        assert messages[-1]["result"] == 42, (queue, messages)
        assert "running" in [m["status"] for m in messages], (queue, messages)
        assert_browser_order(messages)
