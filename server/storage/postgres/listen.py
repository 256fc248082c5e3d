"""The node's dedicated connection, shared by the cluster feed and the node registry: it
LISTENs for the cluster's wake-ups and holds the session advisory locks (the node's name,
the jobs it leads), which live exactly as long as it does. Lost, it is made again with a
backoff, and the feed then reads what was committed meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from .errors import unavailable_reason

log = logging.getLogger(__name__)

CHANNEL = "taskpush"
RECONNECT_MIN, RECONNECT_MAX = 0.1, 2.0  # the listening connection's backoff

# (connection, starting): run on every new connection before it is used; may refuse it
Hook = Callable[[asyncpg.Connection, bool], Awaitable[None]]


class ListenConnection:
    """One LISTEN connection: `conn` (None while there is none), `lock` (one statement at a
    time on it), `held` (the job locks taken on it: they died with any earlier one)."""

    def __init__(self, url: str, node: str, timeout: float,
                 notified: Callable[[Any, int, str, str], None],
                 hooks: list[Hook], reconnected: Callable[[], None]) -> None:
        self.url = url
        self.node = node
        self.timeout = timeout
        self.conn: asyncpg.Connection | None = None
        self.lock = asyncio.Lock()
        self.held: set[str] = set()
        self._notified = notified  # the wake-up handler (the feed's)
        self.hooks = hooks  # the name lock first (it may refuse the start), then the feed
        self._reconnected = reconnected
        self._lost = asyncio.Event()
        self._pid: int | None = None  # its server process: ended on a reconnect

    @property
    def application(self) -> str:
        return f"taskpush {self.node} listen"[:63]

    async def connect(self, *, starting: bool = False) -> None:
        """A new listening connection, replacing any earlier one."""
        # the server's keepalives end this session if this node's host goes silent (its
        # locks with it); a stuck session this node gave up on is ended below
        keepalive = str(max(1, math.ceil(self.timeout)))
        application = self.application
        conn = await asyncpg.connect(
            self.url, timeout=self.timeout, command_timeout=self.timeout,
            server_settings={"application_name": application,
                             "tcp_keepalives_idle": keepalive,
                             "tcp_keepalives_interval": keepalive,
                             "tcp_keepalives_count": "3"})
        try:
            await conn.add_listener(CHANNEL, self._notified)
            if self._pid is not None:
                # the previous session may live on server-side (stuck, or its TCP
                # connection half-open) and keep the name and job locks: end it
                with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = $1 AND application_name = $2"
                        " AND pid <> pg_backend_pid()",
                        self._pid, application)
            for hook in self.hooks:
                await hook(conn, starting)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._closed)
        self.held.clear()  # session locks died with the previous connection
        self.conn = conn
        self._pid = conn.get_server_pid()
        self._lost.clear()

    def _closed(self, conn: asyncpg.Connection) -> None:
        if conn is self.conn:
            self.held.clear()
            self._lost.set()

    def drop(self) -> None:
        """The listening connection did not answer: replace it."""
        if self.conn is not None:
            self.held.clear()
            self._lost.set()

    async def keep(self) -> None:
        """Re-establish the listening connection when it is lost (backoff), then have the
        feed catch up: what committed meanwhile was not announced to us."""
        delay = RECONNECT_MIN
        while True:
            await self._lost.wait()
            old, self.conn = self.conn, None
            if old is not None:
                old.terminate()
            while True:
                try:
                    await self.connect()
                except Exception as exc:
                    if unavailable_reason(exc) is None:
                        log.exception("cannot re-establish the listening connection")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                delay = RECONNECT_MIN
                break
            self._reconnected()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
            conn.terminate()
