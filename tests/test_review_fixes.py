"""Regression tests for defects found in review: each failed before its fix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server import keys
from server.accesslog import redact
from server.errors import BadRequest
from server.notify import task_notification_service
from tests.conftest import (
    PRODUCER,
    auth,
    event,
    handshake,
    recv,
    recv_until,
    register,
    ws_connect,
)


async def test_reused_task_id_of_another_user_is_never_pushed(client: Any) -> None:
    """User 1 subscribed to its task; the id is deleted and registered again for user 2:
    user 1 must not receive user 2's task."""
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await register(client, "shared", 1)
    await event(client, "shared", "completed")
    await ws.send_str(json.dumps({"type": "subscribe", "task_id": "shared"}))
    await recv_until(ws, lambda m: m["type"] == "subscribed")
    resp = await client.delete("/api/task/task/shared", headers=auth(1))
    assert resp.status == 200
    await recv_until(ws, lambda m: m["type"] == "task_deleted")
    await register(client, "shared", 2, metadata={"secret": "of user 2"})
    await event(client, "shared", "progress", progress=10, message="user 2 only")
    await register(client, "marker", 1)  # the next thing user 1 may see
    seen = await recv_until(ws, lambda m: m.get("task_id") == "marker")
    assert all(m.get("user_id") in (None, 1) for m in seen), seen
    await ws.close()


async def test_subscribe_racing_updates_of_another_users_task_leaks_nothing(client: Any
                                                                            ) -> None:
    await register(client, "victim", 2, metadata={"ssn": "123"})
    ws = await ws_connect(client, 1)
    await handshake(ws)
    stop = asyncio.Event()

    async def produce() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await client.post("/api/task/task/victim/events", headers=PRODUCER,
                              json={"status": "progress", "progress": n % 100})

    producers = [asyncio.create_task(produce()) for _ in range(3)]
    try:
        for _ in range(40):
            await ws.send_str(json.dumps({"type": "subscribe", "task_id": "victim"}))
            answer = await recv(ws)
            assert answer == {"type": "error", "code": "forbidden",
                              "message": "no such task of yours to subscribe to"}, answer
    finally:
        stop.set()
        await asyncio.gather(*producers)
    await register(client, "marker", 1)
    seen = await recv_until(ws, lambda m: m.get("task_id") == "marker")
    assert all(m.get("task_id") != "victim" for m in seen), seen
    await ws.close()


async def test_resume_with_more_changes_than_the_control_queue(client: Any) -> None:
    ws = await ws_connect(client, 7)
    connected, _ = await handshake(ws)
    await ws.close()
    events = []
    for n in range(300):
        await register(client, f"bulk{n}", 7)
        events.append({"task_id": f"bulk{n}", "status": "completed"})
    resp = await client.post("/api/task/events", headers=PRODUCER, json={"events": events})
    assert resp.status == 200
    ws = await ws_connect(client, 7, query=f"since={connected['seq']}")
    await handshake(ws)
    replayed = [await recv(ws) for _ in range(300)]
    assert {m["task_id"] for m in replayed} == {f"bulk{n}" for n in range(300)}
    assert all(m["type"] == "task_status" and m["status"] == "completed" for m in replayed)
    await ws.send_str('{"type":"ping"}')
    assert (await recv(ws))["type"] == "pong"  # still open
    await ws.close()


async def test_lone_surrogate_is_refused_alone_and_others_are_applied(client: Any) -> None:
    await register(client, "good", 1)
    await register(client, "bad", 1)
    body = ('{"events": [{"task_id": "good", "status": "running"},'
            ' {"task_id": "bad", "status": "running", "message": "\\ud800"}]}')
    resp = await client.post("/api/task/events", headers={**PRODUCER,
                             "Content-Type": "application/json"}, data=body)
    assert resp.status == 400  # the body itself is not storable text
    single = await client.post("/api/task/task/bad/events",
                               headers={**PRODUCER, "Content-Type": "application/json"},
                               data='{"status": "running", "message": "\\udfff"}')
    assert single.status == 400
    ok = await client.post("/api/task/events", headers=PRODUCER,
                           json={"events": [{"task_id": "good", "status": "running"}]})
    assert ok.status == 200 and (await ok.json())["data"]["results"][0]["ok"]
    assert (await client.get("/healthz")).status == 200


async def test_in_process_lone_surrogate_is_a_bad_request_not_a_failed_batch(client: Any
                                                                             ) -> None:
    await task_notification_service.register_task(task_id="ip", user_id=1, task_type="t")
    with pytest.raises(BadRequest):
        await task_notification_service.notify_progress("ip", progress=5, message="\ud800")
    assert (await task_notification_service.notify_progress("ip", progress=6))["progress"] == 6


def test_redact_when_the_path_contains_an_equals_sign() -> None:
    line = redact("/api/task/task/a=b/status?token=SUPERSECRET&x=1")
    assert "SUPERSECRET" not in line and line.endswith("?token=[redacted]&x=1")


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

