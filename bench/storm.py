"""A light WebSocket client for the reconnect storm: the handshake and frame parsing by hand.

An aiohttp client costs the load generator about as much CPU per connection as the server
spends answering it, so with one core each, a 10,000-client storm measured the load
generator. This client does only what a storm needs (RFC 6455: the upgrade request, unmasked
server frames, a masked close frame) in an asyncio Protocol, at a fraction of that cost.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from urllib.parse import urlsplit

import orjson

from bench.clients import all_at_once, connect_summary

mono = time.monotonic_ns
CLOSE_FRAME = b"\x88\x80" + b"\x00\x00\x00\x00"  # masked (client frames must be), empty


class StormClient(asyncio.Protocol):
    """Connects, upgrades, and reports when `active_tasks` arrives (its count and time)."""

    __slots__ = ("active_count", "buf", "error", "ready", "request", "t_ready", "transport",
                 "upgraded")

    def __init__(self, request: bytes, ready: asyncio.Future) -> None:
        self.request = request
        self.ready = ready
        self.buf = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.active_count: int | None = None
        self.t_ready: int | None = None
        self.error: str | None = None

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
        while len(buf) >= 2:
            size, offset = buf[1] & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, offset = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, offset = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < offset + size:
                return
            opcode = buf[0] & 0x0F
            payload = bytes(buf[offset: offset + size])
            del buf[: offset + size]
            if opcode == 1 and not self.ready.done():
                message = orjson.loads(payload)
                if message.get("type") == "active_tasks":
                    self.active_count = message.get("count")
                    self.t_ready = mono()
                    self.ready.set_result(True)
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                return self._fail(f"closed {code}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.error = f"connection lost: {exc!r}"[:200]
            self.ready.set_result(False)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(CLOSE_FRAME)
            self.transport.close()


async def storm(base_url: str, tokens: dict[int, str], timeout: float) -> dict:
    """Every client handshakes at once; waits until each has `active_tasks` (or failed).

    Returns the same shape as `Pool.connect_many`: t0, wall_s, clients, ok, timed_out,
    errors. The caller closes the clients (`close_storm`)."""
    loop = asyncio.get_running_loop()
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    key = base64.b64encode(os.urandom(16)).decode()

    def request(uid: int) -> bytes:
        return (f"GET /api/task/ws/task/{uid}?token={tokens[uid]} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()

    clients: list[StormClient] = []

    async def one(uid: int) -> None:
        client = StormClient(request(uid), loop.create_future())
        clients.append(client)
        try:
            await loop.create_connection(lambda: client, host, port)
        except OSError as exc:
            client._fail(f"connect: {type(exc).__name__}: {exc}")
        await client.ready

    t0, t1, _, pending = await all_at_once([one(uid) for uid in tokens], timeout)
    return connect_summary(t0, t1, clients, len(pending))


async def close_storm(clients: list[StormClient]) -> None:
    for client in clients:
        client.close()
    await asyncio.sleep(0)  # let the transports start closing
