"""Cluster mode in one process: two `create_app(config)` apps on one PostgreSQL database
are two nodes, each served through aiohttp's test server (real sockets, a real
PostgreSQL server from tests/pg.py). What SPEC's "Cluster mode" promises across nodes:
changes made through one node reach sockets on the other in seq order with no gap, resume
and long polls work on any node, cancels reach the node running the task, the shared
settings and the cluster-wide jobs, gone nodes, and the database failing under them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from server.app import create_app
from server.config import Config
from server.core.model import Change, Register
from server.storage.api import StoreRefused
from server.web import keys
from server.web.jobs import end_gone_nodes_tasks
from tests.cluster_support import backends, deafen, hung_postgres, terminate
from tests.conftest import (
    PRODUCER,
    auth,
    event,
    expect_close,
    handshake,
    recv_until,
    register,
    ws_connect,
)
from tests.support import events_until, next_event, stream, until

Node = Any  # an aiohttp TestClient
MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
def make_node(aiohttp_client: Any, config: Config, pg_url: str) -> MakeNode:
    """make_node(name, **config_changes) -> a TestClient on a fresh app (a node) serving
    the test's PostgreSQL database."""

    async def factory(name: str, **changes: Any) -> Node:
        app: web.Application = create_app(config.replace(db=pg_url, node_name=name,
                                                         **changes))
        return await aiohttp_client(app)

    return factory


async def two_nodes(make_node: MakeNode, **changes: Any) -> tuple[Node, Node]:
    return await make_node("node-a", **changes), await make_node("node-b", **changes)


def statuses(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["task_id"], m["status"]) for m in messages if m["type"] == "task_status"]


# ---- fan-out --------------------------------------------------------------------------------


async def test_a_socket_on_b_receives_a_change_made_through_a_over_http(make_node):
    a, b = await two_nodes(make_node)
    ws = await ws_connect(b, 1)
    await handshake(ws)
    await register(a, "cross-1")
    created = await recv_until(ws, lambda m: m["type"] == "task_status")
    assert created[-1]["task_id"] == "cross-1"
    await event(a, "cross-1", "progress", progress=40, message="through A")
    got = await recv_until(ws, lambda m: m.get("progress") == 40)
    assert got[-1]["message"] == "through A"
    assert got[-1]["seq"] > created[-1]["seq"]
    await event(a, "cross-1", "completed")
    resp = await a.delete("/api/task/task/cross-1", headers=auth(1))
    assert resp.status == 200
    gone = await recv_until(ws, lambda m: m["type"] == "task_deleted")
    assert gone[-1] == {"type": "task_deleted", "task_id": "cross-1"}
    await ws.close()


async def test_a_socket_on_b_receives_an_in_process_change_made_on_a(make_node):
    a, b = await two_nodes(make_node)
    ws = await ws_connect(b, 7)
    await handshake(ws)
    tasks_a = a.app[keys.TASKS]
    await tasks_a.register(Register("inproc-1", 7, "job", origin="inprocess"))
    await tasks_a.change(Change("inproc-1", "running", message="on A, in-process"))
    got = await recv_until(ws, lambda m: m.get("status") == "running")
    assert got[-1]["message"] == "on A, in-process"
    assert ("inproc-1", "pending") in statuses(got)
    await ws.close()


async def test_an_event_stream_on_b_gets_changes_through_a_and_resumes_on_a(make_node):
    a, b = await two_nodes(make_node)
    resp = await stream(b, 14)
    connected = (await events_until(resp, "active_tasks"))[0]["data"]
    await register(a, "sse-1", 14)
    got = await events_until(resp, "task_status")
    assert got[-1]["data"]["task_id"] == "sse-1"
    last_id = got[-1]["id"]
    assert last_id == f"{connected['epoch']}:{got[-1]['data']['seq']}"
    resp.close()
    changed = await event(b, "sse-1", "running")
    again = await stream(a, 14, Last_Event_ID=last_id)
    # A may not have read B's change from the feed yet when it takes its snapshot seq: the
    # change then comes in `active_tasks` (read from the database) and its live copy is
    # dropped as already sent; else it comes as a `task_status` (replay or live)
    states: list[tuple[int, str]] = []
    while (changed["seq"], "running") not in states:
        item = await next_event(again)
        if item["event"] == "active_tasks":
            states += [(t["seq"], t["status"]) for t in item["data"]["tasks"]]
        elif item["event"] == "task_status":
            states.append((item["data"]["seq"], item["data"]["status"]))
    again.close()


