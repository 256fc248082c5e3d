"""Helpers that several test modules use: waiting for a condition, reading REST answers and
Server-Sent Events, raw WebSocket clients, a process's memory, and stores filled for
snapshot tests. Fixtures live in tests/conftest.py; server processes in tests/procs.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import ClientResponse

from server.core.model import Change, Delete, Outcome, Register
from server.storage.api import Store
from server.web import keys
from tests.cluster_support import eventually
from tests.conftest import Client, make_token

# ---- waiting ---------------------------------------------------------------------------------


async def until(condition: Callable[[], Any], what: str = "condition never became true",
                timeout: float = 15.0) -> None:
    """Wait for `condition()` (sync or async) to be true; fail after `timeout` seconds (a
    bound that only catches a hang; nothing asserts a speed)."""
    await eventually(condition, timeout, what, interval=0.02)


# ---- a store, directly -------------------------------------------------------------------


async def ok(store: Store, op: Any) -> Outcome:
    """Submit `op`; it must be applied (not refused)."""
    outcome = await store.submit(op)
    assert outcome.error is None, outcome.error
    return outcome


async def finished(store: Store, task_id: str, user_id: int = 1) -> Outcome:
    """A task registered and completed."""
    await ok(store, Register(task_id, user_id, "job"))
    return await ok(store, Change(task_id, "completed", result={"n": 1}))


# ---- REST answers ----------------------------------------------------------------------


STATUS = "/api/task/task/{}/status"


async def still_serving(client: Any) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["database"] is True


async def error_of(resp: Any, status: int) -> dict[str, Any]:
    """Assert the failure envelope with this status; return the body."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["code"] == status and body["data"] is None
    assert isinstance(body["message"], str) and body["message"]
    return body


async def data_of(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["code"] == 0 and body["message"] == "success"
    assert set(body) == {"code", "message", "data"}
    return body["data"]


# ---- Server-Sent Events read by hand ---------------------------------------------------


async def stream(client: Client, user: int = 1, query: str = "", token: str | None = None,
                 **headers: str) -> ClientResponse:
    token = make_token(user) if token is None else token
    resp = await client.get(f"/api/task/stream?token={token}{query}",
                            headers={k.replace("_", "-"): v for k, v in headers.items()})
    return resp


async def next_event(resp: ClientResponse, timeout: float = 5.0,
                     comments: bool = False) -> dict[str, Any]:
    """The next event as {event, id, data} ({comment} for a comment line when asked)."""
    fields: dict[str, Any] = {}

    async def read() -> dict[str, Any]:
        while True:
            raw = await resp.content.readline()
            assert raw, f"the stream ended; partial event {fields}"
            line = raw.decode().rstrip("\n")
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                if comments:
                    return {"comment": line[1:].strip()}
                continue
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value

    return await asyncio.wait_for(read(), timeout)


async def events_until(resp: ClientResponse, kind: str, timeout: float = 5.0
                       ) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["event"] != kind:
        seen.append(await next_event(resp, timeout))
    return seen


async def ended(resp: ClientResponse, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every event left until the stream ends (fails if it does not)."""
    seen = []

    async def read() -> None:
        while True:
            try:
                seen.append(await next_event(resp, timeout))
            except AssertionError:
                return

    with contextlib.suppress(aiohttp.ClientPayloadError):  # cut off mid-body: ended too
        await asyncio.wait_for(read(), timeout)
    return seen


# ---- raw WebSocket clients and a server process's memory -------------------------------


def raw_socket(port: int, user: int) -> socket.socket:
    """A WebSocket handshake by hand; the socket is returned right after the 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/task/ws/task/{user}?token={make_token(user)} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "closed during the handshake"
        head += chunk
    assert b" 101 " in head.split(b"\r\n")[0], head
    return sock


def rss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert match
    return int(match.group(1))


def stuck_client(port: int, user: int) -> socket.socket:
    """Handshake, then never read again (tiny receive buffer so the server backs up)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    token = make_token(user)
    sock.sendall(
        f"GET /api/task/ws/task/{user}?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0]
    return sock


# ---- snapshots: what to fill a store with, and a socket caught mid-snapshot ------------


async def fill_with_large_active_tasks(store: Any) -> None:
    """~6 MB of user 1's active tasks (more than the kernel's buffers take from a silent
    peer) and one small task of user 2."""
    for n in range(100):
        await store.submit(Register(f"big{n}", 1, "job", metadata={"pad": "m" * 60_000}))
    await store.submit(Register("small", 2, "job"))


async def replay_history(store: Any) -> tuple[int, dict[str, str]]:
    """A task `busy` to change live, then 40 finished tasks (every fourth deleted) after the
    returned `since`: what a resume must replay, task by task, with its final state."""
    await store.submit(Register("busy", 1, "job"))
    since = store.last_seq
    expected: dict[str, str] = {}
    for n in range(40):
        task_id = f"f{n}"
        await store.submit(Register(task_id, 1, "job", metadata={"pad": "m" * 400}))
        await store.submit(Change(task_id, "completed", result={"n": n}))
        expected[task_id] = "completed"
        if n % 4 == 0:
            await store.submit(Delete(task_id))
            expected[task_id] = "deleted"
    return since, expected


async def only_socket_once(app: Any, ready: Any, what: str) -> Any:
    """The app's one socket, once it is attached and `ready(socket)` holds (10 s at most)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not app[keys.SOCKETS]:
        assert loop.time() < deadline, f"{what} never attached"
        await asyncio.sleep(0.01)
    (holder,) = app[keys.SOCKETS]
    while not ready(holder):
        assert loop.time() < deadline, f"{what} never got there"
        await asyncio.sleep(0.01)
    return holder


def holds_the_whole_budget(app: Any) -> Any:
    """Stuck on a page, waiting for its peer to take it, with the whole budget."""
    budget = app[keys.SNAPSHOT_BUDGET]
    return lambda conn: conn.session.send_started and budget.used == budget.total
