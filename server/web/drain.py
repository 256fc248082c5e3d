"""Waiting for a transport to take writes again, on public transport methods only (no
aiohttp private): `wait_writable`, `writing_paused`."""

from __future__ import annotations

import asyncio
import weakref

DRAIN_TICK = 0.005  # seconds between looks at the buffers of the transports waited on


class _Drains:
    """The transports that tasks of one loop wait on to drain, looked at together.

    asyncio tells only a transport's protocol that writing may resume (`resume_writing`),
    and that protocol is aiohttp's. So a waiter reads the transport's public buffer size
    instead: one timer, running only while someone waits, wakes each waiter once its
    transport's buffer is at or below the low-water mark, and fails it if the transport
    closes first. No per-connection state, no task, nothing while no one waits."""

    __slots__ = ("_loop", "_timer", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: list[tuple[asyncio.WriteTransport, int, asyncio.Future[None]]] = []

    def wait(self, transport: asyncio.WriteTransport, low: int) -> asyncio.Future[None]:
        future = self._loop.create_future()
        self._waiters.append((transport, low, future))
        if self._timer is None:
            self._timer = self._loop.call_later(DRAIN_TICK, self._look)
        return future

    def _look(self) -> None:
        self._timer = None
        waiting = []
        for entry in self._waiters:
            transport, low, future = entry
            if future.done():
                continue  # its task was cancelled
            if transport.is_closing():
                future.set_exception(ConnectionResetError("connection lost"))
            elif transport.get_write_buffer_size() <= low:
                future.set_result(None)
            else:
                waiting.append(entry)
        self._waiters = waiting
        if waiting:
            self._timer = self._loop.call_later(DRAIN_TICK, self._look)


_DRAINS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Drains] = (
    weakref.WeakKeyDictionary())


def writing_paused(transport: asyncio.WriteTransport) -> bool:
    """The transport's buffer is over its high-water mark (where asyncio pauses writers)."""
    return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]


async def wait_writable(transport: asyncio.WriteTransport) -> None:
    """Return once the transport takes writes again: its buffer at or below its low-water
    mark, which is what asyncio's `resume_writing` means, read through public transport
    methods only; raise ConnectionResetError if the connection is lost first."""
    if transport.is_closing():
        raise ConnectionResetError("connection lost")
    low = transport.get_write_buffer_limits()[0]
    if transport.get_write_buffer_size() <= low:
        return
    loop = asyncio.get_running_loop()
    drains = _DRAINS.get(loop)
    if drains is None:
        drains = _DRAINS[loop] = _Drains(loop)
    await drains.wait(transport, low)
