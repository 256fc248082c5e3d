"""Server-Sent Events (`GET /api/task/stream`): framing, resume by `Last-Event-ID` exactly as
`since`+`epoch`, heartbeat comments, 401, the limits, slow consumers and shutdown, on real
sockets (aiohttp's test server, a raw TCP client like `curl -N`, and a real `run.py`)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import pytest

from server.core.model import Change, Register
from server.push import snapshot
from server.web import keys, sse
from tests.conftest import (
    API_KEY,
    SECRET,
    Client,
    MakeClient,
    event,
    make_token,
    recv,
    register,
    ws_connect,
)
from tests.engines import Engine
from tests.support import (
    ended,
    events_until,
    fill_with_large_active_tasks,
    holds_the_whole_budget,
    next_event,
    only_socket_once,
    replay_history,
    stream,
)


async def test_raw_framing_like_curl(make_client: MakeClient) -> None:
    """The bytes on the wire: chunked text/event-stream; `event:`, `id: <epoch>:<seq>` and
    `data:` (the WebSocket's JSON) lines; a blank line after each; heartbeat comments."""
    client = await make_client(sse_heartbeat=0.2)
    await register(client, "t1")
    port = client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/task/stream?token={make_token(1)} HTTP/1.1\r\n"
                 f"Host: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode().lower()
    assert head.startswith("http/1.1 200")
    assert "content-type: text/event-stream; charset=utf-8" in head
    assert "transfer-encoding: chunked" in head and "cache-control: no-cache" in head

    body = b""

    async def until(marker: bytes) -> None:
        nonlocal body
        while marker not in body:
            body += await asyncio.wait_for(reader.read(65536), 5)

    await until(b"event: active_tasks")
    await until(b"\n\n")
    done = await event(client, "t1", "completed", result={"ok": True})
    await until(b'"status":"completed"')
    await until(b": keep-alive\n\n")
    writer.close()
    # undo the chunked coding: each chunk is <hex size>\r\n<data>\r\n
    text, rest = b"", body
    while b"\r\n" in rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if len(rest) < size + 2:
            break
        text += rest[:size]
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
    blocks = [b for b in text.decode().split("\n\n") if b]
    events = [b for b in blocks if not b.startswith(":")]
    epoch = client.app[keys.STORE].epoch
    lines = [e.split("\n") for e in events]
    assert lines[0][0] == "event: connected" and lines[0][1].startswith("data: {")
    connected = json.loads(lines[0][1][6:])
    assert connected["type"] == "connected" and connected["epoch"] == epoch
    assert lines[1][:2] == ["event: active_tasks", f"id: {epoch}:{connected['seq']}"]
    assert json.loads(lines[1][2][6:])["tasks"][0]["task_id"] == "t1"
    status = next(ev for ev in lines if ev[0] == "event: task_status")
    assert status[1] == f"id: {epoch}:{done['seq']}"
    assert json.loads(status[2][6:]) == {"type": "task_status", **done}
    assert len(status) == 3  # one data line: the JSON has no newline
    assert ": keep-alive" in blocks


async def test_bad_token_is_a_401_envelope_and_no_stream(client: Client) -> None:
    for token in ("", "not-a-jwt", make_token(1, ttl=-3600),
                  make_token(1, secret="another-secret-0123456789-abcdef")):
        resp = await stream(client, token=token)
        assert resp.status == 401
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["code"] == 401 and body["data"] is None
        assert body["message"].startswith("token ")
    resp = await client.get("/api/task/stream")
    assert resp.status == 401 and (await resp.json())["message"] == "token missing"


async def test_last_event_id_resumes_like_since_no_gap_no_duplicate(client: Client) -> None:
    await register(client, "a")
    await register(client, "b")
    first = await stream(client)
    before = await events_until(first, "active_tasks")
    epoch = client.app[keys.STORE].epoch
    await event(client, "a", "progress", progress=10)
    seen = await next_event(first)
    assert seen["event"] == "task_status" and seen["data"]["progress"] == 10
    last_id = seen["id"]
    assert last_id == f"{epoch}:{seen['data']['seq']}"
    first.close()
    # while it is away: a terminal state, a progress and a deletion
    done = await event(client, "a", "completed")
    await event(client, "b", "progress", progress=50)
    resp = await client.delete("/api/task/task/a", headers={
        "Authorization": f"Bearer {make_token(1)}"})
    assert resp.status == 200

    again = await stream(client, Last_Event_ID=last_id)
    replay = await events_until(again, "task_deleted")
    kinds = [e["event"] for e in replay]
    assert kinds[:2] == ["connected", "active_tasks"] and "resync" not in kinds
    assert replay[1]["id"] == last_id  # the point it resumed from
    statuses = [(e["data"]["task_id"], e["data"]["status"]) for e in replay
                if e["event"] == "task_status"]
    assert statuses == [("b", "progress")]  # a's state is its deletion; nothing repeated
    assert replay[-1]["data"] == {"type": "task_deleted", "task_id": "a"}
    ids = [int(e["id"].split(":")[1]) for e in replay if "id" in e]
    assert ids == sorted(ids) and ids[-1] > done["seq"]
    assert before[0]["data"]["seq"] < ids[-1]

    # the same point given as since+epoch in the URL gives the same events
    via_query = await stream(client, query=f"&since={last_id.split(':')[1]}&epoch={epoch}")
    same = await events_until(via_query, "task_deleted")
    assert [(e["event"], e.get("id"), e["data"].get("task_id")) for e in same[1:]] == \
        [(e["event"], e.get("id"), e["data"].get("task_id")) for e in replay[1:]]
    # Last-Event-ID wins over the URL the browser reconnects to
    both = await stream(client, query=f"&since=0&epoch={epoch}", Last_Event_ID=replay[-1]["id"])
    first_two = [await next_event(both), await next_event(both)]
    assert first_two[1]["event"] == "active_tasks" and first_two[1]["id"] == replay[-1]["id"]
    await event(client, "b", "completed")
    live = await next_event(both)
    assert live["data"]["task_id"] == "b" and live["data"]["status"] == "completed"

    # another database's id, or a malformed one: a fresh stream that says resync / invalid
    other = await stream(client, Last_Event_ID="0123abcd:5")
    got = await events_until(other, "active_tasks")
    assert [e["event"] for e in got] == ["connected", "resync", "active_tasks"]
    assert got[-1]["id"] == f"{epoch}:{got[0]['data']['seq']}"
    bad = await stream(client, Last_Event_ID="nonsense")
    got = await events_until(bad, "error")
    assert got[-1]["data"]["code"] == "invalid_since"


async def test_admin_task_id_subscriptions(client: Client) -> None:
    await register(client, "theirs", user_id=2)
    await register(client, "mine", user_id=1)
    admin = await stream(client, 9, "&task_id=theirs", token=make_token(9, admin=True))
    got = await events_until(admin, "task_status")
    assert [e["event"] for e in got] == ["connected", "active_tasks", "subscribed",
                                         "task_status"]
    assert got[-1]["data"]["task_id"] == "theirs"
    await event(client, "theirs", "progress", progress=70)
    live = await next_event(admin)
    assert live["data"]["progress"] == 70 and "id" in live
    # a user may not follow another user's task: the socket's answer, as an event
    user = await stream(client, 1, "&task_id=theirs")
    got = await events_until(user, "error")
    assert got[-1]["data"]["code"] == "forbidden"
    resp = await stream(client, 1, "&task_id=" + "x" * 201)
    assert resp.status == 400


async def test_streams_count_in_the_per_user_limit(make_client: MakeClient) -> None:
    client = await make_client(max_connections_per_user=1)
    oldest = await stream(client)
    await events_until(oldest, "active_tasks")
    ws = await client.ws_connect(f"/api/task/ws/task/1?token={make_token(1)}")
    rest = await ended(oldest)
    assert rest[-1]["event"] == "close"
    assert rest[-1]["data"] == {"type": "close", "code": 4409,
                                "reason": "too many connections for this user"}
    await ws.close()


@pytest.mark.slow  # takes seconds
async def test_token_expiry_ends_the_stream(make_client: MakeClient) -> None:
    client = await make_client(jwt_leeway=0)
    resp = await stream(client, token=make_token(1, ttl=2))
    rest = await ended(resp, timeout=8)
    kinds = [e["event"] for e in rest]
    assert "token_expiring" in kinds
    assert rest[-1]["data"]["code"] == 4401 and rest[-1]["data"]["reason"] == "token expired"


async def test_slow_consumer_stream_is_cut_off(make_client: MakeClient) -> None:
    """A client that stops reading: once --send-queue updates wait behind a full transport
    the stream is cut off (the socket's 4408), and the others are still served."""
    client = await make_client(send_queue=5)
    app = client.app
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", client.server.port))
    await loop.sock_sendall(sock, f"GET /api/task/stream?token={make_token(1)} HTTP/1.1\r\n"
                            "Host: x\r\n\r\n".encode())
    healthy = await stream(client)
    await events_until(healthy, "active_tasks")
    try:
        metrics = app[keys.METRICS]
        big = {"blob": "x" * 60_000}
        for n in range(60):
            await register(client, f"big{n}", metadata=big)
            if metrics.slow_closed._value.get() >= 1:
                break
        assert metrics.slow_closed._value.get() == 1
        for _ in range(200):
            if metrics.sse_streams._value.get() == 1:
                break
            await asyncio.sleep(0.02)
        assert metrics.sse_streams._value.get() == 1  # only the healthy one is left
        await event(client, "big0", "completed")
        got = await events_until(healthy, "task_status", timeout=10)
        while not (got[-1]["data"]["task_id"] == "big0"
                   and got[-1]["data"]["status"] == "completed"):
            got.append(await next_event(healthy, 10))
    finally:
        sock.close()


async def test_shutdown_ends_the_stream_with_1001(servers: Any, engine: Engine) -> None:
    server = servers("--jwt-secret", SECRET, "--api-key", API_KEY, "--access-log", "false",
                     db=engine.database())
    await asyncio.to_thread(server.start)
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{server.url}/api/task/stream?token={make_token(1)}")
        assert resp.status == 200
        await events_until(resp, "active_tasks")
        server.signal(15)
        rest = await ended(resp, timeout=10)
        assert rest[-1]["data"] == {"type": "close", "code": 1001,
                                    "reason": "server shutting down"}
        assert await resp.content.read() == b""
    assert await asyncio.to_thread(server.wait) == 0


async def test_a_stream_whose_client_left_is_released(make_client: MakeClient) -> None:
    client = await make_client(sse_heartbeat=0.2)
    resp = await stream(client)
    await events_until(resp, "active_tasks")
    hub = client.app[keys.HUB]
    assert hub.connection_count == 1
    resp.close()
    for _ in range(250):
        if hub.connection_count == 0:
            break
        await asyncio.sleep(0.02)
    assert hub.connection_count == 0
    assert client.app[keys.METRICS].sse_streams._value.get() == 0


async def test_cors_headers_reach_a_stream(make_client: MakeClient) -> None:
    """A streamed response sends its headers before the handler returns: the CORS headers
    must already be there for a front end on another origin."""
    client = await make_client(cors_origins=("https://app.example",))
    resp = await stream(client, Origin="https://app.example")
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    await events_until(resp, "active_tasks")


# ---- the connect-time snapshot: by pages, under --snapshot-memory (server/push/snapshot.py) ----


def _dechunk(body: bytes) -> list[bytes]:
    """The whole chunks of an HTTP/1.1 chunked body, in order."""
    chunks, rest = [], body
    while b"\r\n" in rest:
        size_line, _, after = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0 or len(after) < size + 2:
            break
        chunks.append(after[:size])
        assert after[size:size + 2] == b"\r\n"
        rest = after[size + 2:]
    return chunks


async def _budget_returned(app: Any) -> None:
    """Every page's bytes went back to the shared budget and every stream was released."""
    budget = app[keys.SNAPSHOT_BUDGET]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while budget.used or app[keys.SOCKETS]:
        assert loop.time() < deadline, f"{budget.used} bytes never given back"
        await asyncio.sleep(0.01)


async def test_active_tasks_is_one_event_written_by_pages(make_client: MakeClient,
                                                          monkeypatch: Any) -> None:
    """`active_tasks` stays ONE event with ONE `data:` line, but it goes out page by page
    (a chunk a page), not serialized whole; no heartbeat comes inside it."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 3000)
    client = await make_client(sse_heartbeat=0.05)
    store = client.app[keys.STORE]
    for n in range(30):
        await store.submit(Register(f"t{n}", 1, "job", metadata={"pad": "m" * 1000}))
    await store.submit(Change("t3", "completed"))
    port = client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /api/task/stream?token={make_token(1)} HTTP/1.1\r\n"
                 f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = b""
    while b'"count":29}\n\n' not in body:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "the stream ended"
        body += data
    writer.close()
    chunks = _dechunk(body)
    text = b"".join(chunks).decode()
    start = text.index("event: active_tasks\n")
    end = text.index("\n\n", start)
    lines = text[start:end].split("\n")
    epoch = store.epoch
    connected = json.loads(text[text.index("data: ") + 6:].split("\n", 1)[0])
    assert lines[:2] == ["event: active_tasks", f"id: {epoch}:{connected['seq']}"]
    assert len(lines) == 3 and lines[2].startswith("data: ")  # one data line
    message = json.loads(lines[2][6:])
    assert message["type"] == "active_tasks" and message["count"] == 29
    assert [t["task_id"] for t in message["tasks"]] == [f"t{n}" for n in range(30) if n != 3]
    assert list(message) == ["type", "tasks", "count"]
    # written by pages: the event spans many chunks (~1 KB a task, ~3 KB a page)
    at = 0
    spans = []
    for piece in chunks:
        piece_text = piece.decode()
        if at + len(piece_text) > start and at < end:
            spans.append(piece_text)
        at += len(piece_text)
    assert len(spans) >= 5
    assert not any(": keep-alive" in piece for piece in spans[1:-1])
    # an EventSource-style reader sees one event, as before
    resp = await stream(client)
    got = await events_until(resp, "active_tasks")
    assert got[-1]["data"] == message
    resp.close()
    await _budget_returned(client.app)


async def test_the_replay_by_pages_carries_each_change_once_with_its_id(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """`Last-Event-ID` replay read and written by pages while live changes come in: every
    change once, in order, each task event with `id: <epoch>:<seq>`; resuming from the
    last id then replays nothing."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 1500)
    client = await make_client()
    store = client.app[keys.STORE]
    epoch = store.epoch
    since, expected = await replay_history(store)
    resp = await stream(client, Last_Event_ID=f"{epoch}:{since}")

    async def progress() -> None:
        for n in range(30):
            await store.submit(Change("busy", "progress", progress=n))
            await asyncio.sleep(0)

    live = asyncio.create_task(progress())
    got = await events_until(resp, "active_tasks")
    assert [e["event"] for e in got] == ["connected", "active_tasks"]
    assert got[-1]["id"] == f"{epoch}:{since}"
    last_seq = {"busy": got[-1]["data"]["tasks"][0]["seq"]}
    await live
    final_seq = store.last_seq
    seen: dict[str, str] = {}
    last_id = since
    while last_seq["busy"] < final_seq:
        ev = await next_event(resp)
        assert ev["id"].startswith(f"{epoch}:"), ev
        point = int(ev["id"].split(":")[1])
        assert point >= last_id, (point, last_id)  # ids never go back
        last_id = point
        data = ev["data"]
        task_id = data["task_id"]
        if ev["event"] == "task_deleted":
            assert task_id not in seen, task_id
            seen[task_id] = "deleted"
            continue
        assert ev["event"] == "task_status", ev
        assert point == data["seq"]  # in seq order: each carries its own seq
        assert data["seq"] > last_seq.get(task_id, 0), (task_id, data["seq"])
        last_seq[task_id] = data["seq"]
        if task_id != "busy":
            assert task_id not in seen, task_id
            seen[task_id] = data["status"]
    assert seen == expected and last_id == final_seq
    resp.close()
    again = await stream(client, Last_Event_ID=f"{epoch}:{last_id}")
    got = await events_until(again, "active_tasks")
    await event(client, "busy", "completed")
    after = await next_event(again)
    assert after["data"]["task_id"] == "busy" and after["data"]["status"] == "completed"
    assert int(after["id"].split(":")[1]) == after["data"]["seq"]  # nothing replayed before
    again.close()
    await _budget_returned(client.app)


def _silent_stream(port: int, user: int) -> socket.socket:
    """An SSE request, then never read again (tiny receive buffer: the server backs up)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /api/task/stream?token={make_token(user)} HTTP/1.1\r\n"
                 "Host: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 200 " in head.split(b"\r\n")[0]
    return sock


async def test_a_silent_stream_holds_its_pages_of_the_budget_and_is_cut_off(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """A stream whose reader stops during a ~6 MB `active_tasks` holds no more than its
    pages of `--snapshot-memory` (it waits for its peer, page by page); the next connect
    waits its turn and is served once the silent one is cut off (4408)."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 64 * 1024)
    client = await make_client(snapshot_memory=64 * 1024, send_timeout=0.5)
    app = client.app
    store = app[keys.STORE]
    await fill_with_large_active_tasks(store)
    loop = asyncio.get_running_loop()
    silent = await loop.run_in_executor(None, _silent_stream, client.server.port, 1)
    try:
        # stuck on a page inside the one active_tasks event, with the whole budget
        holder = await only_socket_once(app, holds_the_whole_budget(app), "the silent stream")
        assert isinstance(holder, sse.Stream)
        assert holder.in_event
        other = await stream(client, 2)
        got = await events_until(other, "active_tasks", timeout=10)
        assert got[-1]["data"]["count"] == 1
        assert holder.closing  # it had to go first
        assert app[keys.METRICS].slow_closed._value.get() == 1
        ws = await ws_connect(client, 2)
        assert (await recv(ws))["type"] == "connected"
        assert (await recv(ws))["count"] == 1
        await ws.close()
        other.close()
    finally:
        silent.close()
    await _budget_returned(app)


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    body = b""
    try:
        while data := sock.recv(1 << 20):
            body += data
    except ConnectionResetError:
        pass  # cut off: what arrived before the reset is all there is
    return body


async def test_a_close_inside_the_paged_active_tasks_event_cuts_the_stream_off(
        make_client: MakeClient, monkeypatch: Any) -> None:
    """A `close` event cannot come inside `active_tasks`'s `data:` line (it would be glued
    into that event's JSON): a stream replaced (4409) while that line is half written is
    cut off instead, and nothing it got is a broken event."""
    monkeypatch.setattr(snapshot, "PAGE_BYTES", 64 * 1024)
    client = await make_client(max_connections_per_user=1)
    app = client.app
    store = app[keys.STORE]
    for n in range(100):  # ~6 MB: more than the kernel's buffers take from a silent peer
        await store.submit(Register(f"big{n}", 1, "job", metadata={"pad": "m" * 60_000}))
    loop = asyncio.get_running_loop()
    silent = await loop.run_in_executor(None, _silent_stream, client.server.port, 1)
    try:
        holder = await only_socket_once(
            app, lambda conn: conn.session.send_started and conn.in_event,
            "the silent stream (inside its event)")
        newer = await stream(client)  # the user's limit is 1: the silent one is replaced
        assert newer.status == 200
        body = await loop.run_in_executor(None, _read_until_closed, silent)
        newer.close()
    finally:
        silent.close()
    assert holder.closing
    text = b"".join(_dechunk(body)).decode()
    assert "event: close" not in text
    for block in text.split("\n\n")[:-1]:  # every whole event parses
        for line in block.split("\n"):
            if line.startswith("data: "):
                json.loads(line[6:])
    await _budget_returned(app)


# ---- review fixes: no process-wide cache, no HEAD stream ---------------------------------


@pytest.mark.slow  # takes seconds
async def test_framed_events_live_and_die_with_their_updates(client: Client) -> None:
    """An update's event chunk is built once and shared by every stream, and kept on the
    update itself: once the streams are gone nothing of 300 large updates is retained (a
    process-wide cache held up to ~1 GB at the default limits)."""
    import gc
    import tracemalloc

    a, b = await stream(client, 1), await stream(client, 1)
    await events_until(a, "active_tasks")
    await events_until(b, "active_tasks")
    pad = "p" * 60_000
    gc.collect()
    tracemalloc.start()
    try:
        for n in range(300):
            await register(client, f"big{n}", 1)
            await event(client, f"big{n}", "completed", result={"pad": pad})
            if n % 50 == 49:  # keep the streams drained
                await events_until(a, "task_status", timeout=10)
        a.close()
        b.close()
        for _ in range(200):
            if not client.server.app[keys.SOCKETS]:
                break
            await asyncio.sleep(0.05)
        assert not client.server.app[keys.SOCKETS]
        gc.collect()
        framed = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, sse.__file__)])
    finally:
        tracemalloc.stop()
    kept = sum(stat.size for stat in framed.statistics("filename"))
    # what sse.py framed (~60 KB an event) and still holds once every stream is gone
    assert kept < 1024 * 1024, kept


async def test_head_does_not_open_a_stream(client: Client) -> None:
    resp = await client.head(f"/api/task/stream?token={make_token(1)}")
    assert resp.status == 405
    assert not client.server.app[keys.SOCKETS]
