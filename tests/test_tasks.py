"""TaskService (server/service/tasks.py): the one path of every change, and the in-process
coroutines (runners) it keeps so a user's cancel can interrupt them."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from server.service.notify import task_notification_service
from server.web import keys


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


async def test_a_cancel_committed_by_another_node_interrupts_the_runner_here(
        client: Any) -> None:
    """Cluster mode: the store hands changes another node committed to its `on_publish`
    listener (local=False), which the app wires to the service; a cancel
    (status cancelled with cancel_requested) of a task whose coroutine runs here stops it,
    a worker's own report of 'cancelled' (no cancel requested) does not."""
    from server.core.model import Change, Outcome

    tasks = client.app[keys.TASKS]
    started = {name: asyncio.Event() for name in ("a", "b")}

    async def job(task_id: str) -> None:
        await task_notification_service.register_task(task_id=task_id, user_id=1,
                                                      task_type="t")
        await task_notification_service.notify_progress(task_id, progress=1)
        started[task_id].set()
        await asyncio.Event().wait()  # until cancelled

    runners = {name: asyncio.create_task(job(name)) for name in started}
    for event in started.values():
        await asyncio.wait_for(event.wait(), 10)

    async def elsewhere(task_id: str, cancel_requested: bool) -> Outcome:
        task = msgspec.structs.replace(await client.app[keys.STORE].get_task(task_id),
                                       status="cancelled", cancel_requested=cancel_requested)
        return Outcome(Change(task_id, "cancelled"), task=task)

    tasks.changes_committed_elsewhere([await elsewhere("b", False)])
    store = client.app[keys.STORE]
    store.on_publish([await elsewhere("a", True)], False)  # as the app wired it
    await asyncio.wait_for(asyncio.wait([runners["a"]]), 10)
    assert runners["a"].cancelled()
    assert not runners["b"].done()
    runners["b"].cancel()
    await asyncio.wait([runners["b"]])