async def test_concurrent_producers_on_both_nodes_give_one_gapless_seq_stream(make_node):
    """Four producers (two per node) move tasks of one user through distinct statuses (no
    coalescing applies); a socket on each node sees every seq of that user's changes
    exactly once, strictly increasing with no gap, and every final state."""
    a, b = await two_nodes(make_node)
    sockets = [await ws_connect(a, 3), await ws_connect(b, 3)]
    for ws in sockets:
        await handshake(ws)
    per_producer = 8

    async def produce(node: Node, prefix: str) -> None:
        for i in range(per_producer):
            task_id = f"{prefix}-{i}"
            await register(node, task_id, 3)
            await event(node, task_id, "running")
            await event(node, task_id, "progress", progress=50)
            await event(node, task_id, "completed", result={"by": prefix, "i": i})

    await asyncio.gather(produce(a, "a1"), produce(b, "b1"), produce(a, "a2"),
                         produce(b, "b2"))
    total = 4 * per_producer * 4
    for ws in sockets:
        seen: list[dict[str, Any]] = []
        await recv_until(ws, lambda m, seen=seen: seen.append(m) or len(
            [x for x in seen if x["type"] == "task_status"]) >= total, timeout=20)
        updates = [m for m in seen if m["type"] == "task_status"]
        assert [m["seq"] for m in updates] == list(range(1, total + 1))
        final = {m["task_id"]: m for m in updates}
        assert len(final) == 4 * per_producer
        for task_id, message in final.items():
            assert message["status"] == "completed"
            assert message["result"] == {"by": task_id.split("-")[0],
                                         "i": int(task_id.split("-")[1])}
        await ws.close()


async def test_resume_on_b_after_a_disconnect_from_a(make_node):
    a, b = await two_nodes(make_node)
    ws = await ws_connect(a, 4)
    connected, _ = await handshake(ws)
    await register(a, "r-1", 4)
    seen = await recv_until(ws, lambda m: m.get("task_id") == "r-1")
    last = seen[-1]["seq"]
    await ws.close()
    # while the client is away: changes through both nodes, a deletion among them
    await event(b, "r-1", "completed", result=1)
    await register(b, "r-2", 4)
    await register(a, "r-3", 4)
    await event(a, "r-3", "failed", error="x")
    resp = await b.delete("/api/task/task/r-3", headers=auth(4))
    assert resp.status == 200
    again = await ws_connect(b, 4, query=f"since={last}&epoch={connected['epoch']}")
    connected_b, active = await handshake(again)
    assert connected_b["epoch"] == connected["epoch"]
    assert [t["task_id"] for t in active["tasks"]] == ["r-2"]
    replay = await recv_until(again, lambda m: m["type"] == "task_deleted")
    kinds = [(m["type"], m.get("task_id"), m.get("status")) for m in replay]
    assert ("task_status", "r-1", "completed") in kinds
    assert kinds[-1] == ("task_deleted", "r-3", None)
    assert "resync" not in [m["type"] for m in replay]
    await again.close()


async def test_a_resume_on_a_node_behind_the_seq_it_was_sent_is_not_a_resync(make_node):
    """A client sent seq N by A resumes on B before B delivered N itself: B catches up
    first instead of judging N "from the future" and sending `resync`."""
    a, b = await two_nodes(make_node)
    ws = await ws_connect(a, 6)
    connected, _ = await handshake(ws)
    store_b = b.app[keys.STORE]
    await deafen(store_b)  # B hears of nothing by itself from now on
    await register(a, "ahead", 6)
    sent = (await recv_until(ws, lambda m: m.get("task_id") == "ahead"))[-1]["seq"]
    assert store_b.last_seq < sent
    again = await ws_connect(b, 6, query=f"since={sent}&epoch={connected['epoch']}")
    connected_b, active = await handshake(again)
    assert connected_b["seq"] >= sent
    assert [t["task_id"] for t in active["tasks"]] == ["ahead"]
    await ws.close()
    await again.close()


# ---- long polls, cancels ------------------------------------------------------------------


async def test_polling_since_on_a_node_behind_is_not_a_resync(make_node):
    """The polling fallback behind a proxy without stickiness: a poll answered by A, the
    next by B that has not yet read A's change from the feed. B catches up to the seq the
    client has (as a socket's `since` does), it does not answer `resync`."""
    a, b = await two_nodes(make_node)
    await deafen(b.app[keys.STORE])  # B hears of nothing by itself
    created = await register(a, "poll-1", 21)
    data = (await (await a.get("/api/task/tasks?since=0", headers=auth(21))).json())["data"]
    assert data["seq"] >= created["seq"] and not data["resync"]
    changed = await event(a, "poll-1", "running")
    resp = await b.get(f"/api/task/tasks?since={data['seq']}", headers=auth(21))
    again = (await resp.json())["data"]
    assert again["resync"] is False, again
    assert [(t["task_id"], t["seq"]) for t in again["tasks"]] == [("poll-1", changed["seq"])]


