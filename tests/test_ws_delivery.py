"""Delivery guarantees of the WebSocket: resume with `since`, slow consumers (coalescing,
4408), limits (frame size, flood, subscriptions, connections per user), token lifetime and
protocol-level pings."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from server.push.session import OP_BINARY, OP_BROKEN, OP_PING, OP_PONG, OP_TEXT
from server.web.drain import DRAIN_TICK, wait_writable, writing_paused
from tests.conftest import (
    PRODUCER,
    auth,
    event,
    handshake,
    make_token,
    recv,
    register,
    ws_connect,
)


async def post_batch(client: TestClient, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One request: every event is committed in one group commit and published at once."""
    resp = await client.post("/api/task/events", headers=PRODUCER, json={"events": events})
    assert resp.status == 200, await resp.text()
    results = (await resp.json())["data"]["results"]
    assert all(r["ok"] for r in results), results
    return results


async def read_until_close(ws: Any, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int]:
    """Every data message up to the close, and the code of the server's close frame (what a
    browser reports; aiohttp's own `close_code` turns into 1006 when the server drops the
    TCP connection right after its close frame, before the client's reply)."""
    seen: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"no close; saw {seen[-5:]}"
        msg = await ws.receive(timeout=remaining)
        if msg.type == WSMsgType.TEXT:
            seen.append(json.loads(msg.data))
            continue
        assert msg.type == WSMsgType.CLOSE, (msg, seen[-5:])
        return seen, msg.data


