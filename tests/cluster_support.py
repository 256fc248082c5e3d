"""Clients for the cluster tests (tests/test_cluster_process.py, tests/test_cluster_proxy.py).

`Watcher`: one user's client as an application writes it: reads its socket in a task, keeps
the latest state of every task and every seq it was pushed, and resumes with `since` (on any
node, or through a proxy) when its socket ends. `Writer`: a producer that reports numbered
changes with an `Idempotency-Key` each and retries a change (same key) on the next node
until one acknowledges it, recording what was acknowledged. `RawSocket`: a WebSocket client
on a plain socket with a tiny receive buffer, for a consumer that stops reading.
Everything waits on events with deadlines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import jwt

SECRET = "cluster-secret-0123456789-abcdefghijklmnop"
API_KEY = "cluster-producer-key-0123456789"
PRODUCER = {"X-API-Key": API_KEY}
TOKEN_FLAGS = ("--jwt-secret", SECRET, "--api-key", API_KEY)
TIMEOUT = aiohttp.ClientTimeout(total=10)
# What a producer retries: the node is gone, or the database is (503 with Retry-After).
RETRYABLE = (aiohttp.ClientError, ConnectionError, TimeoutError, asyncio.TimeoutError)


def user_token(user_id: int, secret: str = SECRET) -> str:
    return jwt.encode({"sub": str(user_id), "exp": int(time.time()) + 3600}, secret,
                      algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               headers: dict[str, str], expect: int = 200) -> Any:
    async with session.post(url, json=body, headers=headers) as resp:
        payload = await resp.json()
        assert resp.status == expect, payload
        return payload["data"]


async def register(session: aiohttp.ClientSession, base: str, task_id: str,
                   user_id: int = 1) -> dict[str, Any]:
    return await post(session, f"{base}/api/task/tasks",
                      {"task_id": task_id, "user_id": user_id, "task_type": "export"},
                      PRODUCER, expect=201)


async def event(session: aiohttp.ClientSession, base: str, task_id: str,
                **body: Any) -> dict[str, Any]:
    return await post(session, f"{base}/api/task/task/{task_id}/events", body, PRODUCER)


async def status_of(session: aiohttp.ClientSession, base: str, task_id: str,
                    token: str) -> dict[str, Any]:
    async with session.get(f"{base}/api/task/task/{task_id}/status",
                           headers=bearer(token)) as resp:
        payload = await resp.json()
        assert resp.status == 200, payload
        return payload["data"]


async def eventually(check: Callable[[], Any], timeout: float, what: str,
                     interval: float = 0.05) -> Any:
    """Poll an async or sync `check` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s: {what}"
        await asyncio.sleep(interval)


