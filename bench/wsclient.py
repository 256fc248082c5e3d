"""A light WebSocket client for the load generator: the handshake and frame parsing by hand.

An aiohttp client costs the load generator about as much CPU per connection and per frame as
the server spends, so with one core each the generator, not the server, was measured. This
client does only what the benchmark needs (RFC 6455: the upgrade request, unmasked server
frames, masked pong and close frames) in an asyncio Protocol. It records, per step, the
publish-to-receive latency of each ``task_status`` whose ``message`` is
``"b:<step>:<due_ns>"`` (the monotonic clock is shared by every process of the machine) and
checks that ``seq`` only grows per task.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

mono = time.monotonic_ns
loads = orjson.loads
CLOSE_FRAME = b"\x88\x80" + b"\x00\x00\x00\x00"  # masked (client frames must be), empty


class Stats:
    """What every client of one server records, shared by all of them."""

    def __init__(self) -> None:
        self.lat: dict[str, list[int]] = defaultdict(list)
        self.last_recv: dict[str, int] = {}
        self.status_msgs = 0
        self.subscribed = 0
        self.seq_regressions = 0
        self.other_msgs: dict[str, int] = defaultdict(int)
        self.close_codes: dict[str, int] = defaultdict(int)

    def count(self, step: str) -> int:
        return len(self.lat.get(step, ()))


class WsClient(asyncio.Protocol):
    """Connects, upgrades, reports when `active_tasks` arrives, then times `task_status`."""

    __slots__ = ("active_count", "buf", "error", "last_seq", "ready", "request", "stats",
                 "t_ready", "transport", "upgraded")

    def __init__(self, request: bytes, ready: asyncio.Future, stats: Stats) -> None:
        self.request = request
        self.ready = ready
        self.stats = stats
        self.buf = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.active_count: int | None = None
        self.t_ready: int | None = None
        self.error: str | None = None
        self.last_seq: dict[str, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.error = why[:200]
            self.ready.set_result(False)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if b" 101 " not in status:
                return self._fail(f"handshake: {status.decode(errors='replace')}")
            del buf[: end + 4]
            self.upgraded = True
        pos, n = 0, len(buf)
        while n - pos >= 2:
            size, offset = buf[pos + 1] & 0x7F, pos + 2
            if size == 126:
                if n - pos < 4:
                    break
                size, offset = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            elif size == 127:
                if n - pos < 10:
                    break
                size, offset = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            if n < offset + size:
                break
            opcode = buf[pos] & 0x0F
            payload = bytes(buf[offset : offset + size])
            pos = offset + size
            if opcode == 1:
                self._text(payload)
            elif opcode == 9:  # ping: answer with a masked pong carrying the same payload
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0"  # type: ignore[union-attr]
                                     + payload)
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self.stats.close_codes[str(code)] += 1
                del buf[:pos]
                return self._fail(f"closed {code}")
        del buf[:pos]

    def _text(self, payload: bytes) -> None:
        d = loads(payload)
        typ = d.get("type")
        st = self.stats
        if typ == "task_status":
            now = mono()
            st.status_msgs += 1
            tid = d.get("task_id")
            s = d.get("seq")
            prev = self.last_seq.get(tid)
            if prev is not None and s is not None and s <= prev:
                st.seq_regressions += 1
            self.last_seq[tid] = s
            m = d.get("message")
            if m and m[:2] == "b:":
                _, step, due = m.split(":")
                st.lat[step].append(now - int(due))
                st.last_recv[step] = now
        elif typ == "active_tasks":
            self.active_count = d.get("count")
            self.t_ready = mono()
            if not self.ready.done():
                self.ready.set_result(True)
        elif typ == "subscribed":
            st.subscribed += 1
        elif typ != "connected":
            st.other_msgs[str(typ)] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.error = f"connection lost: {exc!r}"[:200]
            self.ready.set_result(False)

    def send_text(self, payload: bytes) -> None:
        """One masked text frame (the all-zero mask leaves the payload as it is)."""
        n = len(payload)
        head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0xFE]) + n.to_bytes(2, "big")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head + b"\0\0\0\0" + payload)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)
            self.transport.close()


@dataclass
class Connected:
    """What a mass connect reports: who got `active_tasks`, who did not and why."""

    t0: int
    wall_s: float
    clients: list[WsClient]
    ok: list[WsClient]
    timed_out: int
    errors: dict[str, int] = field(default_factory=dict)


async def connect_many(base_url: str, tokens: dict[int, str], stats: Stats,
                       concurrency: int = 0, timeout: float = 60.0) -> Connected:
    """Connect one client per uid and wait (bounded) until each has `active_tasks`.

    concurrency=0 starts every handshake at once (the reconnect storm)."""
    loop = asyncio.get_running_loop()
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    key = base64.b64encode(os.urandom(16)).decode()
    sem = asyncio.Semaphore(concurrency) if concurrency else None

    def request(uid: int) -> bytes:
        return (f"GET /api/task/ws/task/{uid}?token={tokens[uid]} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()

    clients: list[WsClient] = []

    async def one(uid: int) -> None:
        client = WsClient(request(uid), loop.create_future(), stats)
        clients.append(client)
        try:
            await loop.create_connection(lambda: client, host, port)
        except OSError as exc:
            client._fail(f"connect: {type(exc).__name__}: {exc}")
        await client.ready

    async def limited(uid: int) -> None:
        async with sem:  # type: ignore[union-attr]
            await one(uid)

    t0 = mono()
    tasks = [asyncio.create_task(one(u) if sem is None else limited(u)) for u in tokens]
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    t1 = mono()
    errors: dict[str, int] = defaultdict(int)
    for c in clients:
        if c.error:
            errors[c.error[:80]] += 1
    ok = [c for c in clients if c.ready.done() and not c.ready.cancelled() and c.ready.result()]
    return Connected(t0, (t1 - t0) / 1e9, clients, ok, len(pending), dict(errors))


async def close_all(clients: list[WsClient]) -> None:
    """Send a close frame on each and drop the connection (in slices: not a storm)."""
    for i in range(0, len(clients), 500):
        for client in clients[i : i + 500]:
            client.close()
        await asyncio.sleep(0.01)

