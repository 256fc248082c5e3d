"""The arq worker the arq tests run (`python -m arq tests.worker_apps.arq_app.WorkerSettings`);
Redis on the unix socket in TP_REDIS_SOCKET."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Retry
from taskpush_client import progress
from taskpush_client.arq import tracked


@tracked
async def ok(ctx: dict[str, Any], steps: int) -> dict[str, Any]:
    for i in range(1, steps + 1):
        await progress(100 * i / steps, f"item {i}", f"Step {i}/{steps}")
        await asyncio.sleep(0.02)
    return {"items": steps}


@tracked
async def boom(ctx: dict[str, Any]) -> None:
    progress(10, "about to fail")
    raise ValueError("the input was bad")


@tracked
async def until_file(ctx: dict[str, Any], path: str) -> str:
    i = 0
    while not Path(path).exists():
        i += 1
        progress(min(i, 99), f"waiting {i}")
        await asyncio.sleep(0.05)
    return "done"


@tracked
async def flaky(ctx: dict[str, Any], marker: str) -> str:
    if ctx["job_try"] == 1:
        raise Retry(defer=0.1)
    return "second time lucky"


class WorkerSettings:
    functions = (ok, boom, until_file, flaky)
    redis_settings = RedisSettings(unix_socket_path=os.environ.get("TP_REDIS_SOCKET"))
    max_tries = 3
    poll_delay = 0.05
    allow_abort_jobs = True