class Watcher:
    """One user's client: a socket read in a task, its state kept across reconnects."""

    def __init__(self, session: aiohttp.ClientSession, user_id: int, token: str) -> None:
        self.session = session
        self.user_id = user_id
        self.token = token
        self.latest: dict[str, dict[str, Any]] = {}
        self.seqs: list[int] = []  # task_status / task_deleted seqs, in arrival order
        self.last_seq = 0  # the `since` of the next connect
        self.epoch: str | None = None
        self.connects = 0
        self.close_codes: list[int | None] = []
        self.other: list[dict[str, Any]] = []
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.ended = asyncio.Event()  # set when the current socket ends

    def resume_from(self, epoch: str, since: int) -> None:
        """Resume where another client (a raw socket) left off."""
        self.epoch, self.last_seq, self.connects = epoch, since, max(self.connects, 1)

    async def connect(self, ws_base: str, *, resume: bool = True) -> dict[str, Any]:
        """Open a socket (with `since` once something was seen); returns `connected`."""
        assert self._reader is None or self._reader.done(), "still connected"
        query = f"?token={self.token}"
        if resume and self.connects:
            query += f"&since={self.last_seq}&epoch={self.epoch}"
        ws = await self.session.ws_connect(f"{ws_base}/api/task/ws/task/{self.user_id}{query}",
                                           max_msg_size=0, heartbeat=None)
        connected = await ws.receive_json(timeout=10)
        assert connected["type"] == "connected", connected
        if self.epoch is not None:
            assert connected["epoch"] == self.epoch, "one database, one epoch"
        self.epoch = connected["epoch"]
        if not self.connects:
            self.last_seq = connected["seq"]
        self.connects += 1
        self.ws = ws
        self.ended = asyncio.Event()
        self._reader = asyncio.create_task(self._read(ws))
        return connected

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self._take(json.loads(msg.data))
        except RETRYABLE:
            pass
        finally:
            self.close_codes.append(ws.close_code)
            self.ended.set()
            self._poke()

    def _take(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "active_tasks":
            for task in msg["tasks"]:
                known = self.latest.get(task["task_id"])
                if known is None or known["seq"] < task["seq"]:
                    self.latest[task["task_id"]] = task
        elif kind == "task_status":
            self.seqs.append(msg["seq"])
            self.latest[msg["task_id"]] = msg
            self.last_seq = max(self.last_seq, msg["seq"])
        elif kind == "task_deleted":
            self.latest.pop(msg["task_id"], None)
        else:
            self.other.append(msg)
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[Watcher], bool], timeout: float,
                       what: str) -> None:
        """Until `predicate(self)` holds (checked on every message and at the socket's end)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, (f"timed out after {timeout:g} s: {what}; last seq "
                                   f"{self.last_seq}, tasks {self.summary()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def has(self, task_id: str, status: str | set[str], seq: int | None = None) -> bool:
        task = self.latest.get(task_id)
        wanted = {status} if isinstance(status, str) else status
        return (task is not None and task["status"] in wanted
                and (seq is None or task["seq"] >= seq))

    def summary(self) -> dict[str, tuple[str, int]]:
        return {k: (v["status"], v["seq"]) for k, v in sorted(self.latest.items())}

    def assert_increasing(self) -> None:
        """Every pushed change carried a higher seq than the one before, across reconnects:
        nothing went back and nothing came twice."""
        bad = [(a, b) for a, b in zip(self.seqs, self.seqs[1:], strict=False) if b <= a]
        assert not bad, f"seq went back or repeated: {bad[:5]}"

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, *RETRYABLE):
                await asyncio.wait_for(self._reader, 10)


class Writer:
    """A producer reporting `progress` 1, 2, ... on one task, then `completed`.

    Each change carries its own Idempotency-Key and is retried (same key, so it is recorded
    once whichever node had committed it) on the node it last used and then the next, until
    one acknowledges it. `acked` holds the messages acknowledged, `seq` the last answer's."""

    def __init__(self, session: aiohttp.ClientSession, nodes: Sequence[Any], task_id: str,
                 first: int = 0, give_up: float = 60.0) -> None:
        self.session = session
        self.nodes = list(nodes)  # anything with a `.url` (ServerProcess) or a str
        self.task_id = task_id
        self.current = first % len(self.nodes)
        self.give_up = give_up
        self.acked: list[str] = []
        self.retries = 0
        self.failovers = 0
        self.seq = 0
        self.final: dict[str, Any] | None = None
        self.stop = asyncio.Event()

    def _base(self) -> str:
        node = self.nodes[self.current]
        return node if isinstance(node, str) else node.url

    async def send(self, body: dict[str, Any], key: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.give_up
        while True:
            url = f"{self._base()}/api/task/task/{self.task_id}/events"
            try:
                async with self.session.post(url, json=body,
                                             headers={**PRODUCER, "Idempotency-Key": key}) as r:
                    payload = await r.json()
                    if r.status == 200:
                        return payload["data"]
                    assert r.status == 503, (r.status, payload)  # anything else is a bug
                    assert "retry-after" in {h.lower() for h in r.headers}, payload
            except RETRYABLE:
                self.failovers += 1
                self.current = (self.current + 1) % len(self.nodes)
            self.retries += 1
            assert time.monotonic() < deadline, f"{self.task_id}: no node took {key}"
            await asyncio.sleep(0.05)

    async def run(self, limit: int = 100_000) -> None:
        for n in range(1, limit):
            if self.stop.is_set():
                break
            message = f"{self.task_id}#{n}"
            data = await self.send({"status": "progress", "progress": n % 100,
                                    "message": message}, key=message)
            self.acked.append(message)
            self.seq = data["seq"]
        self.final = await self.send({"status": "completed", "result": {"sent": len(self.acked)},
                                      "message": f"{self.task_id}#done"},
                                     key=f"{self.task_id}#done")
        self.acked.append(f"{self.task_id}#done")
        self.seq = self.final["seq"]


def assert_recorded_once(recorded: list[tuple[str, str]], writers: Sequence[Writer]) -> None:
    """Every acknowledged change is in the history exactly once (retries with the same
    Idempotency-Key, on another node too, recorded nothing twice)."""
    counts: dict[tuple[str, str], int] = {}
    for pair in recorded:
        counts[pair] = counts.get(pair, 0) + 1
    missing = [(w.task_id, m) for w in writers for m in w.acked if (w.task_id, m) not in counts]
    assert not missing, f"{len(missing)} acknowledged changes lost, e.g. {missing[:5]}"
    twice = [pair for pair, n in counts.items() if n > 1 and pair[1]]
    assert not twice, f"recorded twice: {twice[:5]}"


# ---- a consumer that stops reading ---------------------------------------------------------

class RawSocket:
    """A WebSocket client on a plain socket: handshake, then it reads only when told to
    (a 4 KB receive buffer, so the server backs up as soon as it stops)."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "closed during the handshake"
            head += chunk
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.buf = b""

    def _need(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server without a close frame")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_until_close(self, timeout: float = 10.0) -> tuple[list[dict[str, Any]], int]:
        """Every message up to the server's close frame (answered), and the close code."""
        deadline = time.monotonic() + timeout
        messages: list[dict[str, Any]] = []
        parts: list[bytes] = []
        while True:
            b0, b1 = self._need(2, deadline)
            size = b1 & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._need(2, deadline))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._need(8, deadline))
            payload = self._need(size, deadline)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                mask = b"\x00\x00\x00\x00"  # a client frame must be masked (any mask)
                with contextlib.suppress(OSError):
                    self.sock.sendall(bytes([0x88, 0x80 | len(payload[:2])]) + mask + payload[:2])
                return messages, code
            if opcode in (0x1, 0x0):
                parts.append(payload)
                if b0 & 0x80:
                    messages.append(json.loads(b"".join(parts)))
                    parts = []

    def close(self) -> None:
        self.sock.close()


