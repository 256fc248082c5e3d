"""Storage failures, on real SQLite files: a write lock held elsewhere, a full disk, a
delete of a long history.

Another connection in this process holds `BEGIN IMMEDIATE` on the server's database file,
exactly as a `sqlite3` shell or another program would; a full disk is SQLite's own
SQLITE_FULL, from `PRAGMA max_page_count` set on the writer connection. Writes then answer
503 with the envelope and a Retry-After, within --db-timeout; /healthz answers 503 from the
state the store keeps; reads and WebSocket connects are not queued behind the stuck writer;
one log line begins the outage and one ends it; everything recovers by itself, with nothing
acknowledged lost and nothing acknowledged that was not committed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from server.core.errors import StorageUnavailable, TaskPushError
from server.core.model import Change
from server.service.notify import TaskProgressContext, task_notification_service
from server.service.producer_client import HttpBackend
from server.web import keys
from tests.conftest import (
    API_KEY,
    PRODUCER,
    MakeClient,
    auth,
    event,
    handshake,
    register,
    ws_connect,
)
from tests.support import until

HANG = 15.0  # bound that only catches a hang; nothing here asserts a speed
LOCKED = "storage unavailable: database is locked by another process"
FULL = "storage unavailable: database or disk is full"


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "taskpush.db"  # the `config` fixture's database


@pytest.fixture
def lock_holder(db_file: Path) -> Iterator[sqlite3.Connection]:
    """A second connection to the server's file; `.execute("BEGIN IMMEDIATE")` takes the
    write lock the way another process would. Rolled back and closed at the end."""
    conn = sqlite3.connect(str(db_file), isolation_level=None, check_same_thread=False)
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


@pytest.fixture
def store_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """(lines that began an outage, lines that ended one), and no traceback anywhere."""
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "cannot rollback" in m]
    began = [m for m in messages if m.startswith("storage unavailable")]
    ended = [m for m in messages if m.startswith("storage available again")]
    return began, ended


async def health(client: Any) -> tuple[int, dict[str, Any]]:
    resp = await asyncio.wait_for(client.get("/healthz"), HANG)
    return resp.status, await resp.json()


async def healthy(client: Any) -> bool:
    return (await health(client))[0] == 200


async def events_of(db_file: Path, task_id: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(str(db_file))
    try:
        return conn.execute("SELECT seq, status, progress FROM events WHERE task_id = ?"
                            " ORDER BY seq", (task_id,)).fetchall()
    finally:
        conn.close()


async def assert_503(resp: Any, message: str) -> None:
    assert resp.status == 503, await resp.text()
    assert int(resp.headers["Retry-After"]) >= 1
    assert await resp.json() == {"code": 503, "message": message, "data": None}


# ---- another process holds the write lock ----------------------------------------------


@pytest.mark.slow  # takes seconds
async def test_a_held_lock_answers_503_and_everything_else_keeps_serving(
        make_client: MakeClient, lock_holder: sqlite3.Connection, db_file: Path,
        store_log: pytest.LogCaptureFixture) -> None:
    client = await make_client(db_timeout=0.5)
    await register(client, "t", 1)
    await event(client, "t", "progress", progress=10)
    before = await events_of(db_file, "t")

    lock_holder.execute("BEGIN IMMEDIATE")
    resp = await asyncio.wait_for(client.post("/api/task/task/t/events", headers=PRODUCER,
                                              json={"status": "progress", "progress": 20}),
                                  HANG)
    await assert_503(resp, LOCKED)
    # the batch form: the whole batch answers 503, nothing in it acknowledged
    resp = await client.post("/api/task/events", headers=PRODUCER, json={"events": [
        {"task_id": "t", "status": "progress", "progress": 30},
        {"task_id": "t", "status": "progress", "progress": 40}]})
    await assert_503(resp, LOCKED)
    # in-process producers get a type of their own
    with pytest.raises(StorageUnavailable, match="locked by another process"):
        await task_notification_service.notify_progress("t", progress=50)

    status, body = await health(client)
    assert status == 503 and body["status"] == "unavailable" and body["message"] == LOCKED
    ws = await ws_connect(client, 1)
    _, active = await asyncio.wait_for(handshake(ws), HANG)
    assert [t["task_id"] for t in active["tasks"]] == ["t"]
    assert active["tasks"][0]["progress"] == 10
    resp = await client.get("/api/task/task/t/status", headers=auth(1))
    assert resp.status == 200 and (await resp.json())["data"]["progress"] == 10
    resp = await client.get("/api/task/tasks", headers=auth(1))
    assert resp.status == 200 and (await resp.json())["data"]["count"] == 1

    lock_holder.execute("ROLLBACK")
    await until(lambda: healthy(client), "/healthz 200 after the lock is released")
    assert (await event(client, "t", "progress", progress=60))["progress"] == 60
    after = await events_of(db_file, "t")
    assert [row[2] for row in after[len(before):]] == [60]  # the refused ones: not stored
    began, ended = outage_lines(store_log)
    assert len(began) == 1 and "locked by another process" in began[0]
    assert len(ended) == 1
    await ws.close()


async def test_reads_and_connects_are_not_queued_behind_a_writer_waiting_for_the_lock(
        make_client: MakeClient, lock_holder: sqlite3.Connection) -> None:
    """With a long --db-timeout a write waits for the lock on the writer's thread; every
    read meanwhile (a connect's snapshot, a list, /healthz) is answered while it waits."""
    client = await make_client(db_timeout=60)
    store = client.app[keys.STORE]
    await register(client, "t", 1)
    lock_holder.execute("BEGIN IMMEDIATE")
    write = asyncio.create_task(client.post("/api/task/task/t/events", headers=PRODUCER,
                                            json={"status": "progress", "progress": 5}))

    async def writer_waits() -> bool:
        return store._write_lock.locked()  # a batch is on the writer's thread, waiting

    await until(writer_waits, "the write waits for the lock on the writer's thread")
    ws = await ws_connect(client, 1)
    _, active = await asyncio.wait_for(handshake(ws), HANG)
    assert [t["task_id"] for t in active["tasks"]] == ["t"]
    resp = await asyncio.wait_for(client.get("/api/task/tasks", headers=auth(1)), HANG)
    assert resp.status == 200
    assert (await health(client))[0] == 200  # nothing has failed yet
    resp = await asyncio.wait_for(client.get("/api/task/task/t/history", headers=auth(1)),
                                  HANG)
    assert resp.status == 200
    assert not write.done()  # all of that while the write still waited
    lock_holder.execute("COMMIT")
    resp = await asyncio.wait_for(write, HANG)
    assert resp.status == 200
    await ws.close()


async def test_a_lock_freed_within_the_timeout_costs_nothing(
        make_client: MakeClient, lock_holder: sqlite3.Connection,
        store_log: pytest.LogCaptureFixture) -> None:
    client = await make_client(db_timeout=60)
    store = client.app[keys.STORE]
    await register(client, "t", 1)
    lock_holder.execute("BEGIN IMMEDIATE")
    write = asyncio.create_task(client.post("/api/task/task/t/events", headers=PRODUCER,
                                            json={"status": "progress", "progress": 5}))

    async def writer_waits() -> bool:
        return store._write_lock.locked()

    await until(writer_waits, "the write waits for the lock")
    lock_holder.execute("COMMIT")
    assert (await asyncio.wait_for(write, HANG)).status == 200
    assert outage_lines(store_log) == ([], [])


async def test_in_process_jobs_keep_their_own_exception_and_learn_of_a_lost_completion(
        make_client: MakeClient, lock_holder: sqlite3.Connection) -> None:
    """A job that failed keeps raising its own exception when its failure cannot be stored;
    a job that succeeded raises StorageUnavailable when its completion cannot be."""
    client = await make_client(db_timeout=0.3)
    await register(client, "failing", 1)
    await register(client, "succeeding", 1)
    with pytest.raises(ValueError, match="the job's own error"):
        async with TaskProgressContext("failing", total_steps=2):
            lock_holder.execute("BEGIN IMMEDIATE")
            raise ValueError("the job's own error")
    lock_holder.execute("ROLLBACK")
    with pytest.raises(StorageUnavailable):
        async with TaskProgressContext("succeeding", total_steps=2):
            lock_holder.execute("BEGIN IMMEDIATE")
    lock_holder.execute("ROLLBACK")
    for task_id in ("failing", "succeeding"):  # neither end was recorded
        resp = await client.get(f"/api/task/task/{task_id}/status", headers=auth(1))
        assert (await resp.json())["data"]["status"] == "running"


# ---- disk full -------------------------------------------------------------------------


async def test_a_full_disk_answers_503_logs_once_and_recovers(
        make_client: MakeClient, db_file: Path, store_log: pytest.LogCaptureFixture) -> None:
    client = await make_client(db_timeout=0.5)
    store = client.app[keys.STORE]
    await register(client, "t", 1)
    wconn = store._wconn

    async def on_writer(sql: str) -> None:  # alone on the writer connection (not mid-probe)
        async with store._write_lock:
            wconn.execute(sql)

    (pages,) = wconn.execute("PRAGMA page_count").fetchone()
    await on_writer(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL on the next new page
    big = {"blob": "x" * 40_000}  # needs fresh (overflow) pages
    for n in range(3):
        resp = await client.post("/api/task/tasks", headers=PRODUCER, json={
            "task_id": f"big{n}", "user_id": 1, "task_type": "job", "metadata": big})
        await assert_503(resp, FULL)
    status, body = await health(client)
    assert status == 503 and body["message"] == FULL
    metrics = await (await client.get("/metrics")).text()
    assert "taskpush_storage_available 0.0" in metrics
    ws = await ws_connect(client, 1)
    await asyncio.wait_for(handshake(ws), HANG)
    with pytest.raises(StorageUnavailable, match="disk is full"):
        await task_notification_service.register_task("big-inproc", 1, "job", big)

    await on_writer("PRAGMA max_page_count = 1073741823")  # space again
    await until(lambda: healthy(client), "/healthz 200 once there is space")
    created = await register(client, "big0", 1, task_type="job", metadata=big)
    assert "taskpush_storage_available 1.0" in await (await client.get("/metrics")).text()
    assert created["metadata"] == big
    began, ended = outage_lines(store_log)
    assert len(began) == 1 and "disk is full" in began[0] and len(ended) == 1
    conn = sqlite3.connect(str(db_file))
    try:  # nothing refused was stored; what was acknowledged is; the file is sound
        ids = [r[0] for r in conn.execute("SELECT task_id FROM tasks ORDER BY task_id")]
        assert ids == ["big0", "t"]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    await ws.close()


# ---- the producer client ----------------------------------------------------------------


async def test_the_producer_client_retries_503_until_the_lock_frees(
        make_client: MakeClient, lock_holder: sqlite3.Connection, db_file: Path) -> None:
    client = await make_client(db_timeout=0.2)
    store = client.app[keys.STORE]
    await register(client, "t", 1)
    backend = HttpBackend(str(client.make_url("")), API_KEY, retries=50, backoff=0.05)
    try:
        lock_holder.execute("BEGIN IMMEDIATE")
        call = asyncio.create_task(backend.change("t", {"status": "progress", "progress": 7}))

        async def refused() -> bool:
            return store.unavailable() is not None  # a write was answered 503

        await until(refused, "the client's first attempt is refused")
        assert not call.done()  # it retries
        lock_holder.execute("ROLLBACK")
        task = await asyncio.wait_for(call, HANG)
        assert task is not None and task["progress"] == 7
    finally:
        await backend.close()
    assert [row[2] for row in await events_of(db_file, "t")] == [0, 7]  # recorded once


async def test_the_producer_client_does_not_retry_a_500(aiohttp_client: Any) -> None:
    hits = {"500": 0, "503": 0}

    async def bug(request: web.Request) -> web.Response:
        hits["500"] += 1
        return web.json_response({"code": 500, "message": "internal server error",
                                  "data": None}, status=500)

    async def busy(request: web.Request) -> web.Response:
        hits["503"] += 1
        return web.json_response({"code": 503, "message": LOCKED, "data": None}, status=503,
                                 headers={"Retry-After": "1"})

    app = web.Application()
    app.router.add_post("/500/api/task/task/{task_id}/events", bug)
    app.router.add_post("/503/api/task/task/{task_id}/events", busy)
    stub = await aiohttp_client(app)
    for kind, attempts in (("500", 1), ("503", 3)):
        backend = HttpBackend(str(stub.make_url(f"/{kind}")), API_KEY, retries=2,
                              backoff=0.01)
        try:
            with pytest.raises(TaskPushError):
                await backend.change("t", {"status": "progress", "progress": 1})
        finally:
            await backend.close()
        assert hits[kind] == attempts, (kind, hits)


# ---- a large delete --------------------------------------------------------------------


async def test_deleting_a_task_with_a_long_history_leaves_the_loop_serving(
        make_client: MakeClient, db_file: Path) -> None:
    """The delete runs on the writer's thread. While its DELETE statement
    is held (a trace callback on the writer connection waits for the test), the loop must
    answer other users' requests; on the loop's thread it would hang until the wait gives
    up, and the test fails."""
    client = await make_client()
    store = client.app[keys.STORE]
    await register(client, "big", 1)
    await register(client, "other", 2)
    for start in range(0, 6000, 2000):
        outcomes = await store.submit_many([Change("big", "progress", progress=n % 100)
                                            for n in range(start, start + 2000)])
        assert all(o.ok for o in outcomes)
    await event(client, "big", "completed")
    loop_thread = threading.get_ident()
    started, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def trace(sql: str) -> None:
        if sql.startswith("DELETE FROM events"):
            seen["thread"] = threading.get_ident()
            started.set()
            seen["released"] = release.wait(HANG)

    store._wconn.set_trace_callback(trace)
    try:
        delete = asyncio.create_task(client.delete("/api/task/task/big", headers=auth(1)))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, started.wait, HANG)
        # the delete is in progress: other users are served meanwhile
        resp = await asyncio.wait_for(client.get("/api/task/tasks", headers=auth(2)), HANG)
        assert resp.status == 200
        ws = await ws_connect(client, 2)
        _, active = await asyncio.wait_for(handshake(ws), HANG)
        assert [t["task_id"] for t in active["tasks"]] == ["other"]
        await ws.close()
        release.set()
        resp = await asyncio.wait_for(delete, HANG)
    finally:
        release.set()
        store._wconn.set_trace_callback(None)
    assert resp.status == 200, await resp.text()
    assert seen["thread"] != loop_thread and seen["released"] is True
    assert await events_of(db_file, "big") == []


async def test_a_purge_on_a_full_disk_does_not_end_the_outage(
        make_client: MakeClient, store_log: pytest.LogCaptureFixture) -> None:
    """A sweep's purge needs no fresh pages, so it commits on a full disk; that must not end
    the outage (health would flap and each flap log two more lines)."""
    client = await make_client(db_timeout=0.5)
    store = client.app[keys.STORE]
    await register(client, "t", 1)
    wconn = store._wconn
    async with store._write_lock:
        (pages,) = wconn.execute("PRAGMA page_count").fetchone()
        wconn.execute(f"PRAGMA max_page_count = {pages}")
    resp = await client.post("/api/task/tasks", headers=PRODUCER, json={
        "task_id": "big", "user_id": 1, "task_type": "job", "metadata": {"b": "x" * 40_000}})
    await assert_503(resp, FULL)
    assert await store.purge_tombstones("9999-12-31T00:00:00Z") == 0  # it commits
    status, body = await health(client)
    assert status == 503 and body["message"] == FULL
    began, ended = outage_lines(store_log)
    assert len(began) == 1 and ended == []
    async with store._write_lock:
        wconn.execute("PRAGMA max_page_count = 1073741823")
    await until(lambda: healthy(client), "/healthz 200 once there is space")
