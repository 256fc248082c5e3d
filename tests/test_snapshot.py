"""The connect-time snapshot and the history under memory bounds.

- `active_tasks` is still ONE message, written by pages as a fragmented WebSocket message;
- the `since` replay is read and written by pages and still carries every change once;
- connects beyond `--snapshot-memory` wait their turn;
- a real server process whose users' sockets never read their large snapshots keeps its
  memory bounded and serves everyone else;
- `GET .../history` is paged (`limit`, `after`, `next_after`): every event exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import struct
from typing import Any

import aiohttp
import pytest

from server.core.model import Change, Register, Task
from server.push import snapshot
from server.push.frames import data_frame, text_frame
from server.push.messages import CLOSE_TRY_AGAIN, active_tasks, active_tasks_part
from server.push.snapshot import ByteBudget
from server.web import keys
from tests.conftest import (
    API_KEY,
    PRODUCER,
    SECRET,
    MakeClient,
    auth,
    handshake,
    make_token,
    recv,
    recv_until,
    ws_connect,
)
from tests.engines import Engine
from tests.procs import ServerProcess
from tests.support import (
    ended,
    events_until,
    fill_with_large_active_tasks,
    holds_the_whole_budget,
    only_socket_once,
    raw_socket,
    replay_history,
    rss_kb,
    stream,
    stuck_client,
)

# ---- sans I/O --------------------------------------------------------------------------


def _task(n: int) -> Task:
    return Task(task_id=f"t{n}", user_id=1, task_type="x", status="running", progress=n,
                message=None, step=None, result=None, error=None, error_type=None,
                metadata={"n": n, "s": "é\u2028"}, created_at="c", updated_at="u", seq=n,
                cancel_requested=False, origin="http", created_seq=n)


@pytest.mark.parametrize("pages", [[], [[0]], [[0, 1], [2], [3, 4, 5]]])
def test_the_parts_of_active_tasks_join_to_the_one_message(pages: list[list[int]]) -> None:
    tasks = [[_task(n) for n in page] for page in pages] or [[]]
    total = sum(len(page) for page in tasks)
    parts = [active_tasks_part(page, first=i == 0,
                                        count=total if i == len(tasks) - 1 else None)
             for i, page in enumerate(tasks)]
    whole = active_tasks([t for page in tasks for t in page])
    assert b"".join(parts).decode() == whole
    assert json.loads(whole)["count"] == total


def test_a_message_in_parts_is_a_text_frame_then_continuations_the_last_final() -> None:
    assert data_frame(b"ab", first=True, last=False)[:2] == b"\x01\x02"
    assert data_frame(b"cd", first=False, last=False)[:2] == b"\x00\x02"
    assert data_frame(b"ef", first=False, last=True)[:2] == b"\x80\x02"
    assert data_frame(b"x" * 70000)[:2] == b"\x81\x7f"
    assert text_frame("hi") == b"\x81\x02hi"


async def test_a_waiter_cancelled_as_the_budget_is_released_stays_cancelled() -> None:
    """Cancelled while it waits, then bytes are released before it resumes: `_wake` has
    already dropped its entry; the waiter must end cancelled (not ValueError), nothing
    held."""
    budget = ByteBudget(100)
    holder = budget.hold(100)
    await holder.__aenter__()

    async def take() -> None:
        async with budget.hold(50):
            pass

    waiter = asyncio.create_task(take())
    await asyncio.sleep(0)  # it waits
    waiter.cancel()
    await holder.__aexit__(None, None, None)  # release runs before the waiter resumes
    results = await asyncio.gather(waiter, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError), results
    assert budget.used == 0


async def test_the_byte_budget_lets_waiters_in_first_come_first_served() -> None:
    budget = ByteBudget(100)
    order: list[str] = []
    first = budget.hold(80)
    await first.__aenter__()

    async def take(name: str, amount: int) -> None:
        async with budget.hold(amount):
            order.append(name)

    big = asyncio.create_task(take("big", 60))
    small = asyncio.create_task(take("small", 10))  # fits, but waits behind "big"
    cancelled = asyncio.create_task(take("cancelled", 10))
    await asyncio.sleep(0)
    assert order == [] and budget.used == 80
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(asyncio.gather(big, small), 5)
    assert order == ["big", "small"] and budget.used == 0
    async with budget.hold(10_000):  # larger than the budget: it goes alone
        assert budget.used == 100
    assert budget.used == 0


# ---- one socket ------------------------------------------------------------------------


def read_messages(sock: Any, count: int) -> list[tuple[int, bytes]]:
    """`count` whole messages from a raw socket: (number of frames, payload)."""
    out: list[tuple[int, bytes]] = []
    buf = b""
    parts: list[bytes] = []
    while len(out) < count:
        data = sock.recv(1 << 20)
        assert data, "closed"
        buf += data
        while len(buf) >= 2:
            head, size, at = buf[0], buf[1] & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    break
                size, at = struct.unpack("!H", buf[2:4])[0], 4
            elif size == 127:
                if len(buf) < 10:
                    break
                size, at = struct.unpack("!Q", buf[2:10])[0], 10
            if len(buf) < at + size:
                break
            payload, buf = buf[at:at + size], buf[at + size:]
            if head & 0x0F in (0x9, 0xA):
                continue  # control frames may come between the parts
            assert (head & 0x0F == 0x1) == (not parts), hex(head)  # text, then continuations
            parts.append(payload)
            if head & 0x80:
                out.append((len(parts), b"".join(parts)))
                parts = []
    return out


async def test_active_tasks_is_one_message_written_in_parts(make_client: MakeClient,
                                                            monkeypatch: Any) -> None:
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 3000)
    client = await make_client()
    store = client.server.app[keys.STORE]
    for n in range(30):
        await store.submit(Register(f"t{n}", 1, "job", metadata={"pad": "m" * 1000}))
    await store.submit(Change("t3", "completed"))
    sock = await asyncio.get_running_loop().run_in_executor(
        None, raw_socket, client.server.port, 1)
    try:
        (_, connected), (frames, active) = await asyncio.get_running_loop().run_in_executor(
            None, read_messages, sock, 2)
    finally:
        sock.close()
    assert json.loads(connected)["type"] == "connected"
    assert frames >= 5  # ~1 KB a task, ~3 KB a page
    message = json.loads(active)
    assert message["type"] == "active_tasks" and message["count"] == 29
    assert [t["task_id"] for t in message["tasks"]] == [f"t{n}" for n in range(30) if n != 3]
    assert list(message) == ["type", "tasks", "count"]
    # and a client library sees one message, as it always did
    ws = await ws_connect(client, 1)
    _, active_msg = await handshake(ws)
    assert active_msg["count"] == 29 and len(active_msg["tasks"]) == 29
    await ws.close()


async def test_the_replay_by_pages_carries_every_change_once_in_order(
        make_client: MakeClient, monkeypatch: Any) -> None:
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 1500)
    client = await make_client()
    store = client.server.app[keys.STORE]
    since, expected = await replay_history(store)
    ws = await ws_connect(client, 1, query=f"since={since}")
    # live changes while the replay is written: each must arrive, none twice or backwards
    live = asyncio.create_task(_progress(store, "busy", 30))
    last_seq: dict[str, int] = {}
    seen: dict[str, str] = {}
    _, active = await handshake(ws)
    assert [t["task_id"] for t in active["tasks"]] == ["busy"]
    last_seq["busy"] = active["tasks"][0]["seq"]
    await live
    final_seq = store.last_seq
    while last_seq.get("busy", 0) < final_seq:
        msg = await recv(ws)
        task_id = msg["task_id"]
        if msg["type"] == "task_deleted":
            assert task_id not in seen, task_id
            seen[task_id] = "deleted"
            continue
        assert msg["type"] == "task_status", msg
        assert msg["seq"] > last_seq.get(task_id, 0), (task_id, msg["seq"])
        last_seq[task_id] = msg["seq"]
        if task_id != "busy":
            assert task_id not in seen, task_id
            seen[task_id] = msg["status"]
    assert seen == expected
    await ws.close()
    await _budget_returned(client.server.app)


async def _budget_returned(app: Any) -> None:
    """Every page's bytes went back to the shared budget (read-ahead pages included)."""
    budget = app[keys.SNAPSHOT_BUDGET]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while budget.used or app[keys.SOCKETS]:
        assert loop.time() < deadline, f"{budget.used} bytes never given back"
        await asyncio.sleep(0.01)