# ---- a PostgreSQL server's sessions and processes, seen from a test --------------------------


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def backends(pg_server: Any, pg_url: str, application: str,
                   what: str = "count(*)") -> int:
    """How many connections of `application` the test's database has (`what`: or what
    to do with them). psql runs on a thread: the nodes go on serving meanwhile."""
    return int(await asyncio.to_thread(
        pg_server.sql,
        f"SELECT {what} FROM pg_stat_activity WHERE datname = '{database_of(pg_url)}'"  # noqa: S608
        f" AND application_name = '{application}'"))


async def terminate(pg_server: Any, pg_url: str, application: str) -> int:
    return await backends(pg_server, pg_url, application, "count(pg_terminate_backend(pid))")


async def deafen(store: Any) -> None:
    """The node stops reading the feed by itself (no timer, no wake-ups): only what the
    test asks for (`catch_up`) reaches its sockets."""
    for task in store._background:
        task.cancel()
    async with store.listener.lock:
        await store.listener.conn.remove_listener("taskpush", store.feed.notified)


def postgres_processes(pg_server: Any) -> list[int]:
    """The PostgreSQL server's processes: the postmaster and its children."""
    master = int(Path(pg_server.data, "postmaster.pid").read_text().split()[0])
    pids = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path("/proc", entry, "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                pids.append(int(entry))
    return pids


@contextlib.contextmanager
def hung_postgres(pg_server: Any) -> Iterator[None]:
    """The whole PostgreSQL server stopped (SIGSTOP: connections open, nothing answered, not
    even a cancel) for the block, and running again after it whatever happens: a process
    that ended meanwhile is passed over, never left half-stopped for the next test."""
    pids = postgres_processes(pg_server)
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
