"""The cluster's node registry: each node's heartbeat row in `nodes` (the database's
clock), the lock on its name (two live nodes with one name would end each other's
in-process tasks), which node leads a cluster-wide job (a session advisory lock on the
listening connection), and the in-process tasks of nodes gone silent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from ...core.model import Task
from ..api import StoreRefused
from ..rows import ACTIVE_SQL, COLUMNS
from .errors import unavailable_reason
from .listen import RECONNECT_MAX, ListenConnection
from .txn import CODEC

log = logging.getLogger(__name__)

Run = Callable[..., Awaitable[Any]]  # fn(connection, *args) on a pooled connection


def lock_key(name: str) -> int:
    """The advisory lock (a signed 64-bit key) of the cluster-wide job `name`."""
    digest = hashlib.blake2b(f"taskpush:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class ClusterNodes:
    """The `api.Nodes` of a PostgreSQL node. `run` is the store's bounded call on a pooled
    connection (a failure is StorageUnavailable and an outage); `where` names the database
    in messages."""

    def __init__(self, listener: ListenConnection, run: Run, *, url: str, node: str,
                 node_timeout: float, timeout: float, where: str) -> None:
        self.listener = listener
        self._run = run
        self.url = url
        self.node = node
        self.node_timeout = node_timeout
        self.timeout = timeout
        self.where = where
        self._name_holder: asyncio.Task[None] | None = None  # see _hold_name
        self._closing = False

    async def heartbeat(self) -> None:
        """This node's row in `nodes`, seen now (the database's clock: no skew)."""
        async def beat(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO nodes (name) VALUES ($1) ON CONFLICT (name)"
                " DO UPDATE SET seen_at = now()", self.node)

        await self._run(beat)

    async def on_connected(self, conn: asyncpg.Connection, starting: bool) -> None:
        """A new listening connection: lock this node's name on it (held while it lives).
        At start a name another live node holds refuses the start."""
        # (a name held by a connection of its own stays there)
        named = self._name_holder is not None or await self._lock_name(conn, wait=self.timeout)
        if not named and starting:
            raise StoreRefused(f"node name {self.node!r} is in use by a running node on"
                               f" {self.where}: give each node its own --node-name")
        if not named and self._name_holder is None:  # listening still works meanwhile
            log.warning("node name %r is still locked by an ended session of this node;"
                        " taking it again when it is released", self.node)
            self._name_holder = asyncio.get_running_loop().create_task(
                self._hold_name(), name="taskpush-pg-name")

    async def _hold_name(self) -> None:
        """Lock this node's name on a connection of its own, held while the node runs: it
        waits in the lock's queue, so it is first to get the name when the ended session
        that held it goes (a node started meanwhile with the same name is refused)."""
        key = lock_key(f"node:{self.node}")
        keepalive = str(max(1, math.ceil(self.timeout)))
        while not self._closing:
            try:
                conn = await asyncpg.connect(
                    self.url, timeout=self.timeout,
                    server_settings={"application_name": f"taskpush {self.node} name"[:63],
                                     "tcp_keepalives_idle": keepalive,
                                     "tcp_keepalives_interval": keepalive,
                                     "tcp_keepalives_count": "3"})
            except Exception:
                await asyncio.sleep(RECONNECT_MAX)
                continue
            try:
                ended = asyncio.Event()
                conn.add_termination_listener(lambda _conn, ended=ended: ended.set())
                await conn.execute("SELECT pg_advisory_lock($1)", key, timeout=None)
                log.info("node name %r is locked again", self.node)
                await ended.wait()
            except Exception:
                await asyncio.sleep(RECONNECT_MAX)
            finally:
                conn.terminate()

    async def _lock_name(self, conn: asyncpg.Connection, wait: float) -> bool:
        """Take this node's name lock, waiting up to `wait` s (the previous run of this
        node, killed a moment ago, may not have been noticed gone by the server yet)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        key = lock_key(f"node:{self.node}")
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def lead(self, name: str) -> bool:
        """Whether this node runs the cluster-wide job `name` now: it holds the job's
        session advisory lock on the listening connection (held while that connection
        lives; another node takes it over when this node dies)."""
        listener = self.listener
        conn = listener.conn
        if conn is None or conn.is_closed():
            return False
        try:
            async with asyncio.timeout(self.timeout), listener.lock:
                if name in listener.held:
                    await conn.fetchval("SELECT 1")  # still alive, so still holding it
                    return True
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(name)):
                    listener.held.add(name)
                    return True
                return False
        except Exception as exc:
            # whatever it was (lost, killed mid-statement, confused by a FATAL it had not
            # read yet), this connection cannot vouch for its locks: replace it
            if unavailable_reason(exc) is None:
                log.warning("the listening connection failed (%s): replacing it",
                            type(exc).__name__)
            listener.drop()
            return False

    async def gone_nodes_tasks(self) -> list[Task]:
        """Active in-process tasks of nodes not seen for --node-timeout (or with no row at
        all). Rows of gone nodes left with no such task are forgotten first."""
        async def read(conn: asyncpg.Connection) -> list[Task]:
            await conn.execute(
                "DELETE FROM nodes n WHERE n.name <> $1"
                " AND n.seen_at < now() - make_interval(secs => $2)"
                " AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.node = n.name"
                f" AND t.origin = 'inprocess' AND t.status IN {ACTIVE_SQL})",
                self.node, self.node_timeout)
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM tasks t WHERE t.origin = 'inprocess'"
                f" AND t.status IN {ACTIVE_SQL} AND t.node IS DISTINCT FROM $1"
                " AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.name = t.node"
                " AND n.seen_at >= now() - make_interval(secs => $2))"
                " LIMIT 1000", self.node, self.node_timeout)
            return CODEC.tasks(rows)

        return list(await self._run(read))

    async def close(self) -> None:
        self._closing = True
        holder, self._name_holder = self._name_holder, None
        if holder is not None:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await holder