async def close_frame(ws: Any, timeout: float = 10.0) -> tuple[int, str]:
    """The server's close frame (code, reason), which must be the next message."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type == WSMsgType.CLOSE, (msg.type, msg.data)
    return msg.data, msg.extra or ""


async def connections(client: TestClient) -> int:
    return (await (await client.get("/healthz")).json())["connections"]


# ---- resume with since --------------------------------------------------------------------


async def test_since_replays_what_changed_while_away(client):
    await register(client, "a", 1)
    await register(client, "b", 1)
    await event(client, "b", "completed", result="old")
    await register(client, "d", 1)
    await event(client, "d", "completed")
    await register(client, "o", 2)
    ws = await ws_connect(client, 1)
    connected, _ = await handshake(ws)
    since = connected["seq"]
    await ws.close()

    # away: a runs to completion, c appears and progresses, d is deleted, user 2 works
    await event(client, "a", "running")
    await event(client, "a", "progress", progress=50)
    a_done = await event(client, "a", "completed", result={"answer": 42})
    await register(client, "c", 1)
    c_now = await event(client, "c", "progress", progress=10)
    assert (await client.delete("/api/task/task/d", headers=auth(1))).status == 200
    await event(client, "o", "running")

    ws = await ws_connect(client, 1, query=f"since={since}")
    connected, active = await handshake(ws)
    assert [t["task_id"] for t in active["tasks"]] == ["c"]
    replay = [await recv(ws) for _ in range(3)]
    assert [(m["type"], m["task_id"]) for m in replay] == [
        ("task_status", "a"), ("task_status", "c"), ("task_deleted", "d")]
    assert replay[0]["status"] == "completed" and replay[0]["result"] == {"answer": 42}
    assert replay[0]["seq"] == a_done["seq"]
    assert replay[1]["seq"] == c_now["seq"] and replay[1]["progress"] == 10
    assert connected["seq"] > replay[1]["seq"]

    # live from here: the next messages are exactly the next changes, nothing repeated
    live = await event(client, "c", "progress", progress=20)
    await register(client, "e", 1)
    nxt = [await recv(ws), await recv(ws)]
    assert [(m["task_id"], m["seq"]) for m in nxt] == [("c", live["seq"]), ("e", live["seq"] + 1)]
    await ws.close()


async def test_since_zero_replays_everything_including_finished(client):
    await register(client, "f1", 1)
    await event(client, "f1", "failed", error="boom", error_type="RuntimeError")
    await register(client, "p1", 1)
    ws = await ws_connect(client, 1, query="since=0")
    await handshake(ws)
    first, second = await recv(ws), await recv(ws)
    assert (first["task_id"], first["status"], first["error"]) == ("f1", "failed", "boom")
    assert (second["task_id"], second["status"]) == ("p1", "pending")
    await ws.close()


async def test_since_current_seq_replays_nothing(client):
    await register(client, "t", 1)
    await register(client, "m", 1)
    ws = await ws_connect(client, 1)
    connected, _ = await handshake(ws)
    await ws.close()
    ws = await ws_connect(client, 1, query=f"since={connected['seq']}")
    await handshake(ws)
    marker = await event(client, "m", "running")
    msg = await recv(ws)
    assert (msg["task_id"], msg["seq"]) == ("m", marker["seq"])
    await ws.close()


async def test_epoch_mismatch_resyncs_without_replay(client):
    await register(client, "t", 1)
    await event(client, "t", "completed")
    await register(client, "m", 1)
    ws = await ws_connect(client, 1, query="since=0&epoch=not-this-database")
    assert (await recv(ws))["type"] == "connected"
    assert await recv(ws) == {"type": "resync"}
    active = await recv(ws)
    assert active["type"] == "active_tasks" and [t["task_id"] for t in active["tasks"]] == ["m"]
    await event(client, "m", "running")
    msg = await recv(ws)  # not the replay of t
    assert (msg["type"], msg["task_id"], msg["status"]) == ("task_status", "m", "running")
    await ws.close()


async def test_matching_epoch_replays(client):
    await register(client, "t", 1)
    health = await (await client.get("/healthz")).json()
    ws = await ws_connect(client, 1, query=f"since=0&epoch={health['epoch']}")
    await handshake(ws)
    msg = await recv(ws)
    assert (msg["type"], msg["task_id"]) == ("task_status", "t")
    await ws.close()


async def test_since_beyond_latest_resyncs(client):
    await register(client, "t", 1)
    await register(client, "m", 1)
    ws = await ws_connect(client, 1, query="since=999999")
    assert (await recv(ws))["type"] == "connected"
    assert await recv(ws) == {"type": "resync"}
    assert (await recv(ws))["type"] == "active_tasks"
    await event(client, "m", "running")
    msg = await recv(ws)
    assert (msg["task_id"], msg["status"]) == ("m", "running")
    await ws.close()


async def test_invalid_since_is_an_error_after_the_handshake(client):
    await register(client, "m", 1)
    ws = await ws_connect(client, 1, query="since=abc")
    await handshake(ws)
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == "invalid_since"
    await event(client, "m", "running")
    assert (await recv(ws))["task_id"] == "m"
    await ws.close()


async def test_reconnect_loop_misses_nothing_and_repeats_nothing(client):
    """50 reconnects with since=<last seq seen> while a producer keeps changing 5 tasks; each
    connection reads a random number of messages then leaves."""
    rng = random.Random(20240611)
    ids = [f"r{i}" for i in range(5)]
    for task_id in ids[:3]:
        await register(client, task_id, 1)
    registered = ids[:3]
    reconnects = 0
    final_seq: dict[str, int] = {}

    async def produce() -> None:
        n = 0
        while reconnects < 40:
            n += 1
            if n == 3:
                for task_id in ids[3:]:
                    await register(client, task_id, 1)
                registered.extend(ids[3:])
            for task_id in list(registered):
                await event(client, task_id, "progress", progress=min(99, n), message=f"n{n}")
        for task_id in ids:
            if task_id not in registered:
                await register(client, task_id, 1)
        for task_id in ids:
            final_seq[task_id] = (await event(client, task_id, "completed",
                                              result={"id": task_id}))["seq"]

    producer = asyncio.create_task(produce())
    state: dict[str, dict[str, Any]] = {}  # the client's view of each task
    pushed: dict[str, int] = {}  # per task, the seq of the last task_status/task_deleted
    since: int | None = None

    def take(message: dict[str, Any], seen_here: set[int]) -> None:
        nonlocal since
        assert message["type"] == "task_status", message  # (nothing is deleted here)
        task_id, seq = message["task_id"], message["seq"]
        assert seq not in seen_here, f"seq {seq} twice on one connection"
        seen_here.add(seq)
        assert seq > pushed.get(task_id, 0), (task_id, seq, pushed.get(task_id))
        pushed[task_id] = seq
        state[task_id] = message
        since = seq if since is None else max(since, seq)

    async def session(read_all: bool, budget: int) -> None:
        nonlocal since
        query = "" if since is None else f"since={since}"
        ws = await ws_connect(client, 1, query=query)
        connected, active = await handshake(ws)
        for task in active["tasks"]:  # may repeat what the replay then sends: never older
            assert task["seq"] >= pushed.get(task["task_id"], 0), task
            state[task["task_id"]] = task
        if since is None:
            since = connected["seq"]
        seen_here: set[int] = set()

        def finished() -> bool:
            return all(state.get(t, {}).get("seq") == final_seq.get(t) for t in ids)

        while budget > 0 or (read_all and not finished()):
            budget -= 1
            try:
                message = await recv(ws, timeout=5.0 if read_all else 0.03)
            except TimeoutError:
                if read_all:
                    raise
                break
            take(message, seen_here)
        await ws.close()

    try:
        for _ in range(50):
            await session(False, rng.randint(0, 8))
            reconnects += 1
        await asyncio.wait_for(producer, 30)
    finally:
        producer.cancel()
    await session(True, 0)
    for task_id in ids:
        assert state[task_id]["status"] == "completed", state[task_id]
        assert state[task_id]["seq"] == final_seq[task_id]
        assert state[task_id]["result"] == {"id": task_id}


# ---- slow consumers -----------------------------------------------------------------------


async def test_lagging_client_gets_progress_coalesced_but_every_terminal(make_client):
    client = await make_client(send_queue=50)
    ids = [f"s{i}" for i in range(10)]
    for task_id in ids:
        await register(client, task_id, 1)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    events = [{"task_id": t, "status": "progress", "progress": r * 4, "message": f"round {r}"}
              for r in range(1, 21) for t in ids]
    events += [{"task_id": t, "status": "completed", "result": {"t": t}} for t in ids]
    results = await post_batch(client, events)  # 210 changes while the client reads nothing
    final = {r["task_id"]: r["seq"] for r in results[-len(ids):]}

    got: list[dict[str, Any]] = []
    done: set[str] = set()
    while done != set(ids):
        msg = await recv(ws)
        assert msg["type"] == "task_status"
        got.append(msg)
        if msg["status"] == "completed":
            done.add(msg["task_id"])
            assert msg["seq"] == final[msg["task_id"]] and msg["result"] == {"t": msg["task_id"]}
    assert len(got) < len(events)
    for task_id in ids:
        mine = [m for m in got if m["task_id"] == task_id]
        assert [m["seq"] for m in mine] == sorted({m["seq"] for m in mine})
        assert mine[-1]["status"] == "completed"
        progress = [m for m in mine if m["status"] == "progress"]
        # what survives of progress is the latest of it
        assert progress and progress[-1]["progress"] == 80 and progress[-1]["message"] == "round 20"
    metrics = await (await client.get("/metrics")).text()
    merged = [line for line in metrics.splitlines()
              if line.startswith("taskpush_updates_coalesced_total ")]
    assert merged and float(merged[0].split()[1]) > 0
    await ws.close()


async def test_too_far_behind_closed_4408_others_served_and_resume(make_client):
    client = await make_client(send_queue=50, send_timeout=1.0)
    ids = [f"x{i:02d}" for i in range(60)]
    for task_id in ids:
        await register(client, task_id, 1)
    await register(client, "theirs", 2)
    slow = await ws_connect(client, 1)
    connected, _ = await handshake(slow)
    other = await ws_connect(client, 2)
    await handshake(other)

    # more distinct tasks changed at once than the socket may buffer
    await post_batch(client, [{"task_id": t, "status": "progress", "progress": 5} for t in ids])
    served = await event(client, "theirs", "running")
    msg = await recv(other)
    assert (msg["task_id"], msg["seq"]) == ("theirs", served["seq"])

    seen, code = await read_until_close(slow)
    assert code == 4408
    assert all(m["type"] == "task_status" for m in seen)

    # resume: every change since the last seq seen arrives
    since = max([m["seq"] for m in seen], default=connected["seq"])
    again = await ws_connect(client, 1, query=f"since={since}")
    await handshake(again)
    replayed = {m["task_id"] for m in seen}
    while replayed != set(ids):
        m = await recv(again)
        assert m["type"] == "task_status" and m["progress"] == 5
        replayed.add(m["task_id"])
    await again.close()
    await other.close()


# ---- limits -------------------------------------------------------------------------------


async def test_oversized_frame_closes_1009(make_client):
    client = await make_client(max_frame_bytes=1024)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_json({"type": "ping", "pad": "x" * 900})  # under the limit: fine
    assert (await recv(ws))["type"] == "pong"
    await ws.send_str('{"type":"ping","pad":"' + "x" * 2000 + '"}')
    code, _ = await close_frame(ws)
    assert code == 1009


def frame_of(size: int) -> str:
    """A ping message whose UTF-8 encoding is exactly `size` bytes."""
    head, tail = '{"type":"ping","pad":"', '"}'
    return head + "x" * (size - len(head) - len(tail)) + tail


async def test_a_frame_of_exactly_max_frame_bytes_is_accepted(make_client):
    """--max-frame-bytes is the largest inbound frame: that size is answered, one byte more
    closes 1009 (aiohttp's max_msg_size is exclusive, so the server passes limit + 1)."""
    client = await make_client(max_frame_bytes=1024)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_str(frame_of(1024))
    assert (await recv(ws))["type"] == "pong"
    await ws.send_str(frame_of(1025))
    code, _ = await close_frame(ws)
    assert code == 1009


@pytest.mark.slow  # takes seconds
async def test_flood_gets_rate_limited_then_closed_1008(make_client):
    client = await make_client(rate_limit=5, rate_burst=5, flood_strikes=10)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    for _ in range(40):
        await ws.send_str('{"type":"ping"}')
    seen, code = await read_until_close(ws)
    assert code == 1008
    kinds = [m.get("code") or m["type"] for m in seen]
    assert "rate_limited" in kinds and kinds.count("rate_limited") == 1
    assert 1 <= kinds.count("pong") < 40
    assert kinds.index("rate_limited") > kinds.index("pong")


async def test_slow_enough_client_is_not_rate_limited(make_client):
    client = await make_client(rate_limit=5, rate_burst=5, flood_strikes=10)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    for _ in range(12):  # each answered before the next: at most the burst within ~0 s...
        await ws.send_str('{"type":"ping"}')
        msg = await recv(ws)
        if msg.get("code") == "rate_limited":
            await asyncio.sleep(0.25)  # ...then the bucket refills at 5/s
            continue
        assert msg["type"] == "pong"
    assert not ws.closed
    await ws.close()


async def test_max_subscriptions(make_client):
    client = await make_client(max_subscriptions=2)
    for task_id in ("a", "b", "c"):
        await register(client, task_id, 1)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    for task_id in ("a", "b"):
        await ws.send_json({"type": "subscribe", "task_id": task_id})
        assert (await recv(ws))["type"] == "subscribed"
        assert (await recv(ws))["type"] == "task_status"
    await ws.send_json({"type": "subscribe", "task_id": "c"})
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == "too_many_subscriptions"
    await ws.send_json({"type": "subscribe", "task_id": "a"})  # already held: still fine
    assert (await recv(ws))["type"] == "subscribed"
    assert (await recv(ws))["type"] == "task_status"
    await ws.send_json({"type": "unsubscribe", "task_id": "b"})
    assert (await recv(ws))["type"] == "unsubscribed"
    await ws.send_json({"type": "subscribe", "task_id": "c"})  # room again
    assert (await recv(ws))["type"] == "subscribed"
    await ws.close()


async def test_connections_per_user_closes_the_oldest_4409(make_client):
    client = await make_client(max_connections_per_user=2)
    first = await ws_connect(client, 1)
    await handshake(first)
    second = await ws_connect(client, 1)
    await handshake(second)
    elsewhere = await ws_connect(client, 2)
    await handshake(elsewhere)
    third = await ws_connect(client, 1)
    await handshake(third)
    code, reason = await close_frame(first)
    assert code == 4409 and reason
    for ws in (second, third, elsewhere):
        await ws.send_json({"type": "ping"})
        assert (await recv(ws))["type"] == "pong"
        await ws.close()


# ---- token lifetime -----------------------------------------------------------------------


def short_token(user_id: int, seconds: float) -> tuple[str, int]:
    """A token expiring at a whole second at least `seconds` from now."""
    exp = int(time.time() + seconds) + 1
    return make_token(user_id, ttl=None, exp=exp), exp


@pytest.mark.slow  # takes seconds
async def test_token_expiring_then_closed_4401(make_client):
    client = await make_client(jwt_leeway=0)
    token, exp = short_token(1, 1.5)
    ws = await ws_connect(client, 1, token=token)
    await handshake(ws)
    notice = await recv(ws)  # within a minute of exp: at once
    assert notice["type"] == "token_expiring" and 0 <= notice["expires_in"] <= 3
    await ws.send_json({"type": "refresh", "token": "garbage"})
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == "invalid_token"
    code, reason = await close_frame(ws)
    assert code == 4401 and "token expired" in reason
    assert time.time() >= exp - 0.5  # not before exp (whole-second clocks)


@pytest.mark.slow  # takes seconds
async def test_refresh_extends_and_foreign_refresh_does_not(make_client):
    client = await make_client(jwt_leeway=0)
    token, exp = short_token(1, 1.5)
    kept = await ws_connect(client, 1, token=token)
    await handshake(kept)
    assert (await recv(kept))["type"] == "token_expiring"
    foreign = await ws_connect(client, 1, token=token)
    await handshake(foreign)
    assert (await recv(foreign))["type"] == "token_expiring"

    await kept.send_json({"type": "refresh", "token": make_token(1, ttl=3600)})
    refreshed = await recv(kept)
    assert refreshed["type"] == "refreshed" and refreshed["expires_at"] > "2000"
    await foreign.send_json({"type": "refresh", "token": make_token(2, ttl=3600)})
    err = await recv(foreign)
    assert err["type"] == "error" and err["code"] == "forbidden"

    code, reason = await close_frame(foreign)  # identity unchanged: old exp
    assert code == 4401 and "expired" in reason
    await asyncio.sleep(max(0.0, exp + 0.3 - time.time()))  # let the old exp pass
    await kept.send_json({"type": "ping"})
    assert (await recv(kept))["type"] == "pong"
    await register(client, "after", 1)
    assert (await recv(kept))["task_id"] == "after"
    await kept.close()


async def test_long_token_gets_no_expiry_notice(client):
    ws = await ws_connect(client, 1, token=make_token(1, ttl=3600))
    await handshake(ws)
    await ws.send_json({"type": "ping"})
    assert (await recv(ws))["type"] == "pong"
    await ws.close()


# ---- protocol-level pings -----------------------------------------------------------------


@pytest.mark.slow  # takes seconds
async def test_dead_peer_dropped_by_protocol_ping(make_client):
    client = await make_client(ping_interval=0.25, ping_timeout=1.0)
    alive = await ws_connect(client, 2)  # autoping, and always reading: answers every ping
    await handshake(alive)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def reader() -> None:
        async for msg in alive:  # receive() is where the client answers pings
            inbox.put_nowait(json.loads(msg.data))

    reading = asyncio.create_task(reader())
    dead = await ws_connect(client, 1, autoping=False)
    await handshake(dead)  # ...and from here on never reads nor answers a ping
    assert await connections(client) == 2
    deadline = asyncio.get_running_loop().time() + 10
    while await connections(client) != 1:
        assert asyncio.get_running_loop().time() < deadline, "dead peer never dropped"
        await asyncio.sleep(0.05)
    metrics = await (await client.get("/metrics")).text()
    assert "taskpush_websocket_connections 1.0" in metrics.splitlines()
    await asyncio.sleep(0.5)  # several more ping intervals: the live peer stays
    await alive.send_json({"type": "ping"})
    assert (await asyncio.wait_for(inbox.get(), 5))["type"] == "pong"
    assert await connections(client) == 1
    await alive.close()
    await reading
    await dead.close()


# ---- resume: more changes than the control queue holds -----------------------------------


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


# ---- the driver's edges with aiohttp -------------------------------------------------------

def test_the_sessions_opcodes_are_aiohttps_message_types() -> None:
    """ws.py hands aiohttp's `msg.type` to `Session.receive` as an RFC 6455 opcode."""
    assert (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG) == (
        OP_TEXT, OP_BINARY, OP_PING, OP_PONG)
    assert OP_BROKEN not in {int(t) for t in WSMsgType}


async def test_wait_writable_waits_for_the_peer_to_read() -> None:
    """`drain.wait_writable` returns once the peer has taken what the transport held
    (its buffer back at the low-water mark), and fails once the connection is lost. It
    reads public transport methods only, so it needs no aiohttp private: here the
    transport's protocol is a bare asyncio one."""
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        await asyncio.wait_for(wait_writable(transport), 5)  # nothing held: returns at once
        transport.set_write_buffer_limits(high=1024)
        size = 8 * 1024 * 1024  # more than the kernel takes from a peer that does not read
        transport.write(b"x" * size)
        assert writing_paused(transport)
        waiter = asyncio.ensure_future(wait_writable(transport))
        await asyncio.wait({waiter}, timeout=20 * DRAIN_TICK)
        assert not waiter.done()  # nothing was read: it waits

        def read_all() -> None:
            got = 0
            while got < size:
                got += len(peer.recv(1 << 20))

        await loop.run_in_executor(None, read_all)
        await asyncio.wait_for(waiter, 10)  # the peer took it: writable again
        assert not writing_paused(transport)
        transport.write(b"x" * size)
        lost = asyncio.ensure_future(wait_writable(transport))
        await asyncio.wait({lost}, timeout=20 * DRAIN_TICK)
        assert not lost.done()
        transport.abort()  # the connection is lost while a writer waits
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(lost, 10)
    finally:
        transport.close()
        peer.close()