async def test_a_long_poll_on_a_is_released_by_a_change_through_b(make_node):
    a, b = await two_nodes(make_node)
    created = await register(a, "lp-1", 1)
    etag = f'"{created["seq"]}"'
    waiting = asyncio.create_task(a.get("/api/task/task/lp-1/status?wait=20",
                                        headers={**auth(1), "If-None-Match": etag}))
    await asyncio.sleep(0.3)  # let it reach its wait: it must not answer before a change
    assert not waiting.done()
    changed = await event(b, "lp-1", "running", message="via B")
    resp = await asyncio.wait_for(waiting, 10)
    assert resp.status == 200
    body = await resp.json()
    assert (body["data"]["seq"], body["data"]["message"]) == (changed["seq"], "via B")


async def test_a_cancel_through_b_interrupts_an_in_process_task_on_a(make_node):
    a, b = await two_nodes(make_node)
    tasks_a = a.app[keys.TASKS]
    started = asyncio.Event()

    async def job() -> None:
        await tasks_a.register(Register("ip-cancel", 2, "long", origin="inprocess"))
        await tasks_a.change(Change("ip-cancel", "running"))
        tasks_a.attach_runner("ip-cancel", asyncio.current_task())
        started.set()
        await asyncio.Event().wait()

    runner = asyncio.create_task(job())
    await asyncio.wait_for(started.wait(), 10)
    resp = await b.post("/api/task/task/ip-cancel/cancel", headers=auth(2))
    assert resp.status == 200
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, 10)
    resp = await a.get("/api/task/task/ip-cancel/status", headers=auth(2))
    task = (await resp.json())["data"]
    assert (task["status"], task["cancel_requested"]) == ("cancelled", True)


# ---- shared settings and keys ---------------------------------------------------------------


