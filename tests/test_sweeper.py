"""The sweeper (server/web/jobs.py) against a running app: stale active tasks are failed with
error_type "stale" and pushed, finished tasks past retention are deleted (pushed as
task_deleted, history gone), and forgotten tombstones make an old `since` resync.

The periodic loop is given a huge interval; each test calls `sweep_once(app)` itself after
letting the (tiny) configured ages pass.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
from aiohttp import web

from server.web import keys
from server.web.jobs import sweep_once
from tests.conftest import (
    MakeClient,
    auth,
    event,
    handshake,
    recv,
    recv_until,
    register,
    ws_connect,
)

RETENTION_DAYS = 1e-5  # 0.864 s
RETENTION_SECONDS = RETENTION_DAYS * 86400


def app_of(client: Any) -> web.Application:
    return client.server.app


def db_rows(app: web.Application, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(app[keys.CONFIG].db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def test_stale_active_task_is_failed_and_pushed(make_client: MakeClient) -> None:
    client = await make_client(stale_after=0.5, sweep_interval=3600)
    app = app_of(client)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await register(client, "quiet", 1)
    await event(client, "quiet", "progress", progress=30, message="working")
    await register(client, "busy", 1)
    await register(client, "done", 1)
    await event(client, "done", "completed", result={"ok": True})
    await recv_until(ws, lambda m: m.get("task_id") == "done" and m["status"] == "completed")

    await asyncio.sleep(0.7)  # let stale_after pass for every task ...
    await event(client, "busy", "progress", progress=10)  # ... but this one just moved
    await recv_until(ws, lambda m: m.get("task_id") == "busy" and m.get("progress") == 10)

    marked, deleted = await sweep_once(app)
    assert (marked, deleted) == (1, 0)

    pushed = await recv(ws)
    assert pushed["type"] == "task_status" and pushed["task_id"] == "quiet"
    assert pushed["status"] == "failed" and pushed["error_type"] == "stale"
    assert pushed["progress"] == 30 and "0.5" in pushed["error"]

    # the recent and the finished ones were left alone: nothing else arrives before this
    await register(client, "marker", 1)
    later = await recv_until(ws, lambda m: m.get("task_id") == "marker")
    assert [m["task_id"] for m in later] == ["marker"]
    for task_id, status in (("busy", "progress"), ("done", "completed"),
                            ("quiet", "failed")):
        resp = await client.get(f"/api/task/task/{task_id}/status", headers=auth(1))
        assert resp.status == 200
        assert (await resp.json())["data"]["status"] == status
    # the stale failure is final like any other
    resp = await client.post("/api/task/task/quiet/events", headers={"X-API-Key": (
        app[keys.CONFIG].api_key.reveal())}, json={"status": "progress", "progress": 40})
    assert resp.status == 409
    await ws.close()


async def test_finished_task_past_retention_is_deleted(make_client: MakeClient) -> None:
    client = await make_client(retention_days=RETENTION_DAYS, stale_after=3600,
                               sweep_interval=3600)
    app = app_of(client)
    await register(client, "old", 1)
    await event(client, "old", "progress", progress=50)
    await event(client, "old", "completed", result={"n": 1})
    await register(client, "old_active", 1)  # old but active: retention is not for it
    await register(client, "recent", 1)
    assert db_rows(app, "SELECT count(*) FROM events WHERE task_id = 'old'") == [(3,)]

    await asyncio.sleep(RETENTION_SECONDS + 0.2)
    await event(client, "recent", "failed", error="boom")  # finished just now
    ws = await ws_connect(client, 1)
    connected, _ = await handshake(ws)

    marked, deleted = await sweep_once(app)
    assert (marked, deleted) == (0, 1)
    assert await recv(ws) == {"type": "task_deleted", "task_id": "old"}

    resp = await client.get("/api/task/task/old/status", headers=auth(1))
    assert resp.status == 404
    assert (await resp.json()) == {"code": 404, "message": "task old not found", "data": None}
    resp = await client.get("/api/task/task/old/history", headers=auth(1))
    assert resp.status == 404
    assert db_rows(app, "SELECT count(*) FROM tasks WHERE task_id = 'old'") == [(0,)]
    assert db_rows(app, "SELECT count(*) FROM events WHERE task_id = 'old'") == [(0,)]
    assert db_rows(app, "SELECT task_id, user_id FROM tombstones") == [("old", 1)]
    for task_id in ("old_active", "recent"):
        resp = await client.get(f"/api/task/task/{task_id}/status", headers=auth(1))
        assert resp.status == 200, task_id

    # a client that was away learns of the deletion when it resumes
    back = await ws_connect(client, 1, query=f"since={connected['seq']}"
                                              f"&epoch={connected['epoch']}")
    await handshake(back)
    assert await recv(back) == {"type": "task_deleted", "task_id": "old"}
    await back.close()
    await ws.close()


@pytest.mark.slow  # takes seconds
async def test_since_older_than_purged_tombstones_resyncs(make_client: MakeClient) -> None:
    client = await make_client(retention_days=RETENTION_DAYS, stale_after=3600,
                               sweep_interval=3600)
    app = app_of(client)
    await register(client, "gone", 1)
    await event(client, "gone", "completed")
    await register(client, "kept", 1)
    ws = await ws_connect(client, 1)
    connected, _ = await handshake(ws)
    since, epoch = connected["seq"], connected["epoch"]
    await ws.close()

    await asyncio.sleep(RETENTION_SECONDS + 0.2)
    assert await sweep_once(app) == (0, 1)  # deleted; its tombstone is young
    await asyncio.sleep(RETENTION_SECONDS + 0.2)
    assert await sweep_once(app) == (0, 0)  # now the tombstone is forgotten
    assert db_rows(app, "SELECT count(*) FROM tombstones") == [(0,)]
    horizon = int(db_rows(app, "SELECT value FROM settings WHERE key = 'horizon'")[0][0])
    assert horizon > since

    ws = await ws_connect(client, 1, query=f"since={since}&epoch={epoch}")
    first = await recv(ws)
    assert first["type"] == "connected" and first["epoch"] == epoch
    assert await recv(ws) == {"type": "resync"}
    active = await recv(ws)
    assert active["type"] == "active_tasks"
    assert [t["task_id"] for t in active["tasks"]] == ["kept"]
    # live updates follow as usual
    await event(client, "kept", "running")
    assert (await recv(ws))["status"] == "running"
    await ws.close()

    # a since at the horizon is still resumable: no resync, the change after it replayed
    ws = await ws_connect(client, 1, query=f"since={horizon}&epoch={epoch}")
    await handshake(ws)
    replayed = await recv(ws)
    assert (replayed["task_id"], replayed["status"]) == ("kept", "running")
    await register(client, "after", 1)
    assert (await recv(ws))["task_id"] == "after"
    await ws.close()

    resp = await client.get(f"/api/task/tasks?since={since}", headers=auth(1))
    assert (await resp.json())["data"]["resync"] is True
    resp = await client.get(f"/api/task/tasks?since={horizon}", headers=auth(1))
    assert (await resp.json())["data"]["resync"] is False


async def test_a_task_that_moves_between_the_sweeps_read_and_write_stays_alive(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """The stale sweep reads its candidates, then writes `failed` with `expect_seq`: a
    producer's event committed in between must win (the task is alive), not be overwritten
    by a stale verdict taken from the older read. The producer's event is posted over HTTP
    exactly when the sweep's read has returned (the real store, the real request)."""
    client = await make_client(stale_after=0.3, sweep_interval=3600)
    app = app_of(client)
    store = app[keys.STORE]
    await register(client, "racing", 1)
    await event(client, "racing", "progress", progress=10)
    await register(client, "quiet", 1)
    await event(client, "quiet", "progress", progress=20)
    await asyncio.sleep(0.5)  # both are stale candidates now

    read_active_before = store.active_before
    read: list[str] = []

    async def read_then_producer_moves(updated_before: str, limit: int = 500) -> list[Any]:
        rows = await read_active_before(updated_before, limit)
        read.extend(row.task_id for row in rows)
        await event(client, "racing", "progress", progress=60, message="still here")
        return rows

    monkeypatch.setattr(store, "active_before", read_then_producer_moves)
    marked, _ = await sweep_once(app)
    assert sorted(read) == ["quiet", "racing"]  # the sweep did see it as stale
    assert marked == 1
    statuses = {}
    for task_id in ("racing", "quiet"):
        resp = await client.get(f"/api/task/task/{task_id}/status", headers=auth(1))
        statuses[task_id] = (await resp.json())["data"]
    assert statuses["racing"]["status"] == "progress"
    assert statuses["racing"]["progress"] == 60 and statuses["racing"]["error_type"] is None
    assert statuses["quiet"]["status"] == "failed"
    assert statuses["quiet"]["error_type"] == "stale"


async def test_the_periodic_sweep_runs_only_while_the_store_says_this_node_leads(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """Cluster mode runs the sweeps on one node (`store.lead("sweep")`); a node that does
    not lead skips its passes and takes over when it does."""
    client = await make_client(stale_after=0.2, sweep_interval=0.05)
    store = app_of(client)[keys.STORE]
    asked: list[str] = []
    leads = False

    async def lead(name: str) -> bool:
        asked.append(name)
        return leads

    monkeypatch.setattr(store, "lead", lead)
    await register(client, "quiet", 1)
    loop = asyncio.get_running_loop()
    stale_from = loop.time() + 0.2

    async def status() -> str:
        task = await store.get_task("quiet")
        return task.status

    deadline = loop.time() + 10
    while loop.time() < stale_from or len(asked) < 3:  # passes due while the task is stale
        assert loop.time() < deadline, "the sweep loop stopped asking"
        await asyncio.sleep(0.02)
    assert set(asked) == {"sweep"}
    assert await status() == "pending"  # not this node's job
    leads = True
    while await status() != "failed":
        assert loop.time() < deadline, "the leading node never swept"
        await asyncio.sleep(0.02)
