"""The HTTP producer client (server.producer_client) against a real server.

Transient failures are real too: a TCP proxy on loopback that cuts the connection after
forwarding a request (the server committed, the answer is lost), and a port where nothing
listens until the server starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.service.producer_client import (
    HttpBackend,
    RemoteTaskNotificationService,
    TaskCancelled,
    TaskProgressContext,
    task_notifier,
)
from server.service.producer_client import task_notification_service as remote
from tests.conftest import API_KEY, auth, handshake, recv_until, ws_connect


@pytest.fixture
async def service(client: Any) -> Any:
    svc = RemoteTaskNotificationService()
    svc.configure(str(client.make_url("")), API_KEY, backoff=0.01)
    yield svc
    await svc.close()


async def history(client: Any, task_id: str, user: int = 1) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/task/task/{task_id}/history", headers=auth(user))
    assert resp.status == 200
    return (await resp.json())["data"]["events"]


async def test_manual_calls_reach_the_socket(client: Any, service: Any) -> None:
    ws = await ws_connect(client, 1)
    await handshake(ws)
    service.register_task(task_id="r1", user_id=1, task_type="resume_parsing")
    await service.notify_started("r1")
    await service.notify_progress("r1", progress=50, message="half", step="Step 1/2")
    await service.notify_completed("r1", result={"pages": 3})
    seen = await recv_until(ws, lambda m: m.get("status") == "completed")
    assert [m["status"] for m in seen] == ["pending", "running", "progress", "completed"]
    assert seen[-1]["result"] == {"pages": 3}
    await ws.close()


async def test_decorator_and_context_use_the_configured_server(client: Any) -> None:
    remote.configure(str(client.make_url("")), API_KEY, backoff=0.01)
    try:
        @task_notifier(task_id="d1", user_id=1, task_type="interview_generation")
        async def job() -> list[str]:
            return ["q1"]

        assert await job() == ["q1"]
        remote.register_task(task_id="c1", user_id=1, task_type="interview_generation")
        async with TaskProgressContext("c1", total_steps=2) as progress:
            await progress.increment("one")
            await progress.increment("two")
    finally:
        await remote.close()
    assert [e["status"] for e in await history(client, "d1")] == ["pending", "running",
                                                                  "completed"]
    c1 = await history(client, "c1")
    assert [e["progress"] for e in c1] == [0, 0, 50, 100, 100]
    assert c1[-1]["status"] == "completed"


async def test_user_cancel_raises_in_the_worker(client: Any, service: Any) -> None:
    service.register_task(task_id="x1", user_id=1, task_type="t")
    await service.notify_started("x1")
    resp = await client.post("/api/task/task/x1/cancel", headers=auth(1))
    assert resp.status == 200
    with pytest.raises(TaskCancelled):
        await service.notify_progress("x1", progress=10)
    # the terminal report that follows a cancellation is ignored, not raised
    assert await service.notify_cancelled("x1") is None
    assert (await history(client, "x1"))[-1]["status"] == "cancelled"


async def _cutting_proxy(target_port: int, cuts: int) -> tuple[asyncio.Server, int, list[int]]:
    """Forward each connection to the server; for the first `cuts` connections, forward
    the request but drop the answer and close (the client sees a disconnect)."""
    counter = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counter[0] += 1
        cut = counter[0] <= cuts
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()

        upstream = asyncio.create_task(pump(reader, up_writer))
        try:
            if cut:
                await up_reader.read(1)  # the server answered: it has committed
                writer.transport.abort()
            else:
                await pump(up_reader, writer)
        finally:
            upstream.cancel()
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, counter


async def test_retry_after_lost_answer_records_the_event_once(client: Any) -> None:
    backend = HttpBackend("http://unused", API_KEY, backoff=0.01)
    direct = HttpBackend(str(client.make_url("")), API_KEY)
    await direct.register("once", 1, "t", None)
    proxy, port, counter = await _cutting_proxy(client.port, cuts=1)
    backend.base_url = f"http://127.0.0.1:{port}"
    try:
        task = await backend.change("once", {"status": "progress", "progress": 30})
    finally:
        proxy.close()
        await proxy.wait_closed()
        await backend.close()
        await direct.close()
    assert counter[0] >= 2  # the first attempt was cut, a retry went through
    assert task is not None and task["progress"] == 30
    events = await history(client, "once")
    assert [e["status"] for e in events] == ["pending", "progress"]  # not two progress rows


async def test_waits_for_a_server_that_is_not_up_yet(config: Any) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = HttpBackend(f"http://127.0.0.1:{port}", API_KEY, retries=8, backoff=0.05)
    runner = web.AppRunner(create_app(config))
    first = asyncio.create_task(backend.register("late", 1, "t", None))
    try:
        await asyncio.sleep(0.05)  # let the first attempt be refused
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        task = await asyncio.wait_for(first, 10)
        assert task["task_id"] == "late" and task["status"] == "pending"
    finally:
        await backend.close()
        await runner.cleanup()


async def test_unconfigured_client_says_how_to_configure(monkeypatch: Any) -> None:
    monkeypatch.delenv("TASKPUSH_URL", raising=False)
    monkeypatch.delenv("TASKPUSH_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="TASKPUSH_URL"):
        await RemoteTaskNotificationService().notify_started("x")
