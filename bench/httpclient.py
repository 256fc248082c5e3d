"""A light HTTP/1.1 client for the producer side of the load generator.

aiohttp's client spends about as much CPU per request as the server under test does, so on
a machine where the generator has one core it, not the server, set the "max rate". This
client does only what the publisher needs: keep-alive connections, one request in flight per
connection, ``Content-Length`` bodies (no chunked encoding), in an asyncio Protocol with no
task or future per request. A request that cannot be parsed closes the connection and is
counted as an error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

mono = time.monotonic_ns

# Called with (status or error name, response body, the request's tag) when a request ends.
Done = Callable[[object, bytes, object], None]


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; ``send`` only when ``busy`` is false."""

    __slots__ = ("buf", "busy", "closed", "need", "on_done", "pool", "start", "status", "tag",
                 "transport")

    def __init__(self, pool: ConnPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.start = 0
        self.need = -1  # total bytes of the current response once its head is parsed
        self.status: object = None
        self.tag: object = None
        self.on_done: Done | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, tag: object, on_done: Done) -> None:
        self.busy = True
        self.tag = tag
        self.on_done = on_done
        self.need = -1
        self.transport.write(request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while self.busy:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                i = head.find(b"content-length:")
                try:
                    self.status = int(head[9:12])
                    if i < 0:
                        raise ValueError
                    j = head.find(b"\r\n", i)
                    length = int(head[i + 15 : j if j >= 0 else len(head)])
                except ValueError:
                    return self._abort("BadResponse")
                self.start = end + 4
                self.need = self.start + length
            if len(buf) < self.need:
                return
            body = bytes(buf[self.start : self.need])
            del buf[: self.need]
            self._finish(self.status, body)

    def _finish(self, status: object, body: bytes) -> None:
        cb, tag = self.on_done, self.tag
        self.busy = False
        self.need = -1
        self.on_done = self.tag = None
        if cb is not None:
            cb(status, body, tag)
        if not self.closed:
            self.pool.idle(self)

    def _abort(self, why: str) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self.busy:
            self._finish(why, b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self.busy:
            self._finish("ConnectionLost", b"")


class ConnPool:
    """A fixed set of keep-alive connections fed from one FIFO of pending requests."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.conns: list[HttpConn] = []
        self.free: list[HttpConn] = []
        self.pending: deque = deque()
        self.errors = 0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            conn = HttpConn(self)
            await loop.create_connection(lambda c=conn: c, self.host, self.port)
            self.conns.append(conn)
            self.free.append(conn)

    def submit(self, request: bytes, tag: object, on_done: Done) -> None:
        """Send now on a free connection, or queue until one is free (FIFO)."""
        if self.free:
            self.free.pop().send(request, tag, on_done)
        else:
            self.pending.append((request, tag, on_done))

    def idle(self, conn: HttpConn) -> None:
        if self.pending:
            conn.send(*self.pending.popleft())
        else:
            self.free.append(conn)

    def lost(self, conn: HttpConn) -> None:
        if conn in self.free:
            self.free.remove(conn)

    def in_flight(self) -> int:
        return sum(1 for c in self.conns if c.busy)

    def close(self) -> None:
        for conn in self.conns:
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()


def post(host: str, port: int, path: str, body: bytes, api_key: str) -> bytes:
    """The bytes of a keep-alive POST with a JSON body."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
