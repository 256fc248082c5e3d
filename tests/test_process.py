"""The server as a process: real `python run.py` subprocesses on a tmp database.

Restart keeps every task, the epoch and the seq counter; SIGTERM exits 0, closes sockets
with 1001 and ends running in-process jobs as failed/interrupted (HTTP-producer tasks are
left as they were); kill -9 in the middle of a stream of writes loses no acknowledged
event and leaves a sound database; the demo secret (and so a demo token) survives.
Each runs on SQLite and on PostgreSQL (one node; tests/engines.py); what spans nodes is in
tests/test_cluster_process.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests import cluster_support
from tests.cluster_support import bearer, post
from tests.engines import Engine
from tests.procs import ServerProcess, Servers

SECRET = "process-secret-0123456789-abcdefghijklmnop"
API_KEY = "process-producer-key-0123456789"
PRODUCER = {"X-API-Key": API_KEY}
ACTIVE = {"pending", "running", "progress"}
TIMEOUT = aiohttp.ClientTimeout(total=10)




def user_token(user_id: int) -> str:
    return cluster_support.user_token(user_id, SECRET)


async def status_of(session: aiohttp.ClientSession, server: ServerProcess, task_id: str,
                    token: str) -> dict[str, Any]:
    async with session.get(f"{server.url}/api/task/task/{task_id}/status",
                           headers=bearer(token)) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
        return payload["data"]


async def wait_status(session: aiohttp.ClientSession, server: ServerProcess, task_id: str,
                      token: str, wanted: set[str], timeout: float = 10.0) -> dict[str, Any]:
    """Bounded poll until the task reaches one of `wanted`."""
    deadline = time.monotonic() + timeout
    while True:
        task = await status_of(session, server, task_id, token)
        if task["status"] in wanted:
            return task
        assert time.monotonic() < deadline, f"{task_id} stuck at {task['status']}"
        await asyncio.sleep(0.05)


async def register(session: aiohttp.ClientSession, server: ServerProcess, task_id: str,
                   user_id: int = 1, **extra: Any) -> dict[str, Any]:
    return await post(session, f"{server.url}/api/task/tasks",
                      {"task_id": task_id, "user_id": user_id, "task_type": "export", **extra},
                      PRODUCER, expect=201)


async def event(session: aiohttp.ClientSession, server: ServerProcess, task_id: str,
                **body: Any) -> dict[str, Any]:
    return await post(session, f"{server.url}/api/task/task/{task_id}/events", body, PRODUCER)


async def open_socket(session: aiohttp.ClientSession, server: ServerProcess, user_id: int,
                      token: str) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any],
                                           dict[str, Any]]:
    ws = await session.ws_connect(
        f"{server.ws_url}/api/task/ws/task/{user_id}?token={token}")
    connected = await ws.receive_json(timeout=5)
    assert connected["type"] == "connected", connected
    active = await ws.receive_json(timeout=5)
    assert active["type"] == "active_tasks", active
    return ws, connected, active


async def demo_login(session: aiohttp.ClientSession, server: ServerProcess, user_id: int
                     ) -> str:
    data = await post(session, f"{server.url}/api/demo/login", {"user_id": user_id}, {})
    return data["token"]


async def start_demo_task(session: aiohttp.ClientSession, server: ServerProcess, token: str
                          ) -> str:
    task = await post(session, f"{server.url}/api/demo/tasks", {"kind": "success"},
                      bearer(token), expect=201)
    await wait_status(session, server, task["task_id"], token, {"running", "progress"})
    return task["task_id"]


async def test_restart_keeps_tasks_epoch_and_seq(servers: Servers, engine: Engine) -> None:
    server = servers("--jwt-secret", SECRET, "--api-key", API_KEY,
                     db=engine.database()).start()
    token = user_token(1)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        await register(session, server, "a_pending", metadata={"n": 1})
        await register(session, server, "a_running")
        await event(session, server, "a_running", status="running", message="go")
        await register(session, server, "a_progress")
        await event(session, server, "a_progress", status="progress", progress=30,
                    message="a third", step="1/3")
        await register(session, server, "done")
        await event(session, server, "done", status="completed", result={"rows": 3})
        await register(session, server, "other_user", user_id=2)  # not user 1's
        ids = ["a_pending", "a_running", "a_progress", "done"]
        before = {t: await status_of(session, server, t, token) for t in ids}
        _, connected_before, _ = await open_socket(session, server, 1, token)
    seq_before = max(t["seq"] for t in before.values())
    assert connected_before["seq"] >= seq_before

    assert server.stop(timeout=10) == 0
    server.start()

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for task_id in ids:
            assert await status_of(session, server, task_id, token) == before[task_id]
        ws, connected, active = await open_socket(session, server, 1, token)
        assert connected["epoch"] == connected_before["epoch"]
        assert connected["seq"] == connected_before["seq"]
        assert active["count"] == 3
        assert sorted(t["task_id"] for t in active["tasks"]) == [
            "a_pending", "a_progress", "a_running"]
        for task in active["tasks"]:
            assert task == before[task["task_id"]]
        changed = await event(session, server, "a_progress", status="progress", progress=60)
        assert changed["seq"] > connected_before["seq"]
        pushed = await ws.receive_json(timeout=5)
        assert pushed["type"] == "task_status" and pushed["seq"] == changed["seq"]
        await ws.close()
    assert server.stop(timeout=10) == 0


async def test_sigterm_closes_sockets_and_interrupts_inprocess_jobs(servers: Servers,
                                                                    engine: Engine) -> None:
    """Demo mode, a long demo job running and an HTTP-producer task active at SIGTERM."""
    server = servers("--api-key", API_KEY, "--demo-task-seconds", "60",
                     db=engine.database()).start()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        token = await demo_login(session, server, 1)
        ws, _, _ = await open_socket(session, server, 1, token)
        demo_id = await start_demo_task(session, server, token)
        await register(session, server, "http_job")
        http_before = await event(session, server, "http_job", status="progress", progress=40,
                                  message="producer is working")

        server.signal(15)  # SIGTERM
        while True:  # updates may still be in flight; then the close
            msg = await ws.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1001
        assert await asyncio.to_thread(server.wait, 10.0) == 0
    # ended by the shutdown itself, before any restart could recover it
    assert engine.task_row(server.db, demo_id) == ("failed", "interrupted")
    assert engine.task_row(server.db, "http_job") == ("progress", None)

    server.start()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        # the demo token issued before the restart still works: the secret was kept
        demo = await status_of(session, server, demo_id, token)
        assert demo["status"] == "failed"
        assert demo["error_type"] == "interrupted"
        assert await status_of(session, server, "http_job", token) == http_before
        _, _, active = await open_socket(session, server, 1, token)
        assert [t["task_id"] for t in active["tasks"]] == ["http_job"]
    assert server.stop(timeout=10) == 0


async def test_kill9_loses_no_acknowledged_event(servers: Servers, engine: Engine) -> None:
    server = servers("--api-key", API_KEY, "--demo-task-seconds", "60",
                     db=engine.database()).start()
    acked: list[tuple[str, int]] = []
    enough = asyncio.Event()
    http_tasks = ["stream_a", "stream_b", "stream_c", "stream_batch"]

    async def single_writer(session: aiohttp.ClientSession, task_id: str) -> None:
        for n in range(1, 20000):
            try:
                async with session.post(
                    f"{server.url}/api/task/task/{task_id}/events", headers=PRODUCER,
                    json={"status": "progress", "progress": n % 100, "message": f"#{n}"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    data = (await resp.json())["data"]
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                return  # the server is gone
            acked.append((task_id, data["seq"]))
            if len(acked) >= 300:
                enough.set()

    async def batch_writer(session: aiohttp.ClientSession, task_id: str) -> None:
        for n in range(1, 2000):
            events = [{"task_id": task_id, "status": "progress", "progress": k,
                       "message": f"batch {n}"} for k in range(10)]
            try:
                async with session.post(f"{server.url}/api/task/events", headers=PRODUCER,
                                        json={"events": events}) as resp:
                    assert resp.status == 200, await resp.text()
                    results = (await resp.json())["data"]["results"]
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                return
            assert all(r["ok"] for r in results), results
            acked.extend((task_id, r["seq"]) for r in results)

    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        token = await demo_login(session, server, 1)
        demo_id = await start_demo_task(session, server, token)
        for task_id in http_tasks:
            await register(session, server, task_id)
        writers = [asyncio.create_task(single_writer(session, t)) for t in http_tasks[:3]]
        writers.append(asyncio.create_task(batch_writer(session, "stream_batch")))
        await asyncio.wait_for(enough.wait(), 30)
        server.signal(9)  # SIGKILL, while the writers are still posting
        done, _ = await asyncio.wait(writers, timeout=20)
        assert len(done) == len(writers)
        for writer in done:
            writer.result()  # no writer failed for another reason than the server's death
    assert await asyncio.to_thread(server.wait, 10.0) == -9
    assert len(acked) >= 300
    # nothing ran at kill -9: the job still looks active until the next start recovers it
    assert engine.task_row(server.db, demo_id)[0] in ACTIVE

    server.start()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for task_id in http_tasks:
            top = max((seq for t, seq in acked if t == task_id), default=0)
            task = await status_of(session, server, task_id, token)  # demo token still valid
            assert task["seq"] >= top, (task_id, task["seq"], top)
            assert task["status"] == "progress"  # an HTTP producer's task is left alone
        demo = await status_of(session, server, demo_id, token)
        assert demo["status"] == "failed" and demo["error_type"] == "interrupted"
    assert server.stop(timeout=10) == 0

    engine.check_integrity(server.db)
    stored = engine.stored_events(server.db)
    missing = [pair for pair in acked if pair not in stored]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
