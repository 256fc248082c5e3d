"""A client that stops reading must not cost the server memory or delay anyone else.

Real server process (so its RSS can be read), a raw TCP WebSocket client that completes the
handshake and then never reads, 10,000 updates of ~2.5 KB each for its user (25 MB if they
were buffered), and a second user's normal client that must still be served. The
process-level tests run on SQLite and on PostgreSQL (tests/engines.py); across nodes:
tests/test_cluster_process.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp

from tests.conftest import API_KEY, SECRET, make_token
from tests.engines import Engine
from tests.procs import ServerProcess
from tests.support import rss_kb, stuck_client

UPDATES = 10_000
TASKS = 50
BATCH = 250


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_stuck_client_is_cut_off_others_served_memory_bounded(servers: Any,
                                                                    engine: Engine) -> None:
    server: ServerProcess = servers("--jwt-secret", SECRET, "--api-key", API_KEY,
                                    "--send-timeout", "2", "--log-level", "warning",
                                    "--access-log", "false", db=engine.database())
    server.start()
    producer = {"X-API-Key": API_KEY}
    async with aiohttp.ClientSession() as http:
        for n in range(TASKS):
            async with http.post(server.url + "/api/task/tasks", headers=producer,
                                 json={"task_id": f"big{n}", "user_id": 1,
                                       "task_type": "t"}) as resp:
                assert resp.status == 201
        async with http.post(server.url + "/api/task/tasks", headers=producer,
                             json={"task_id": "other", "user_id": 2, "task_type": "t"}) as r:
            assert r.status == 201
        stuck = stuck_client(server.port, 1)
        other = await http.ws_connect(
            f"{server.ws_url}/api/task/ws/task/2?token={make_token(2)}")
        before = rss_kb(server.proc.pid)  # type: ignore[union-attr]
        text = "x" * 2000
        step = "s" * 500
        for start in range(0, UPDATES, BATCH):
            events = [{"task_id": f"big{(start + i) % TASKS}", "status": "progress",
                       "progress": ((start + i) // TASKS) % 100, "message": text,
                       "step": step} for i in range(BATCH)]
            async with http.post(server.url + "/api/task/events", headers=producer,
                                 json={"events": events}) as resp:
                assert resp.status == 200
                assert all(r["ok"] for r in (await resp.json())["data"]["results"])
        # the other user is served while the stuck client is still attached or being cut off
        async with http.post(server.url + "/api/task/task/other/events", headers=producer,
                             json={"status": "completed"}) as resp:
            assert resp.status == 200
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            msg = json.loads((await other.receive(timeout=10)).data)
            if msg.get("task_id") == "other" and msg.get("status") == "completed":
                break
            assert asyncio.get_running_loop().time() < deadline
        # the stuck socket is closed by the server (4408 path), not kept forever
        for _ in range(200):
            if server.health()["connections"] == 1:
                break
            await asyncio.sleep(0.05)
        assert server.health()["connections"] == 1
        after = rss_kb(server.proc.pid)  # type: ignore[union-attr]
        assert await metric(http, server.url, "taskpush_slow_consumers_closed_total") >= 1
        await other.close()
        stuck.close()
    growth_mb = (after - before) / 1024
    print(f"RSS growth {growth_mb:.1f} MB")
    # 10,000 x 2.5 KB buffered for the stuck client would be ~25 MB
    assert growth_mb < 15, f"server RSS grew {growth_mb:.1f} MB"
    assert server.stop() == 0


async def test_sigterm_with_a_stuck_client_exits_promptly(servers: Any, engine: Engine) -> None:
    """Shutdown must not wait forever on a peer that does not read (exit 0 within 10 s)."""
    server: ServerProcess = servers("--jwt-secret", SECRET, "--api-key", API_KEY,
                                    "--log-level", "warning", "--access-log", "false",
                                    db=engine.database())
    server.start()
    producer = {"X-API-Key": API_KEY}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.url + "/api/task/tasks", headers=producer,
                             json={"task_id": "s1", "user_id": 1, "task_type": "t"}) as resp:
            assert resp.status == 201
        stuck = stuck_client(server.port, 1)
        for n in range(20):  # distinct statuses are never merged: they pile up unsent
            events = [{"task_id": "s1", "status": ("running", "progress")[i % 2],
                       "progress": i % 100, "message": "y" * 2000} for i in range(BATCH)]
            async with http.post(server.url + "/api/task/events", headers=producer,
                                 json={"events": events}) as resp:
                assert resp.status == 200, n
    try:
        assert server.stop(timeout=10) == 0
    finally:
        stuck.close()


async def test_a_silent_peer_left_backed_up_by_direct_writes_is_cut_off(make_client) -> None:
    """Direct writes fill the transport and leave no sender task: the unread backlog still
    counts as a stuck send, so the socket is closed 4408 after --send-timeout (found in
    review: it was neither pinged nor timed out)."""
    from server.core.model import Change, Register
    from server.web import keys
    from server.web.connection import DIRECT_WRITE_LIMIT

    client = await make_client(send_timeout=0.5)
    app = client.server.app
    store = app[keys.STORE]
    await store.submit(Register("t", 1, "job"))
    loop = asyncio.get_running_loop()
    stuck = await loop.run_in_executor(None, stuck_client, client.server.port, 1)
    try:
        deadline = loop.time() + 10
        while not app[keys.SOCKETS]:
            assert loop.time() < deadline, "the stuck client never attached"
            await asyncio.sleep(0.02)
        (conn,) = app[keys.SOCKETS]
        text = "x" * 2000
        for n in range(20_000):
            await store.submit(Change("t", "progress", progress=n % 100, message=f"{n}{text}"))
            if conn.backed_up():
                break
        assert conn.transport.get_write_buffer_size() >= DIRECT_WRITE_LIMIT
        assert conn._sender is None and conn.session.send_started == 0.0  # nothing is "sending"
        while not conn.closing:
            assert loop.time() < deadline, "a backed-up silent peer was never cut off"
            await asyncio.sleep(0.05)
    finally:
        stuck.close()
