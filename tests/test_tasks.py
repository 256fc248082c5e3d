"""TaskService (server/tasks.py): the one path of every change, and the in-process
coroutines (runners) it keeps so a user's cancel can interrupt them."""

from __future__ import annotations

import asyncio
from typing import Any

from server import keys
from server.notify import task_notification_service


async def test_runner_entries_do_not_pile_up(client: Any) -> None:
    tasks = client.app[keys.TASKS]  # the service the in-process API is bound to

    async def job() -> None:
        await task_notification_service.register_task(task_id="r", user_id=1, task_type="t")
        for n in range(50):
            await task_notification_service.notify_progress("r", progress=n)
        me = asyncio.current_task()
        assert me is not None
        assert tasks._runners.get("r") is me
        await task_notification_service.notify_completed("r")
        assert "r" not in tasks._runners  # a finished task has nothing to interrupt

    await asyncio.create_task(job())