async def _progress(store: Any, task_id: str, count: int) -> None:
    for n in range(count):
        await store.submit(Change(task_id, "progress", progress=n))
        await asyncio.sleep(0)


@pytest.mark.slow  # takes seconds
async def test_connects_beyond_the_snapshot_memory_wait_their_turn(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """One socket that never reads holds the whole budget: the next connect gets
    `connected` at once but its `active_tasks` only once the first is cut off (4408)."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 64 * 1024)
    client = await make_client(snapshot_memory=64 * 1024, send_timeout=0.5)
    app = client.server.app
    store = app[keys.STORE]
    await fill_with_large_active_tasks(store)
    loop = asyncio.get_running_loop()
    stuck = await loop.run_in_executor(None, stuck_client, client.server.port, 1)
    try:
        holder = await only_socket_once(app, holds_the_whole_budget(app), "the silent peer")
        ws = await ws_connect(client, 2)
        assert (await recv(ws))["type"] == "connected"
        active = await recv(ws, timeout=10)
        assert active["type"] == "active_tasks" and active["count"] == 1
        assert holder.closing  # it had to go first
        await ws.close()
    finally:
        stuck.close()
    await _budget_returned(app)


# ---- the budget cannot deadlock; the replay never goes back ------------------------------


@pytest.mark.parametrize("pages,conns", [(1, 1), (3, 1), (8, 10), (32, 40)])
async def test_since_connects_never_deadlock_the_budget_and_give_it_all_back(
        make_client: MakeClient, monkeypatch: Any, pages: int, conns: int) -> None:
    """Connects with `since` and three pages of active tasks each, under a budget of one
    page (smaller than a grant: each goes alone), of three, and of fewer pages than the
    connects would read ahead (each socket's later pages used to wait behind the others'
    first pages, holding a replay page read ahead: nothing moved, for good)."""
    page = 4096
    monkeypatch.setattr(snapshot, "PAGE_BYTES", page)
    client = await make_client(snapshot_memory=pages * page, max_connections_per_user=100)
    app = client.server.app
    store = app[keys.STORE]
    since = store.last_seq
    for n in range(6):  # ~3 pages of active tasks
        await store.submit(Register(f"t{n}", 1, "job", metadata={"pad": "m" * 2000}))
    await store.submit(Change("t0", "progress", progress=5))
    await store.submit(Register("done", 1, "job"))
    await store.submit(Change("done", "completed"))
    sockets = [await ws_connect(client, 1, query=f"since={since}") for _ in range(conns)]
    for ws in sockets:
        _, active = await handshake(ws)
        assert active["count"] == 6
        replayed = [await recv(ws) for _ in range(7)]
        assert [m["task_id"] for m in replayed] == ["t1", "t2", "t3", "t4", "t5", "t0", "done"]
    for ws in sockets:
        await ws.close()
    await _budget_returned(app)
    lone = await ws_connect(client, 1, query=f"since={since}")  # the budget is whole again
    _, active = await handshake(lone)
    assert active["count"] == 6 and (await recv(lone))["task_id"] == "t1"
    await lone.close()
    await _budget_returned(app)


@pytest.mark.slow  # takes seconds
async def test_a_grant_goes_back_when_its_connect_is_cancelled_while_waiting(
        make_client: MakeClient, monkeypatch: Any) -> None:
    page = 4096
    monkeypatch.setattr(snapshot, "PAGE_BYTES", page)
    client = await make_client(snapshot_memory=2 * page)
    app = client.server.app
    store = app[keys.STORE]
    await store.submit(Register("t", 1, "job"))
    budget = app[keys.SNAPSHOT_BUDGET]
    async with budget.hold(budget.total):  # every grant taken: connects wait their turn
        waiting = [await ws_connect(client, 1, query="since=0") for _ in range(3)]
        for ws in waiting:
            assert (await recv(ws))["type"] == "connected"
        for ws in waiting[:2]:
            await ws.close()  # gone while waiting: their handlers end, their waits too
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(app[keys.SOCKETS]) > 1:
            assert loop.time() < deadline, "the closed waiters were never released"
            await asyncio.sleep(0.01)
    active = await recv(waiting[2])
    assert active["type"] == "active_tasks" and active["count"] == 1
    await waiting[2].close()
    await _budget_returned(app)


async def test_the_replay_never_takes_a_task_back_below_what_active_tasks_sent(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """A commit lands between two `active_tasks` page reads: x is sent at its new seq in
    `active_tasks`; its older change in the replay range is not sent after it, and the live
    update of that commit (queued meanwhile) is not sent again."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 1)  # one task per page
    client = await make_client()
    store = client.server.app[keys.STORE]
    await store.submit(Register("a", 1, "job"))
    await store.submit(Register("x", 1, "job"))
    since = store.last_seq
    await store.submit(Change("x", "progress", progress=10))  # in the replay range
    read_page = store.active_page
    committed = asyncio.Event()

    async def active_page(user_id: int, after: int, max_bytes: int) -> Any:
        if after > 0 and not committed.is_set():  # a producer commits between two reads
            committed.set()
            await store.submit(Change("x", "progress", progress=50))
        return await read_page(user_id, after, max_bytes)

    monkeypatch.setattr(store, "active_page", active_page)
    ws = await ws_connect(client, 1, query=f"since={since}")
    _, active = await handshake(ws)
    assert committed.is_set()
    sent = {t["task_id"]: (t["seq"], t["progress"]) for t in active["tasks"]}
    assert sent["x"][1] == 50
    await store.submit(Change("a", "progress", progress=99))  # a marker after everything
    later = await recv_until(ws, lambda m: m.get("task_id") == "a" and m["progress"] == 99)
    assert [m for m in later if m.get("task_id") == "x"] == []
    await ws.close()


@pytest.mark.slow  # takes seconds
async def test_a_live_connect_waiting_its_turn_is_not_dropped_as_dead(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """Pings every 0.2 s, a peer silent 0.3 s after one is dead: a live client that waits
    (its pongs go unread until its snapshot is written) is not that peer; the holder stuck
    on a page is still cut off by --send-timeout (4408)."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 64 * 1024)
    client = await make_client(snapshot_memory=64 * 1024, send_timeout=2, ping_interval=0.2,
                               ping_timeout=0.3)
    app = client.server.app
    store = app[keys.STORE]
    await fill_with_large_active_tasks(store)
    loop = asyncio.get_running_loop()
    stuck = await loop.run_in_executor(None, stuck_client, client.server.port, 1)
    try:
        holder = await only_socket_once(app, holds_the_whole_budget(app), "the silent peer")
        ws = await ws_connect(client, 2)  # aiohttp answers every ping
        assert (await recv(ws))["type"] == "connected"
        active = await recv(ws, timeout=10)  # ~2 s of waiting, ~10 pings unanswered
        assert active["type"] == "active_tasks" and active["count"] == 1
        assert holder.closing
        await ws.close()
    finally:
        stuck.close()
    await _budget_returned(app)


async def test_a_storage_failure_during_the_snapshot_closes_1013_without_a_traceback(
        make_client: MakeClient, monkeypatch: Any, caplog: Any) -> None:
    """The disk fails on the second page of `active_tasks`: the socket is closed with 1013
    (try again later), one warning is logged, no traceback; the budget is given back."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 1)  # one task per page
    client = await make_client()
    app = client.server.app
    store = app[keys.STORE]
    for n in range(3):
        await store.submit(Register(f"t{n}", 1, "job"))
    _fail_page_reads(monkeypatch, store, after=1)
    ws = await ws_connect(client, 1)
    assert (await recv(ws))["type"] == "connected"
    msg = await ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.CLOSE, (msg.type, msg.data)
    assert ws.close_code == CLOSE_TRY_AGAIN == 1013
    await _budget_returned(app)
    warnings = [r for r in caplog.records if "closed with 1013" in r.getMessage()]
    assert len(warnings) == 1 and "disk I/O error" in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_storage_failure_during_a_streams_replay_ends_it_with_1013(
        make_client: MakeClient, monkeypatch: Any, caplog: Any) -> None:

    monkeypatch.setattr(snapshot, "PAGE_BYTES", 1)
    client = await make_client()
    app = client.server.app
    store = app[keys.STORE]
    await store.submit(Register("a", 1, "job"))
    await store.submit(Register("b", 1, "job"))
    await store.submit(Change("b", "completed"))
    _fail_page_reads(monkeypatch, store, after=1)  # active_tasks read; the replay fails
    resp = await stream(client, query="&since=0")
    assert [e["event"] for e in await events_until(resp, "active_tasks")] == [
        "connected", "active_tasks"]
    rest = await ended(resp)
    assert [(e["event"], e["data"]["code"]) for e in rest] == [("close", 1013)]
    await _budget_returned(app)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _fail_page_reads(monkeypatch: Any, store: Any, after: int) -> None:
    """Snapshot page reads after the first `after` fail as a failing disk does."""
    read = store._txn_pages
    calls = 0

    def txn_pages(conn: Any, requests: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > after:
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = sqlite3.SQLITE_IOERR  # type: ignore[attr-defined]
            raise exc
        return read(conn, requests)

    monkeypatch.setattr(store, "_txn_pages", txn_pages)


# ---- a real process: memory -------------------------------------------------------------


async def test_large_snapshots_to_sockets_that_never_read_stay_bounded(servers: Any,
                                                                      engine: Engine) -> None:
    """150 active tasks of ~60 KB for one user and 150 finished ones for another: 8 silent
    sockets each asking the full snapshot, 8 the since=0 replay (~9 MB each, 140 MB if
    held whole). The server's RSS stays within a few pages per socket; a third user is
    served meanwhile; the silent sockets are cut off (4408)."""
    server: ServerProcess = servers("--jwt-secret", SECRET, "--api-key", API_KEY,
                                    "--send-timeout", "2", "--log-level", "warning",
                                    "--access-log", "false", db=engine.database())
    server.start()
    blob = "m" * 60_000
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        for user, finish in ((1, False), (2, True)):
            for n in range(150):
                async with http.post(server.url + "/api/task/tasks", headers=PRODUCER,
                                     json={"task_id": f"u{user}t{n}", "user_id": user,
                                           "task_type": "big",
                                           "metadata": {"blob": blob}}) as resp:
                    assert resp.status == 201
            if finish:
                events = [{"task_id": f"u{user}t{n}", "status": "completed"}
                          for n in range(150)]
                async with http.post(server.url + "/api/task/events", headers=PRODUCER,
                                     json={"events": events}) as resp:
                    assert resp.status == 200
        async with http.post(server.url + "/api/task/tasks", headers=PRODUCER,
                             json={"task_id": "other", "user_id": 3, "task_type": "t"}) as r:
            assert r.status == 201
        before = rss_kb(server.proc.pid)  # type: ignore[union-attr]
        silent = [await loop.run_in_executor(None, stuck_client, server.port, 1)
                  for _ in range(8)]
        silent += [await loop.run_in_executor(None, _stuck_since, server.port, 2)
                   for _ in range(8)]
        peak = before
        other = await http.ws_connect(f"{server.ws_url}/api/task/ws/task/3?token="
                                      f"{make_token(3)}")
        assert json.loads((await other.receive(timeout=10)).data)["type"] == "connected"
        assert json.loads((await other.receive(timeout=10)).data)["count"] == 1
        async with http.post(server.url + "/api/task/task/other/events", headers=PRODUCER,
                             json={"status": "completed"}) as resp:
            assert resp.status == 200
        update = json.loads((await other.receive(timeout=10)).data)
        assert update["task_id"] == "other" and update["status"] == "completed"
        deadline = loop.time() + 30
        while server.health()["connections"] > 1:
            peak = max(peak, rss_kb(server.proc.pid))  # type: ignore[union-attr]
            assert loop.time() < deadline, "the silent sockets were never cut off"
            await asyncio.sleep(0.02)
        peak = max(peak, rss_kb(server.proc.pid))  # type: ignore[union-attr]
        await other.close()
        for sock in silent:
            sock.close()
    growth_mb = (peak - before) / 1024
    print(f"RSS growth {growth_mb:.1f} MB")
    assert growth_mb < 40, f"server RSS grew {growth_mb:.1f} MB"
    assert server.stop() == 0


def _stuck_since(port: int, user: int) -> Any:
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /api/task/ws/task/{user}?token={make_token(user)}&since=0 HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


# ---- history -------------------------------------------------------------------------------


async def test_history_is_paged_and_every_event_comes_once(make_client: MakeClient) -> None:
    client = await make_client()
    store = client.server.app[keys.STORE]
    await store.submit(Register("h", 1, "job"))
    await store.submit(Register("noise", 1, "job"))
    for n in range(2300):
        await store.submit_many([Change("h", "progress", progress=n % 100, message=str(n)),
                                 Change("noise", "progress", progress=n % 100)])
    small = await (await client.get("/api/task/task/noise/history?limit=5",
                                     headers=auth(1))).json()
    assert small["data"]["count"] == 5 and small["data"]["next_after"] is not None
    seen: list[int] = []
    pages = 0
    after: int | None = 0
    while after is not None:
        resp = await client.get(f"/api/task/task/h/history?after={after}", headers=auth(1))
        assert resp.status == 200
        data = (await resp.json())["data"]
        assert data["count"] == len(data["events"]) <= 1000
        seen.extend(e["seq"] for e in data["events"])
        after = data["next_after"]
        pages += 1
    assert pages == 3
    expected = [e["seq"] for e in await store.history("h")]
    assert seen == expected and len(seen) == 2301  # pending + 2300 changes, once each
    messages = [e["message"] for e in (await (await client.get(
        "/api/task/task/h/history?limit=3", headers=auth(1))).json())["data"]["events"]]
    assert messages == [None, "0", "1"]


async def test_a_short_history_is_one_answer_as_before(make_client: MakeClient) -> None:
    client = await make_client()
    store = client.server.app[keys.STORE]
    await store.submit(Register("s", 1, "job"))
    await store.submit(Change("s", "completed"))
    data = (await (await client.get("/api/task/task/s/history", headers=auth(1))).json())["data"]
    assert data["count"] == 2 and data["next_after"] is None
    assert [e["status"] for e in data["events"]] == ["pending", "completed"]
    for bad in ("limit=0", "limit=1001", "after=-1", "after=x"):
        resp = await client.get(f"/api/task/task/s/history?{bad}", headers=auth(1))
        assert resp.status == 400, bad


