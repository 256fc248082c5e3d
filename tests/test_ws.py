"""The WebSocket protocol of SPEC, from the outside: auth closes, the connect sequence,
live routing, client messages and their errors, and a client of the original design."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
import warnings
from typing import Any

import jwt
import pytest
from aiohttp import WSMsgType
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import (
    SECRET,
    auth,
    event,
    expect_close,
    handshake,
    make_token,
    recv,
    register,
    ws_connect,
)

# ---- authentication: the upgrade is accepted, then closed at once -----------------------


async def test_missing_token_closes_4401(client):
    ws = await client.ws_connect("/api/task/ws/task/1")
    code, reason = await expect_close(ws)
    assert code == 4401 and "missing" in reason


async def test_empty_token_closes_4401(client):
    ws = await ws_connect(client, 1, token="")
    code, reason = await expect_close(ws)
    assert code == 4401 and "missing" in reason


@pytest.mark.parametrize("token", [
    "garbage",
    "a.b.c",
    make_token(1, secret="another-secret-0123456789-abcdefghijkl"),
    make_token("alice"),  # sub is not a user id
    jwt.encode({"exp": 9999999999}, SECRET, algorithm="HS256"),  # no sub
], ids=["garbage", "three-parts", "wrong-secret", "sub-not-digits", "no-sub"])
async def test_invalid_token_closes_4401(client, token):
    ws = await ws_connect(client, 1, token=token)
    code, reason = await expect_close(ws)
    assert code == 4401 and "invalid" in reason


async def test_expired_token_closes_4401(make_client):
    client = await make_client(jwt_leeway=0)
    ws = await ws_connect(client, 1, token=make_token(1, ttl=-5))
    code, reason = await expect_close(ws)
    assert code == 4401 and "expired" in reason


async def test_expired_within_leeway_is_accepted(client):
    """The default 30 s leeway tolerates clock skew."""
    ws = await ws_connect(client, 1, token=make_token(1, ttl=-5))
    await handshake(ws)
    await ws.close()


def _signed(algorithm: str, key: Any) -> str:
    with warnings.catch_warnings():  # a short HMAC key for HS512 warns; irrelevant here
        warnings.simplefilter("ignore")
        return jwt.encode({"sub": "1", "exp": 9999999999}, key, algorithm=algorithm)


@pytest.mark.parametrize("token", [
    jwt.encode({"sub": "1"}, None, algorithm="none"),
    jwt.encode({"sub": "1"}, None, algorithm="none") + "sig",
    _signed("HS512", SECRET),
    _signed("HS384", SECRET),
    _signed("ES256", ec.generate_private_key(ec.SECP256R1())),
], ids=["alg-none", "alg-none-with-sig", "HS512", "HS384", "ES256"])
async def test_other_algorithms_close_4401(client, token):
    ws = await ws_connect(client, 1, token=token)
    code, reason = await expect_close(ws)
    assert code == 4401 and "invalid" in reason


async def test_token_of_other_user_closes_4403(client):
    ws = await ws_connect(client, 1, token=make_token(2))
    code, _ = await expect_close(ws)
    assert code == 4403


async def test_admin_token_of_other_user_still_closes_4403(client):
    ws = await ws_connect(client, 1, token=make_token(2, admin=True))
    code, _ = await expect_close(ws)
    assert code == 4403


async def test_refused_socket_gets_no_updates_and_is_not_counted(client):
    await register(client, "t1", 1)
    ws = await ws_connect(client, 1, token="garbage")
    await expect_close(ws)
    health = await (await client.get("/healthz")).json()
    assert health["connections"] == 0


# ---- connect sequence ---------------------------------------------------------------------


async def test_connected_message_fields(client):
    await register(client, "t0", 1)
    health = await (await client.get("/healthz")).json()
    ws = await ws_connect(client, 1)
    connected, _ = await handshake(ws)
    assert set(connected) >= {"type", "connection_id", "message", "timestamp", "epoch", "seq"}
    assert str(uuid.UUID(connected["connection_id"])) == connected["connection_id"]
    stamp = dt.datetime.fromisoformat(connected["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - stamp) < dt.timedelta(minutes=5)
    assert connected["epoch"] == health["epoch"] and connected["epoch"]
    assert connected["seq"] == health["seq"] >= 1
    assert isinstance(connected["message"], str) and connected["message"]
    ws2 = await ws_connect(client, 1)
    connected2, _ = await handshake(ws2)
    assert connected2["connection_id"] != connected["connection_id"]
    await ws.close()
    await ws2.close()


async def test_active_tasks_only_own_active_ones(client):
    await register(client, "p", 1)
    await register(client, "r", 1)
    await event(client, "r", "running")
    await register(client, "g", 1)
    await event(client, "g", "progress", progress=30, message="m", step="s")
    for finished, status in (("c", "completed"), ("f", "failed"), ("x", "cancelled")):
        await register(client, finished, 1)
        await event(client, finished, status)
    await register(client, "other", 2)
    await event(client, "other", "running")
    ws = await ws_connect(client, 1)
    _, active = await handshake(ws)
    assert active["count"] == 3 == len(active["tasks"])
    by_id = {t["task_id"]: t for t in active["tasks"]}
    assert set(by_id) == {"p", "r", "g"}
    assert by_id["p"]["status"] == "pending" and by_id["r"]["status"] == "running"
    g = by_id["g"]
    assert (g["status"], g["progress"], g["message"], g["step"]) == ("progress", 30, "m", "s")
    fields = {"task_id", "user_id", "task_type", "status", "progress", "message", "step",
              "result", "error", "error_type", "metadata", "created_at", "updated_at", "seq"}
    assert all(fields <= set(t) for t in active["tasks"])
    assert all(t["user_id"] == 1 for t in active["tasks"])
    await ws.close()


# ---- live routing -------------------------------------------------------------------------


async def test_update_reaches_every_socket_of_owner_and_no_other_user(client):
    await register(client, "t1", 1)
    await register(client, "marker", 2)
    a1, a2, b = (await ws_connect(client, 1), await ws_connect(client, 1),
                 await ws_connect(client, 2))
    for ws in (a1, a2, b):
        await handshake(ws)
    done = await event(client, "t1", "progress", progress=55, message="half")
    for ws in (a1, a2):
        msg = await recv(ws)
        assert msg["type"] == "task_status" and msg["task_id"] == "t1"
        assert msg["progress"] == 55 and msg["message"] == "half"
        assert msg["seq"] == done["seq"] and msg["user_id"] == 1
    await event(client, "marker", "running")
    first = await recv(b)
    assert first["type"] == "task_status" and first["task_id"] == "marker"
    for ws in (a1, a2, b):
        await ws.close()


async def test_registration_is_pushed_as_pending(client):
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await register(client, "new", 1, metadata={"k": "v"})
    msg = await recv(ws)
    assert msg["type"] == "task_status" and msg["task_id"] == "new"
    assert msg["status"] == "pending" and msg["metadata"] == {"k": "v"}
    await ws.close()


async def test_ping_pong(client):
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_json({"type": "ping"})
    pong = await recv(ws)
    assert pong["type"] == "pong"
    stamp = dt.datetime.fromisoformat(pong["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0)
    await ws.close()


async def test_seq_increases_per_task(client):
    ids = ["s1", "s2", "s3"]
    ws = await ws_connect(client, 1)
    await handshake(ws)
    for task_id in ids:
        await register(client, task_id, 1)
    for step in range(1, 11):
        for task_id in ids:
            await event(client, task_id, "progress", progress=step * 9)
    for task_id in ids:
        await event(client, task_id, "completed", result={"n": task_id})
    seen: dict[str, list[int]] = {t: [] for t in ids}
    done: set[str] = set()
    while done != set(ids):
        msg = await recv(ws)
        assert msg["type"] == "task_status"
        seen[msg["task_id"]].append(msg["seq"])
        if msg["status"] == "completed":
            done.add(msg["task_id"])
    for seqs in seen.values():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    await ws.close()


async def test_task_deleted_pushed(client):
    await register(client, "d1", 1)
    await event(client, "d1", "completed")
    ws = await ws_connect(client, 1)
    await handshake(ws)
    resp = await client.delete("/api/task/task/d1", headers=auth(1))
    assert resp.status == 200
    assert await recv(ws) == {"type": "task_deleted", "task_id": "d1"}
    await ws.close()


async def test_cancel_pushed_as_cancelled(client):
    await register(client, "c1", 1)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    resp = await client.post("/api/task/task/c1/cancel", headers=auth(1))
    assert resp.status == 200
    msg = await recv(ws)
    assert msg["type"] == "task_status" and msg["status"] == "cancelled"
    await ws.close()


# ---- subscribe / unsubscribe --------------------------------------------------------------


async def test_subscribe_own_task(client):
    await register(client, "mine", 1)
    await event(client, "mine", "progress", progress=10)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_json({"type": "subscribe", "task_id": "mine"})
    assert await recv(ws) == {"type": "subscribed", "task_id": "mine"}
    status = await recv(ws)
    assert status["type"] == "task_status" and status["task_id"] == "mine"
    assert status["progress"] == 10
    # still exactly one copy of each later update (owner and subscriber at once)
    await event(client, "mine", "progress", progress=20)
    await ws.send_json({"type": "ping"})
    nxt = await recv(ws)
    assert nxt["type"] == "task_status" and nxt["progress"] == 20
    assert (await recv(ws))["type"] == "pong"
    await ws.close()


async def test_admin_subscribes_to_other_users_task_then_unsubscribes(client):
    await register(client, "theirs", 2)
    await event(client, "theirs", "running")
    await register(client, "admin_marker", 9)
    admin = await ws_connect(client, 9, token=make_token(9, admin=True))
    await handshake(admin)
    await admin.send_json({"type": "subscribe", "task_id": "theirs"})
    assert await recv(admin) == {"type": "subscribed", "task_id": "theirs"}
    snap = await recv(admin)
    assert snap["type"] == "task_status" and snap["task_id"] == "theirs"
    assert snap["status"] == "running" and snap["user_id"] == 2
    await event(client, "theirs", "progress", progress=70)
    live = await recv(admin)
    assert live["task_id"] == "theirs" and live["progress"] == 70

    await admin.send_json({"type": "unsubscribe", "task_id": "theirs"})
    assert await recv(admin) == {"type": "unsubscribed", "task_id": "theirs"}
    await event(client, "theirs", "progress", progress=80)
    await event(client, "admin_marker", "running")
    first = await recv(admin)
    assert first["type"] == "task_status" and first["task_id"] == "admin_marker"
    await admin.close()


async def test_admin_subscribes_to_missing_task(client):
    """An admin may watch an id before it exists; the registration then arrives."""
    admin = await ws_connect(client, 9, token=make_token(9, admin=True))
    await handshake(admin)
    await admin.send_json({"type": "subscribe", "task_id": "later"})
    assert await recv(admin) == {"type": "subscribed", "task_id": "later"}
    await register(client, "later", 3)
    msg = await recv(admin)
    assert msg["type"] == "task_status" and msg["task_id"] == "later"
    await admin.close()


async def test_subscribe_forbidden_is_indistinguishable_from_missing(client):
    await register(client, "theirs", 2)
    await register(client, "marker", 1)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_json({"type": "subscribe", "task_id": "theirs"})
    forbidden = await recv(ws)
    await ws.send_json({"type": "subscribe", "task_id": "nope"})
    missing = await recv(ws)
    assert forbidden["type"] == "error" and forbidden["code"] == "forbidden"
    assert forbidden == missing
    assert "theirs" not in json.dumps(forbidden)
    # and the refused subscription delivers nothing later
    await event(client, "theirs", "running")
    await register(client, "nope", 2)
    await event(client, "marker", "running")
    first = await recv(ws)
    assert first["type"] == "task_status" and first["task_id"] == "marker"
    await ws.close()


async def test_unsubscribe_not_subscribed_is_acknowledged(client):
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_json({"type": "unsubscribe", "task_id": "never"})
    assert await recv(ws) == {"type": "unsubscribed", "task_id": "never"}
    await ws.close()


# ---- bad client messages: error, socket stays open ----------------------------------------

BAD_MESSAGES: list[tuple[str, Any, str]] = [
    ("bad-json", "{not json", "invalid_json"),
    ("empty", "", "invalid_json"),
    ("array", [{"type": "ping"}], "invalid_message"),
    ("string", "ping", "invalid_message"),
    ("number", 5, "invalid_message"),
    ("null", None, "invalid_message"),
    ("missing-type", {"task_id": "t"}, "missing_type"),
    ("type-not-string", {"type": 1}, "missing_type"),
    ("type-null", {"type": None}, "missing_type"),
    ("unknown-type", {"type": "hello"}, "unknown_type"),
    ("subscribe-no-task", {"type": "subscribe"}, "missing_field"),
    ("subscribe-task-list", {"type": "subscribe", "task_id": ["a"]}, "missing_field"),
    ("subscribe-task-float", {"type": "subscribe", "task_id": 1.5}, "missing_field"),
    ("subscribe-task-bool", {"type": "subscribe", "task_id": True}, "missing_field"),
    ("subscribe-task-too-long", {"type": "subscribe", "task_id": "x" * 201}, "invalid_field"),
    ("unsubscribe-no-task", {"type": "unsubscribe"}, "missing_field"),
    ("refresh-no-token", {"type": "refresh"}, "missing_field"),
    ("refresh-token-int", {"type": "refresh", "token": 5}, "missing_field"),
]


async def test_every_bad_message_gets_error_and_socket_stays_open(client):
    ws = await ws_connect(client, 1)
    await handshake(ws)
    for name, payload, code in BAD_MESSAGES:
        if isinstance(payload, str) and name in ("bad-json", "empty"):
            await ws.send_str(payload)
        else:
            await ws.send_str(json.dumps(payload))
        err = await recv(ws)
        assert err["type"] == "error", name
        assert err["code"] == code, (name, err)
        assert isinstance(err["message"], str) and err["message"], name
        await ws.send_json({"type": "ping"})
        assert (await recv(ws))["type"] == "pong", name
    await ws.send_bytes(b"\x00\x01binary")
    err = await recv(ws)
    assert err["type"] == "error" and err["code"] == "binary_frame"
    await ws.send_json({"type": "ping"})
    assert (await recv(ws))["type"] == "pong"
    assert not ws.closed
    await ws.close()


async def test_bad_messages_do_not_disturb_updates(client):
    await register(client, "t1", 1)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_str("]]")
    assert (await recv(ws))["code"] == "invalid_json"
    await event(client, "t1", "running")
    msg = await recv(ws)
    assert msg["type"] == "task_status" and msg["status"] == "running"
    await ws.close()


# ---- a client of the original design -------------------------------------------------------


class OriginalDesignClient:
    """The seed's JS example, message for message: a switch on `type` over connected,
    active_tasks, task_status and pong, keeping a task map keyed by task_id; anything else
    falls through to the default branch (logged, ignored)."""

    def __init__(self) -> None:
        self.connection_status = "disconnected"
        self.tasks: dict[str, dict[str, Any]] = {}
        self.completed_results: dict[str, Any] = {}
        self.failures: dict[str, Any] = {}
        self.pongs = 0
        self.connected: dict[str, Any] | None = None
        self.unknown: list[dict[str, Any]] = []

    def onmessage(self, raw: str) -> None:
        data = json.loads(raw)
        kind = data["type"]
        if kind == "connected":
            self.connected = data
            self.connection_status = "connected"
        elif kind == "active_tasks":
            for task in data["tasks"]:
                self.tasks[task["task_id"]] = task
        elif kind == "task_status":
            self.tasks[data["task_id"]] = data
            if data["status"] == "completed":
                self.completed_results[data["task_id"]] = data["result"]
            elif data["status"] == "failed":
                self.failures[data["task_id"]] = data["error"]
        elif kind == "pong":
            self.pongs += 1
        else:
            self.unknown.append(data)


async def test_original_design_client_flow(client):
    await register(client, "interview_123", 1, task_type="interview_generation")
    await register(client, "resume_parse_9", 1, task_type="resume_parse")
    ui = OriginalDesignClient()
    ws = await client.ws_connect(f"/api/task/ws/task/1?token={make_token(1)}")

    async def pump(until: Any) -> None:
        while not until():
            msg = await ws.receive(timeout=5)
            assert msg.type == WSMsgType.TEXT, msg
            ui.onmessage(msg.data)

    await pump(lambda: "interview_123" in ui.tasks and "resume_parse_9" in ui.tasks)
    assert ui.connection_status == "connected"
    assert ui.connected is not None
    assert {"connection_id", "message", "timestamp"} <= set(ui.connected)
    assert ui.tasks["interview_123"]["status"] == "pending"

    await ws.send_str(json.dumps({"type": "ping"}))  # the heartbeat
    await ws.send_str(json.dumps({"type": "subscribe", "task_id": "interview_123"}))
    await event(client, "interview_123", "running", message="starting")
    await event(client, "interview_123", "progress", progress=50,
                message="正在生成面试问题...", step="Step 3/10")
    await pump(lambda: ui.tasks["interview_123"]["status"] == "progress" and ui.pongs == 1)
    shown = ui.tasks["interview_123"]
    for field in ("task_id", "status", "progress", "message", "step", "result", "error"):
        assert field in shown
    assert (shown["progress"], shown["message"], shown["step"]) == (
        50, "正在生成面试问题...", "Step 3/10")

    await event(client, "interview_123", "completed", result={"questions": ["q1", "q2"]})
    await event(client, "resume_parse_9", "failed", error="bad pdf", error_type="ParseError")
    await pump(lambda: "interview_123" in ui.completed_results and "resume_parse_9" in
               ui.failures)
    assert ui.completed_results["interview_123"] == {"questions": ["q1", "q2"]}
    assert ui.failures["resume_parse_9"] == "bad pdf"
    assert ui.tasks["resume_parse_9"]["error_type"] == "ParseError"
    # the only extra messages such a client sees are the acknowledgements it asked for
    assert [m["type"] for m in ui.unknown] == ["subscribed"]

    await ws.send_str(json.dumps({"type": "unsubscribe", "task_id": "interview_123"}))
    await ws.close()
    assert ws.close_code == 1000


async def test_shutdown_closes_every_socket_1001(client):
    sockets = [await ws_connect(client, 1), await ws_connect(client, 2)]
    for ws in sockets:
        await handshake(ws)
    closes = [asyncio.create_task(ws.receive(timeout=10)) for ws in sockets]
    await client.server.close()
    for close in closes:
        msg = await close
        assert msg.type == WSMsgType.CLOSE and msg.data == 1001, msg


# ---- isolation: another user's task never reaches a socket ----------------------------


async def test_reused_task_id_of_another_user_is_never_pushed(client: Any) -> None:
    """User 1 subscribed to its task; the id is deleted and registered again for user 2:
    user 1 must not receive user 2's task."""
    from tests.conftest import recv_until

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
    from tests.conftest import PRODUCER, recv_until

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