async def test_epoch_and_demo_secret_are_shared(make_node):
    a, b = await two_nodes(make_node, jwt_secret=None, api_key=None)
    ha, hb = await (await a.get("/healthz")).json(), await (await b.get("/healthz")).json()
    assert ha["epoch"] == hb["epoch"]
    resp = await a.post("/api/demo/login", json={"user_id": 9})
    token = (await resp.json())["data"]["token"]
    resp = await b.get("/api/task/tasks", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200  # a token from A's demo secret is good on B


async def test_an_idempotency_key_used_on_a_is_honoured_on_b(make_node):
    a, b = await two_nodes(make_node)
    await register(a, "idem-1", 1)
    headers = {**PRODUCER, "Idempotency-Key": "evt-1"}
    first = await a.post("/api/task/task/idem-1/events", headers=headers,
                         json={"status": "progress", "progress": 10})
    assert first.status == 200
    retried = await b.post("/api/task/task/idem-1/events", headers=headers,
                           json={"status": "progress", "progress": 10})
    assert retried.status == 200
    assert (await retried.json())["data"]["seq"] == (await first.json())["data"]["seq"]
    resp = await b.get("/api/task/task/idem-1/history", headers=auth(1))
    history = (await resp.json())["data"]
    events = history["events"] if isinstance(history, dict) else history
    assert [e["status"] for e in events] == ["pending", "progress"]


# ---- cluster-wide jobs and gone nodes -------------------------------------------------------


async def test_one_node_leads_a_job_and_another_takes_over_when_it_goes(make_node,
                                                                          pg_server, pg_url):
    a, b = await two_nodes(make_node)
    store_a, store_b = a.app[keys.STORE], b.app[keys.STORE]
    assert await store_a.lead("job-x") is True
    assert await store_b.lead("job-x") is False
    assert await store_a.lead("job-x") is True  # the holder keeps it
    # A's listening connection dies: its locks go with it, B may take the job
    assert await terminate(pg_server, pg_url, "taskpush node-a listen") == 1
    await until(lambda: store_b.lead("job-x"))
    assert await store_a.lead("job-x") is False
    # and A is listening again (a new connection), so it still hears of changes
    await until(lambda: listening(pg_server, pg_url, "node-a"))


async def test_the_sweeper_runs_on_the_leading_node_only(make_node):
    a, b = await two_nodes(make_node, sweep_interval=3600)
    assert await a.app[keys.STORE].lead("sweep") is True
    assert await b.app[keys.STORE].lead("sweep") is False


async def test_a_gone_nodes_in_process_tasks_end_failed_interrupted(make_node, pg_url):
    from server.storage.postgres.store import PgStore

    b = await make_node("node-b", node_timeout=1.0)
    ws = await ws_connect(b, 8)
    await handshake(ws)
    gone = PgStore(pg_url, node_name="node-gone", node_timeout=1.0)
    await gone.open()
    await gone.submit(Register("orphan", 8, "long", origin="inprocess"))
    await gone.submit(Change("orphan", "running"))
    await gone.close()  # stops heartbeating; its task was never ended
    got = await recv_until(ws, lambda m: m.get("task_id") == "orphan"
                           and m.get("status") == "failed", timeout=15)
    assert got[-1]["error_type"] == "interrupted"
    store_b = b.app[keys.STORE]
    assert await store_b.gone_nodes_tasks() == []
    conn = await asyncpg.connect(pg_url)
    try:  # the gone node, left with nothing to end, is forgotten; B is not
        assert [r[0] for r in await conn.fetch("SELECT name FROM nodes")] == ["node-b"]
    finally:
        await conn.close()
    await ws.close()


async def test_a_restarted_node_ends_its_own_in_process_tasks_at_once(make_node, pg_url):
    from server.storage.postgres.store import PgStore

    before = PgStore(pg_url, node_name="node-a")
    await before.open()
    await before.submit(Register("mine", 8, "long", origin="inprocess"))
    await before.close()
    a = await make_node("node-a")  # the same name: its previous run's tasks are its own
    resp = await a.get("/api/task/task/mine/status", headers=auth(8))
    task = (await resp.json())["data"]
    assert (task["status"], task["error_type"]) == ("failed", "interrupted")


async def test_a_second_live_node_with_the_same_name_is_refused(make_node, pg_url):
    """Two live nodes sharing a name would end each other's in-process tasks at start."""
    from server.storage.postgres.store import PgStore

    await make_node("node-a")
    twin = PgStore(pg_url, node_name="node-a", timeout=0.5)
    with pytest.raises(StoreRefused, match=r"node-a.*in use") as refused:
        await twin.open()
    assert "\n" not in str(refused.value)


async def test_a_live_nodes_in_process_tasks_are_left_alone(make_node):
    a, b = await two_nodes(make_node, node_timeout=1.0)
    await a.app[keys.TASKS].register(Register("alive", 8, "long", origin="inprocess"))
    assert await end_gone_nodes_tasks(b.app) == 0
    assert await end_gone_nodes_tasks(a.app) == 0


# ---- helpers ----------------------------------------------------------------------------------








async def listening(pg_server: Any, pg_url: str, node: str) -> bool:
    return await backends(pg_server, pg_url, f"taskpush {node} listen") == 1




# ---- the database failing under the nodes ----------------------------------------------------


async def collect_until(ws: Any, done: Callable[[list[dict[str, Any]]], bool],
                        timeout: float = 20.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    await recv_until(ws, lambda m: seen.append(m) or done(seen), timeout=timeout)
    return seen


def updates_of(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in seen if m["type"] in ("task_status", "task_deleted")]


async def test_a_killed_listening_connection_loses_no_acknowledged_change(make_node, pg_server,
                                                                          pg_url):
    a, b = await two_nodes(make_node)
    ws = await ws_connect(b, 12)
    await handshake(ws)
    assert await terminate(pg_server, pg_url, "taskpush node-b listen") == 1
    acked = []
    for i in range(10):  # acknowledged by A while B's listening connection is gone
        acked.append((await register(a, f"k-{i}", 12))["seq"])
        acked.append((await event(a, f"k-{i}", "completed"))["seq"])
    seen = await collect_until(ws, lambda s: len(updates_of(s)) >= len(acked))
    assert [m["seq"] for m in updates_of(seen)] == acked
    await until(lambda: listening(pg_server, pg_url, "node-b"))
    # and B still hears of later changes
    changed = await register(a, "k-last", 12)
    got = await recv_until(ws, lambda m: m.get("task_id") == "k-last")
    assert got[-1]["seq"] == changed["seq"]
    await ws.close()


async def test_a_postgresql_restart(make_node, pg_server, caplog):
    """While the database is down: 503 envelopes, /healthz 503 on both nodes, sockets stay
    open (they answer pings). When it is back: every acknowledged change reaches every
    socket, in seq order, and one log line marked each end of the outage on each node."""
    caplog.set_level(logging.DEBUG)
    a, b = await two_nodes(make_node, db_timeout=1.0)
    sockets = [await ws_connect(a, 11), await ws_connect(b, 11)]
    for ws in sockets:
        await handshake(ws)
    acked = [(await register(a, "pr-1", 11))["seq"], (await event(b, "pr-1", "running"))["seq"]]
    for ws in sockets:
        seen = await collect_until(ws, lambda s: len(updates_of(s)) == 2)
        assert [m["seq"] for m in updates_of(seen)] == acked
    answers: list[str] = []
    await asyncio.to_thread(pg_server.stop)
    try:
        resp = await a.post("/api/task/task/pr-1/events", headers=PRODUCER,
                            json={"status": "progress", "progress": 10})
        answers.append(await resp.text())
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
        assert (body["code"], body["data"]) == (503, None)
        assert body["message"].startswith("storage unavailable")
        resp = await b.post("/api/task/tasks", headers=PRODUCER,
                            json={"task_id": "never", "user_id": 11, "task_type": "x"})
        answers.append(await resp.text())
        assert resp.status == 503
        for node in (a, b):
            resp = await node.get("/healthz")
            answers.append(await resp.text())
            assert resp.status == 503
            resp = await node.get("/metrics")
            answers.append(await resp.text())
            assert "taskpush_storage_available 0.0" in answers[-1] or node is b
        for ws in sockets:  # still open, still served
            await ws.send_str('{"type":"ping"}')
            pong = await recv_until(ws, lambda m: m["type"] == "pong")
            assert pong[-1]["type"] == "pong"
    finally:
        await asyncio.to_thread(pg_server.start)
    for node in (a, b):
        await until(lambda node=node: healthy(node), timeout=20)
    acked.append((await event(a, "pr-1", "progress", progress=60))["seq"])
    acked.append((await register(b, "pr-2", 11))["seq"])
    acked.append((await event(b, "pr-1", "completed", result={"ok": True}))["seq"])
    for ws in sockets:
        seen = await collect_until(ws, lambda s: any(
            m.get("task_id") == "pr-1" and m.get("status") == "completed" for m in s)
            and any(m.get("task_id") == "pr-2" for m in s))
        seqs = [m["seq"] for m in updates_of(seen)]
        assert seqs == acked[2:], seqs
        await ws.close()
    began = [r for r in caplog.records if r.getMessage().startswith("storage unavailable")]
    ended = [r for r in caplog.records if r.getMessage().startswith("storage available again")]
    assert 1 <= len(began) <= 2 and len(ended) == len(began)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    everything = "\n".join([*answers, caplog.text])
    assert pg_server.password not in everything




async def test_a_hung_database_is_answered_503_within_db_timeout(make_node, pg_server):
    """SPEC: a database that does not answer within --db-timeout gets a 503 within
    --db-timeout (reads, writes and /healthz), also on a pooled connection whose statement
    the server never confirms cancelled. The write comes first, on a connection the pool
    holds idle (no read has ended one yet), whatever the node's timer does meanwhile."""
    db_timeout, margin = 1.0, 0.5
    a = await make_node("node-a", db_timeout=db_timeout)
    await register(a, "h-1", 5)
    await a.get("/api/task/task/h-1/status", headers=auth(5))  # a pooled connection
    with hung_postgres(pg_server):
        calls = [
            lambda: a.post("/api/task/task/h-1/events", headers=PRODUCER,
                           json={"status": "progress", "progress": 5}),
            lambda: a.get("/api/task/task/h-1/status", headers=auth(5)),
            lambda: a.get("/api/task/tasks", headers=auth(5)),
            lambda: a.get("/healthz"),
            lambda: a.post("/api/task/task/h-1/events", headers=PRODUCER,
                           json={"status": "progress", "progress": 6}),
        ]
        for call in calls:
            resp = await asyncio.wait_for(call(), db_timeout + margin)
            assert resp.status == 503
    await until(lambda: healthy(a), timeout=20)


async def healthy(node: Node) -> bool:
    resp = await node.get("/healthz")
    return resp.status == 200


async def test_the_database_password_is_never_logged_nor_shown(make_node, pg_server, pg_url,
                                                                caplog, config):
    caplog.set_level(logging.DEBUG)
    assert pg_server.password in pg_url
    a = await make_node("node-a")
    bodies = [await (await a.get(path)).text() for path in ("/healthz", "/metrics",
                                                            "/api/openapi.json")]
    assert pg_server.password not in repr(a.app[keys.CONFIG])
    wrong = pg_url.replace(pg_server.password, "not-the-password-0123")
    app = create_app(config.replace(db=wrong, node_name="node-w"))
    app.freeze()
    with pytest.raises(StoreRefused) as refused:
        await app.startup()
    message = str(refused.value)
    assert "credentials" in message and "not-the-password" not in message
    everything = "\n".join([*bodies, caplog.text, message])
    assert pg_server.password not in everything
    assert "not-the-password-0123" not in everything


async def test_a_node_that_lost_part_of_the_feed_closes_its_sockets_to_resume(make_node,
                                                                               pg_url):
    """Changes a node can no longer read (away longer than the feed is kept) are not
    skipped silently: its sockets are closed with 1013, and clients resume by seq."""
    a, b = await two_nodes(make_node)
    store_b = b.app[keys.STORE]
    await deafen(store_b)  # B reads nothing by itself from now on
    ws = await ws_connect(b, 13)
    await handshake(ws)
    for i in range(3):
        last = await register(a, f"lost-{i}", 13)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("DELETE FROM feed WHERE seq < $1", last["seq"])
    finally:
        await conn.close()
    await store_b.catch_up(last["seq"])
    code, _ = await expect_close(ws)
    assert code == 1013
    assert store_b.last_seq == last["seq"]


async def test_a_node_whose_missed_feed_was_purged_entirely_closes_its_sockets(make_node,
                                                                              pg_url):
    """Every feed row B missed is gone and nothing was written since: B's own next change
    must not reach its sockets as if nothing came before it (a client that sees seq N has
    not missed N-1): they are closed with 1013 first, and clients resume by seq."""
    a, b = await two_nodes(make_node)
    store_b = b.app[keys.STORE]
    await deafen(store_b)
    ws = await ws_connect(b, 23)
    await handshake(ws)
    before = store_b.last_seq
    for i in range(3):
        await register(a, f"purged-{i}", 23)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("DELETE FROM feed")  # the sweep leader's purge of old rows
    finally:
        await conn.close()
    mine = await register(b, "after-purge", 23)
    assert mine["seq"] == before + 4
    code, _ = await expect_close(ws)
    assert code == 1013
    assert store_b.last_seq == mine["seq"]


async def _waiting(conn: asyncpg.Connection, application: str) -> bool:
    """Whether a session of `application` waits for a lock."""
    return bool(await conn.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid"
        " WHERE NOT l.granted AND s.application_name = $1", application))


async def test_a_node_starting_while_another_writes_does_not_deadlock_it(make_node, pg_url):
    """A node starting on a current schema takes no table lock: a third session holding
    ROW EXCLUSIVE on `tasks` (as any writer might) delays neither B's start nor A's write
    into a deadlock (B applying the DDL again would take SHARE on tasks then events while
    A's batch holds events and waits for tasks)."""
    a = await make_node("node-a")
    x = await asyncpg.connect(pg_url)
    try:
        async with x.transaction():
            await x.execute("LOCK TABLE tasks IN ROW EXCLUSIVE MODE")
            b = await make_node("node-b")
            created = await register(a, "dl-1", 82)
    finally:
        await x.close()
    assert created["task_id"] == "dl-1"
    assert await healthy(b)


async def test_nodes_starting_while_another_writes_cause_no_500(make_node):
    """Nodes start one after another while A's producers write: every write is answered
    201 and every node starts."""
    a = await make_node("node-a", max_active_tasks=10**6)
    stop = asyncio.Event()
    statuses: list[int] = []

    async def produce(prefix: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            resp = await a.post("/api/task/tasks", headers=PRODUCER,
                                json={"task_id": f"{prefix}-{i}", "user_id": 81,
                                      "task_type": "x"})
            statuses.append(resp.status)

    producers = [asyncio.create_task(produce(p)) for p in ("da", "db", "dc", "dd")]
    try:
        await until(lambda: len(statuses) >= 10)
        for n in range(12):
            await make_node(f"node-{n}", max_active_tasks=10**6)
    finally:
        stop.set()
        await asyncio.gather(*producers)
    assert set(statuses) == {201}, sorted(set(statuses))


async def test_a_batch_chosen_as_a_deadlock_victim_is_retried_not_a_500(make_node, pg_url):
    """Another session's transaction and A's batch wait for each other: PostgreSQL ends
    A's (it waited first). A tries the batch again within the caller's deadline: the
    caller gets its answer, never a 500."""
    a = await make_node("node-a")
    await register(a, "dv-1", 83)
    x = await asyncpg.connect(pg_url)
    watch = await asyncpg.connect(pg_url)
    try:
        tr = x.transaction()
        await tr.start()
        await x.execute("UPDATE tasks SET message = message WHERE task_id = 'dv-1'")
        writing = asyncio.create_task(a.post(
            "/api/task/task/dv-1/events", headers=PRODUCER,
            json={"status": "progress", "progress": 10}))
        await until(lambda: _waiting(watch, "taskpush node-a"))  # A waits for the row
        await x.fetchval("SELECT seq FROM seq_counter WHERE id = 1 FOR UPDATE")
        await tr.commit()
        resp = await writing
    finally:
        await x.close()
        await watch.close()
    assert resp.status == 200, await resp.text()


async def stick(store: Any, pg_url: str) -> tuple[asyncpg.Connection, asyncio.Task[Any]]:
    """The node's listening backend stops answering without its session ending (as a stuck
    backend, or a half-open TCP connection, until keepalive ends it): it waits for an
    advisory lock a test session holds. Returns that session and the stuck statement."""
    holder = await asyncpg.connect(pg_url)
    await holder.execute("SELECT pg_advisory_lock(4242)")
    conn = store.listener.conn

    async def stuck() -> Any:
        async with store.listener.lock:
            return await conn.execute("SELECT pg_advisory_lock(4242)", timeout=60)

    task = asyncio.create_task(stuck())
    await until(lambda: _waiting(holder, f"taskpush {store.node} listen"))
    return holder, task


async def unstick(holder: asyncpg.Connection, task: asyncio.Task[Any]) -> None:
    await holder.close()
    with contextlib.suppress(Exception):
        await task


async def test_a_stuck_listening_backend_does_not_stop_the_cluster_jobs(make_node, pg_url):
    """A gives up on its stuck listening connection and replaces it: the stuck session
    (and the job lock it holds) is ended server-side, so some node leads the sweep again."""
    a, b = await two_nodes(make_node, db_timeout=1.0)
    store_a, store_b = a.app[keys.STORE], b.app[keys.STORE]
    assert await store_a.lead("sweep") is True
    holder, task = await stick(store_a, pg_url)
    try:
        assert await store_a.lead("sweep") is False  # times out: A replaces its connection

        async def someone_leads() -> bool:
            return await store_a.lead("sweep") or await store_b.lead("sweep")

        await until(someone_leads, timeout=15)
    finally:
        await unstick(holder, task)


async def test_after_a_stuck_listener_the_node_name_stays_locked(make_node, pg_server, pg_url):
    """Same start: once A listens again, its name is locked again (else a second live
    node-a starts, and each ends the other's in-process tasks)."""
    a = await make_node("node-a", db_timeout=1.0)
    store_a = a.app[keys.STORE]
    first = store_a.listener.conn
    holder, task = await stick(store_a, pg_url)
    try:
        assert await store_a.lead("sweep") is False
        await until(lambda: store_a.listener.conn not in (None, first))  # A listens again
        await until(lambda: listening(pg_server, pg_url, "node-a"))  # the stuck one ended
    finally:
        await unstick(holder, task)
    await a.app[keys.TASKS].register(Register("ip-a", 61, "long", origin="inprocess"))
    from server.storage.postgres.store import PgStore

    twin = PgStore(pg_url, node_name="node-a", timeout=1.0)
    with pytest.raises(StoreRefused, match=r"node-a.*in use"):
        await twin.open()
    resp = await a.get("/api/task/task/ip-a/status", headers=auth(61))
    assert (await resp.json())["data"]["status"] == "pending"


async def test_a_node_name_held_by_a_stopped_backend_goes_back_to_its_node_first(
        make_node, pg_server, pg_url):
    """A's listening backend is stopped (SIGSTOP: it cannot even be ended until it runs
    again) and keeps A's name: A listens again on a new connection and queues for its
    name, so when the old backend ends, the name is A's again before any other process
    can take it (a second node-a is refused, and A's in-process task lives on)."""
    from server.storage.postgres.store import PgStore

    a = await make_node("node-a", db_timeout=1.0)
    store_a = a.app[keys.STORE]
    first = store_a.listener.conn
    pid = await backends(pg_server, pg_url, "taskpush node-a listen", "max(pid)")
    watch = await asyncpg.connect(pg_url)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert await store_a.lead("sweep") is False
        await until(lambda: store_a.listener.conn not in (None, first))  # A listens again
        await until(lambda: _waiting(watch, "taskpush node-a name"))  # queued for its name
    finally:
        os.kill(pid, signal.SIGCONT)
    await until(lambda: not os.path.exists(f"/proc/{pid}"))  # the old backend has ended
    await watch.close()
    await a.app[keys.TASKS].register(Register("ip-a", 62, "long", origin="inprocess"))
    twin = PgStore(pg_url, node_name="node-a", timeout=1.0)
    with pytest.raises(StoreRefused, match=r"node-a.*in use"):
        await twin.open()
    resp = await a.get("/api/task/task/ip-a/status", headers=auth(62))
    assert (await resp.json())["data"]["status"] == "pending"


async def test_a_change_in_active_tasks_is_not_sent_again_live_by_a_lagging_node(make_node):
    """B has not read A's change from the feed when a socket connects to it: the change
    is in `active_tasks` (read from the database); when B reads it later, the socket does
    not get it a second time (SPEC: live updates with no gap and no duplicate)."""
    a, b = await two_nodes(make_node)
    store_b = b.app[keys.STORE]
    await deafen(store_b)
    created = await register(a, "dup-1", 71)
    ws = await ws_connect(b, 71)
    connected, active = await handshake(ws)
    assert [(t["task_id"], t["seq"]) for t in active["tasks"]] == [("dup-1", created["seq"])]
    assert connected["seq"] < created["seq"]
    await store_b.catch_up(created["seq"])  # B reads the feed (its timer would, later)
    marker = await register(b, "marker", 71)
    seen = await recv_until(ws, lambda m: m.get("task_id") == "marker")
    assert [m for m in seen if m.get("task_id") == "dup-1"] == []
    assert seen[-1]["seq"] == marker["seq"]
    await ws.close()


async def test_a_socket_on_a_node_starting_while_another_writes_sees_each_change_once(
        make_node):
    """B starts and a socket connects to it while A commits continuously: every change
    after the socket's `connected` seq reaches it exactly once, in `active_tasks` or live,
    live ones in seq order."""
    a = await make_node("node-a", max_active_tasks=10**6)
    stop = asyncio.Event()
    acked: list[int] = []

    async def produce(prefix: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            acked.append((await register(a, f"{prefix}-{i}", 51))["seq"])

    producers = [asyncio.create_task(produce(p)) for p in ("sa", "sb", "sc")]
    try:
        await until(lambda: len(acked) >= 20)
        b = await make_node("node-b", max_active_tasks=10**6)
        ws = await ws_connect(b, 51)
        connected, active = await handshake(ws)
        enough = len(acked) + 100
        await until(lambda: len(acked) >= enough, timeout=30)
    finally:
        stop.set()
        await asyncio.gather(*producers)
    top = max(acked)
    seen = await collect_until(ws, lambda s: s[-1].get("seq") == top)
    live = [m["seq"] for m in seen if m["type"] == "task_status"]
    assert live == sorted(set(live)), live
    start = connected["seq"]
    in_snapshot = {t["seq"] for t in active["tasks"] if t["seq"] > start}
    assert not in_snapshot & set(live)
    assert sorted(in_snapshot | set(live)) == list(range(start + 1, top + 1))
    await ws.close()


async def test_a_since_older_than_another_nodes_purge_is_a_resync_on_every_node(make_node):
    """The sweep leader (A) forgot tombstones: a `since` before them gets `resync` on B as
    on A (SPEC: a since older than the kept tombstones gets resync), on a socket and on a
    poll, once B has heard of the purge (a NOTIFY; else on its next feed read)."""
    a, b = await two_nodes(make_node)
    await register(a, "swept", 41)
    await event(a, "swept", "completed")
    resp = await a.delete("/api/task/task/swept", headers=auth(41))
    assert resp.status == 200
    store_a, store_b = a.app[keys.STORE], b.app[keys.STORE]
    assert await store_a.purge_tombstones("9999-12-31T00:00:00Z") == 1
    await until(lambda: store_b.horizon == store_a.horizon)
    for node in (a, b):
        resp = await node.get("/api/task/tasks?since=1", headers=auth(41))
        assert (await resp.json())["data"]["resync"] is True
        ws = await ws_connect(node, 41, query="since=1")
        seen = await recv_until(ws, lambda m: m["type"] == "active_tasks")
        assert [m["type"] for m in seen] == ["connected", "resync", "active_tasks"]
        await ws.close()


# ---- configuration -----------------------------------------------------------------------------


def test_cluster_settings_are_flags_and_environment_variables() -> None:
    import socket

    from server.config import ConfigError, parse_config

    args = ["--jwt-secret", "x" * 20]
    config = parse_config([*args, "--node-timeout", "12.5", "--node-name", "eu-1"], {})
    assert (config.node_timeout, config.node_name, config.node) == (12.5, "eu-1", "eu-1")
    config = parse_config(args, {"TASKPUSH_NODE_NAME": "eu-2", "TASKPUSH_NODE_TIMEOUT": "3"})
    assert (config.node_timeout, config.node) == (3.0, "eu-2")
    config = parse_config([*args, "--port", "8123"], {})
    assert (config.node_timeout, config.node) == (30.0, f"{socket.gethostname()}:8123")
    for bad in (["--node-timeout", "0"], ["--node-timeout", "-1"], ["--node-name", "a\nb"],
                ["--node-name", "x" * 201]):
        with pytest.raises(ConfigError) as refused:
            parse_config([*args, *bad], {})
        assert bad[0] in str(refused.value)
    shown = repr(parse_config([*args, "--db", "postgresql://u:hunter2hunter2@db/x"], {}))
    assert "hunter2" not in shown and "postgresql://u:***@db/x" in shown
