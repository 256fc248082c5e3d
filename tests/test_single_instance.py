"""A second server on the same database file refuses to start and touches nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import aiohttp

from tests.procs import ROOT, RUN_PY, ServerProcess, child_env, free_port


async def test_second_server_on_same_db_is_refused(servers: Any) -> None:
    first: ServerProcess = servers("--demo-task-seconds", "60", "--log-level", "warning")
    first.start()
    async with aiohttp.ClientSession() as http:
        async with http.post(first.url + "/api/demo/login", json={"user_id": 1}) as resp:
            token = (await resp.json())["data"]["token"]
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(first.url + "/api/demo/tasks", json={"kind": "long"},
                             headers=headers) as resp:
            task_id = (await resp.json())["data"]["task_id"]
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(RUN_PY), "--port", str(free_port()), "--db", str(first.db)],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=30,
        )
        assert second.returncode != 0
        assert "in use by another taskpush process" in second.stderr
        async with http.get(f"{first.url}/api/task/task/{task_id}/status",
                            headers=headers) as resp:
            task = (await resp.json())["data"]
        assert task["status"] in ("running", "progress")  # not marked interrupted
        assert task["error_type"] is None
    assert first.stop() == 0