async def test_permessage_deflate_is_declined_and_frames_go_uncompressed(client):
    """A browser offers permessage-deflate; the server declines it, so every frame (direct
    writes and the slow path alike) is the same uncompressed bytes (RSV1 clear)."""
    await register(client, "deflate_t", 1)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write((f"GET /api/task/ws/task/1?token={make_token(1)} HTTP/1.1\r\n"
                      "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      "Sec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
                      "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"sec-websocket-extensions" not in head.lower()
        first = await asyncio.wait_for(reader.readexactly(2), 5)
        assert first[0] & 0x40 == 0  # RSV1: not compressed
        assert first[0] & 0x0F == 0x1  # a text frame: `connected`
    finally:
        writer.close()


async def test_a_subscribe_the_storage_cannot_answer_is_an_error_and_the_socket_stays(
        client, monkeypatch):
    """SPEC "Storage unavailable": open sockets stay open. A subscribe whose read fails
    (a failing disk) answers an `error` the client can retry; no traceback, no close."""
    import sqlite3

    from server.storage.sqlite import store as store_module

    def failing_read(*_args):
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = sqlite3.SQLITE_IOERR
        raise exc

    ws = await ws_connect(client, 1)
    await handshake(ws)
    monkeypatch.setattr(store_module, "_select_task", failing_read)
    await ws.send_json({"type": "subscribe", "task_id": "not_cached"})
    answer = await recv(ws)
    assert answer["type"] == "error" and answer["code"] == "unavailable"
    monkeypatch.undo()
    await ws.send_json({"type": "ping"})
    assert (await recv(ws))["type"] == "pong"
    await ws.close()
