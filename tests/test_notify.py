"""The in-process producer API (server/notify.py) against a running app.

The `client` fixture starts an app, which binds `task_notification_service`; every call
below takes the same path as the HTTP API, so each is checked where a user sees it: the
owner's WebSocket and the REST status.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest

from server.core.errors import BadRequest, NotFound
from server.service.notify import TaskProgressContext, task_notification_service, task_notifier
from tests.conftest import Client, auth, handshake, recv, recv_until, ws_connect

service = task_notification_service


class QuotaExceeded(Exception):
    """A job's own exception type: its name becomes the task's error_type."""


async def status_of(client: Client, task_id: str, user_id: int = 1) -> dict[str, Any]:
    resp = await client.get(f"/api/task/task/{task_id}/status", headers=auth(user_id))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]


async def test_register_task_is_synchronous_and_the_next_notify_waits_for_it(
        client: Client) -> None:
    ws = await ws_connect(client, 1)
    await handshake(ws)
    future = service.register_task(task_id="sync1", user_id=1, task_type="interview",
                                   metadata={"n": 3})  # not awaited
    assert isinstance(future, asyncio.Future)
    progressed = await service.notify_progress("sync1", progress=40, message="half",
                                               step="2/5")
    assert progressed is not None
    assert (progressed["status"], progressed["progress"], progressed["step"]) == \
        ("progress", 40, "2/5")
    registered = await future
    assert registered["status"] == "pending" and registered["metadata"] == {"n": 3}
    assert registered["seq"] < progressed["seq"]

    pending = await recv(ws)
    assert (pending["task_id"], pending["status"]) == ("sync1", "pending")
    update = await recv(ws)
    assert (update["status"], update["progress"], update["message"]) == ("progress", 40, "half")
    assert (await status_of(client, "sync1"))["seq"] == progressed["seq"]
    await ws.close()


async def test_full_lifecycle_through_the_service(client: Client) -> None:
    ws = await ws_connect(client, 5)
    await handshake(ws)
    service.register_task("life", 5, "export")
    started = await service.notify_started("life")
    assert started is not None and started["status"] == "running"
    await service.notify_progress("life", progress=75.5)
    done = await service.notify_completed("life", result={"rows": 10})
    assert done is not None and done["status"] == "completed" and done["progress"] == 100
    seen = await recv_until(ws, lambda m: m.get("status") == "completed")
    assert [m["status"] for m in seen] == ["pending", "running", "progress", "completed"]
    assert seen[2]["progress"] == 75.5 and seen[-1]["result"] == {"rows": 10}
    assert await service.get_task("life") == done
    assert await service.get_task("nope") is None
    await ws.close()


async def test_notify_on_a_finished_task_returns_none(client: Client) -> None:
    service.register_task("fin", 1, "job")
    done = await service.notify_completed("fin", result=[1, 2])
    assert done is not None
    assert await service.notify_progress("fin", progress=10) is None
    assert await service.notify_started("fin") is None
    assert await service.notify_failed("fin", error="late") is None
    assert await service.notify_cancelled("fin") is None
    assert await service.notify_completed("fin", result="other") is None
    task = await status_of(client, "fin")
    assert (task["status"], task["result"], task["seq"]) == ("completed", [1, 2], done["seq"])


async def test_notify_on_a_task_the_user_cancelled_returns_none(client: Client) -> None:
    async def start() -> None:
        # in its own task: a user's cancel interrupts the task that reported last
        service.register_task("usercancel", 1, "job")
        await service.notify_started("usercancel")

    await asyncio.create_task(start())
    resp = await client.post("/api/task/task/usercancel/cancel", headers=auth(1))
    assert resp.status == 200
    assert await service.notify_progress("usercancel", progress=50) is None
    assert await service.notify_completed("usercancel", result=1) is None
    task = await status_of(client, "usercancel")
    assert (task["status"], task["progress"], task["result"]) == ("cancelled", 0, None)


async def test_notify_on_an_unknown_task_raises_not_found(client: Client) -> None:
    with pytest.raises(NotFound):
        await service.notify_progress("never-registered", progress=1)


async def test_decorator_completes_with_the_return_value(client: Client) -> None:
    ws = await ws_connect(client, 2)
    await handshake(ws)

    @task_notifier(task_id="deco_ok", user_id=2, task_type="summary", metadata={"a": 1})
    async def job(x: int, *, y: int) -> dict[str, int]:
        return {"sum": x + y}

    assert await job(2, y=3) == {"sum": 5}
    assert job.__name__ == "job"
    seen = await recv_until(ws, lambda m: m.get("status") == "completed")
    assert [m["status"] for m in seen] == ["pending", "running", "completed"]
    task = await status_of(client, "deco_ok", 2)
    assert (task["status"], task["result"], task["metadata"], task["task_type"]) == \
        ("completed", {"sum": 5}, {"a": 1}, "summary")
    await ws.close()


async def test_decorator_fails_with_the_exception(client: Client) -> None:
    @task_notifier(task_id="deco_fail", user_id=1, task_type="summary")
    async def job() -> None:
        raise QuotaExceeded("quota of 10 reached")

    with pytest.raises(QuotaExceeded):
        await job()
    task = await status_of(client, "deco_fail")
    assert (task["status"], task["error_type"], task["error"]) == \
        ("failed", "QuotaExceeded", "quota of 10 reached")

    @task_notifier(task_id="deco_fail2", user_id=1, task_type="summary")
    async def silent() -> None:
        raise KeyError

    with pytest.raises(KeyError):
        await silent()
    task = await status_of(client, "deco_fail2")
    assert (task["status"], task["error_type"]) == ("failed", "KeyError")
    assert task["error"]  # never empty, even for an exception without a message


async def test_decorator_marks_cancelled_on_cancellation(client: Client) -> None:
    started = asyncio.Event()

    @task_notifier(task_id="deco_cancel", user_id=1, task_type="long")
    async def job() -> None:
        started.set()
        await asyncio.Event().wait()

    runner = asyncio.create_task(job())
    await asyncio.wait_for(started.wait(), 5)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    task = await status_of(client, "deco_cancel")
    assert task["status"] == "cancelled"


async def test_user_cancel_interrupts_a_decorated_job(client: Client) -> None:
    started = asyncio.Event()

    @task_notifier(task_id="deco_usercancel", user_id=1, task_type="long")
    async def job() -> None:
        started.set()
        await asyncio.Event().wait()

    runner = asyncio.create_task(job())
    await asyncio.wait_for(started.wait(), 5)
    resp = await client.post("/api/task/task/deco_usercancel/cancel", headers=auth(1))
    assert resp.status == 200
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, 5)
    task = await status_of(client, "deco_usercancel")
    assert (task["status"], task["message"], task["cancel_requested"]) == \
        ("cancelled", "cancelled by the user", True)


async def test_progress_context_counts_to_100_and_completes(client: Client) -> None:
    ws = await ws_connect(client, 1)
    await handshake(ws)
    service.register_task("ctx", 1, "steps")
    async with TaskProgressContext("ctx", total_steps=4) as progress:
        for n in range(4):
            await progress.increment(f"step {n}")
        progress.set_result({"steps": 4})
    seen = await recv_until(ws, lambda m: m.get("status") == "completed")
    progresses = [m for m in seen if m["status"] == "progress"]
    assert [m["progress"] for m in progresses] == [25, 50, 75, 100]
    assert [m["step"] for m in progresses] == ["Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4"]
    assert progresses[0]["message"] == "step 0"
    task = await status_of(client, "ctx")
    assert (task["status"], task["progress"], task["result"]) == \
        ("completed", 100, {"steps": 4})
    await ws.close()


async def test_progress_context_registers_itself_with_user_id(client: Client) -> None:
    async with TaskProgressContext("ctx_own", total_steps=3, user_id=4,
                                   task_type="import") as progress:
        await progress.increment(steps=2)
    task = await status_of(client, "ctx_own", 4)
    assert (task["status"], task["task_type"], task["step"]) == ("completed", "import",
                                                                 "Step 2/3")


async def test_progress_context_fails_on_exception(client: Client) -> None:
    service.register_task("ctx_fail", 1, "steps")
    with pytest.raises(QuotaExceeded):
        async with TaskProgressContext("ctx_fail", total_steps=10) as progress:
            await progress.increment("one")
            raise QuotaExceeded("stop here")
    task = await status_of(client, "ctx_fail")
    assert (task["status"], task["error_type"], task["error"], task["progress"]) == \
        ("failed", "QuotaExceeded", "stop here", 10)


async def test_progress_context_on_unregistered_task_without_user_id(client: Client) -> None:
    with pytest.raises(NotFound) as info:
        async with TaskProgressContext("ghost", total_steps=2):
            pytest.fail("the block must not run")
    assert "register_task" in info.value.message and "user_id" in info.value.message
    resp = await client.get("/api/task/task/ghost/status", headers=auth(1))
    assert resp.status == 404


async def test_non_json_result_is_stringified(client: Client) -> None:
    service.register_task("weird", 1, "job")
    moment = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)

    class Thing:
        def __str__(self) -> str:
            return "a thing"

    done = await service.notify_completed("weird", result={"at": moment, "what": Thing(),
                                                           "n": [1, 2.5, None]})
    expected = {"at": str(moment), "what": "a thing", "n": [1, 2.5, None]}
    assert done is not None and done["result"] == expected
    assert (await status_of(client, "weird"))["result"] == expected


async def test_without_a_running_app_the_api_says_so() -> None:
    with pytest.raises(RuntimeError, match="no taskpush app is running"):
        service.register_task("x", 1, "job")
    with pytest.raises(RuntimeError, match="no taskpush app is running"):
        await service.notify_progress("x", progress=5)

    @task_notifier(task_id="y", user_id=1, task_type="job")
    async def job() -> int:
        return 1

    with pytest.raises(RuntimeError, match="no taskpush app is running"):
        await job()
    with pytest.raises(RuntimeError, match="no taskpush app is running"):
        async with TaskProgressContext("z", user_id=1, task_type="job"):
            pass


async def test_in_process_lone_surrogate_is_a_bad_request_not_a_failed_batch(client: Any
                                                                             ) -> None:
    await task_notification_service.register_task(task_id="ip", user_id=1, task_type="t")
    with pytest.raises(BadRequest):
        await task_notification_service.notify_progress("ip", progress=5, message="\ud800")
    assert (await task_notification_service.notify_progress("ip", progress=6))["progress"] == 6
