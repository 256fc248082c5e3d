"""The PostgreSQL engine: any number of nodes on one database are one service.

Connections: an asyncpg pool for reads and writes, and one dedicated connection that
LISTENs for the cluster's wake-ups and holds the session advisory locks of the jobs this
node leads (`listen.py`). Every call is bounded by `timeout` (--db-timeout); a failure of
the database (unreachable, restarting, out of connections, too slow) is
`StorageUnavailable` (503) and begins an outage (`outage.Outage`: `unavailable()`, one
log line at its start and one at its end; the timer's heartbeat is the write probe);
anything else is a bug and raised as is.

Writes go through the group-commit writer (`writer.GroupWriter`), for which this store is
the `BatchCommitter`. A batch is one transaction that first locks the one row of
`seq_counter`: writers of every node are serialized by that lock, held until COMMIT, so
seq follows commit order and every statement after the lock sees every earlier commit
(the rules' reads, `model.apply_op` over `txn.PgTxn`, are race-free). The batch's tasks
are read in one statement, its rows written in one more (arrays of table rows, unnested), together
with one `feed` row per seq and a NOTIFY carrying the last seq and the node's name.

How changes reach every node's sockets, in seq order, is the cluster feed (`feed.py`);
which node runs a cluster job, and whose in-process tasks are gone, the node registry
(`nodes.py`); both use the one listening connection (`listen.py`). The SQL both engines
share is `storage/sql.py`'s; this module keeps what PostgreSQL does its own way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from ...core.errors import StorageUnavailable
from ...core.model import (
    TASK_COLUMNS,
    Operation,
    Task,
)
from ..api import PAGE_ROWS, Listeners, StoreRefused
from ..outage import PROBE_INTERVAL, Outage
from ..rows import ACTIVE_SQL, COLUMNS, page_top
from ..sql import Queries, SqlStore
from ..writer import Committed
from .errors import LOST, classify, describe_url, unavailable_reason
from .feed import FEED_PAGE as FEED_PAGE  # feed rows read at once (a test fills a page)
from .feed import ClusterFeed
from .listen import CHANNEL, ListenConnection
from .nodes import ClusterNodes
from .txn import CODEC, apply_batch, storable, write_batch

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "schema.postgres.sql"
SCHEMA_VERSION = 2
DB_TIMEOUT = 5.0
NODE_TIMEOUT = 30.0
POOL_SIZE = 10
CATCH_UP_EVERY = 1.0  # seconds: a node reads the feed this often even without a NOTIFY
FEED_RETENTION_S = 3600  # feed rows older than this are purged by the sweep leader
PAGE_LIMIT = 1000  # task rows one page read fetches at most
_SCHEMA_LOCK = 0x7461736B70757368  # 'taskpush': the advisory lock around schema creation

# A page of a snapshot: rows in order until about a byte budget is reached (at least one),
# cut by the server, so a page of large tasks never crosses the wire, nor sits in memory,
# whole; `more` says whether a row follows the last one.
_ROW_BYTES = ("200 + coalesce(length(message), 0) + coalesce(length(step), 0)"
              " + coalesce(length(result), 0) + coalesce(length(error), 0)"
              " + coalesce(length(error_type), 0) + coalesce(length(metadata), 0)")


def _page_sql(where: str, order: str, budget: str) -> str:
    return (
        f"SELECT {COLUMNS}, more FROM ("
        f"SELECT {COLUMNS}, sum(size) OVER w - size AS before,"
        f" lead(true, 1, false) OVER w AS more FROM ("
        f"SELECT {COLUMNS}, {_ROW_BYTES} AS size FROM tasks WHERE {where}"
        f" ORDER BY {order} LIMIT {PAGE_LIMIT + 1}) s"
        f" WINDOW w AS (ORDER BY {order} ROWS UNBOUNDED PRECEDING)) t"
        f" WHERE before < {budget} ORDER BY {order}")


_ACTIVE_PAGE_SQL = _page_sql(f"user_id = $1 AND status IN {ACTIVE_SQL} AND created_seq > $2",
                             "created_seq", "$3")
_CHANGES_PAGE_SQL = _page_sql("user_id = $1 AND seq > $2 AND seq <= $3", "seq", "$4")


QUERIES = Queries(numbered=True)
_INPROCESS_SQL = (f"SELECT {COLUMNS} FROM tasks WHERE status IN {ACTIVE_SQL}"
                  " AND origin = 'inprocess' AND node = $1")


def _page(rows: list[Any]) -> tuple[list[Any], bool]:
    """A page's task rows (without the flag), and whether more follow."""
    if len(rows) > PAGE_LIMIT:
        return [row[:-1] for row in rows[:PAGE_LIMIT]], True
    return [row[:-1] for row in rows], bool(rows) and rows[-1][-1]


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Pooled connections never LISTEN, SET or hold session locks: nothing to reset (the
    default reset is one more round trip per use)."""


@contextlib.asynccontextmanager
async def _pooled(pool: asyncpg.Pool, wait: float) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for one use, inside the caller's deadline (an enclosing
    `asyncio.timeout`). Cut short by that deadline (or by a statement's own timeout), the
    connection is ended, not handed back: handed back, asyncpg would first wait for the
    server to confirm the cancel and to roll back, which a hung server never does, and the
    caller would get its 503 long after --db-timeout. Ended, it goes back at once (the
    pool makes a new one when needed)."""
    conn = await pool.acquire(timeout=wait)  # for a free connection, at most
    try:
        yield conn
    except (asyncio.CancelledError, TimeoutError):
        conn.terminate()
        raise
    finally:
        await pool.release(conn)


# ---- the store ------------------------------------------------------------------------------


async def _apply_schema(conn: asyncpg.Connection, where: str) -> tuple[str, int, int]:
    """Create or check the schema, under an advisory lock (nodes may start together):
    (epoch, horizon, the last seq committed)."""
    schema = SCHEMA_PATH.read_text(encoding="utf-8")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        exists = await conn.fetchval("SELECT to_regclass('settings') IS NOT NULL")
        version = None
        if exists:
            version = await conn.fetchval(
                "SELECT value FROM settings WHERE key = 'schema_version'")
            if version is not None and not str(version).isdecimal():
                raise StoreRefused(f"PostgreSQL database {where}: its schema_version"
                                   " setting is not a number")
            if version is not None and int(version) > SCHEMA_VERSION:
                raise StoreRefused(
                    f"PostgreSQL database {where} has schema version {version},"
                    f" newer than this taskpush knows ({SCHEMA_VERSION}): upgrade taskpush")
        if version is None or int(version) < SCHEMA_VERSION:
            # DDL takes table locks: only when the schema is new or older, never while
            # other nodes write to a current one
            await conn.execute(schema)
        columns = tuple(await conn.fetchval(
            "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute"
            " WHERE attrelid = 'tasks'::regclass AND attnum > 0 AND NOT attisdropped"))
        if columns != (*TASK_COLUMNS, "node"):  # rows are written whole, in that order
            raise StoreRefused(f"PostgreSQL database {where}: the tasks table's"
                               f" columns are not this taskpush's: {', '.join(columns)}")
        await conn.execute("INSERT INTO settings VALUES ('epoch', $1)"
                           " ON CONFLICT (key) DO NOTHING", uuid.uuid4().hex)
        settings = dict(await conn.fetch("SELECT key, value FROM settings"
                                         " WHERE key IN ('epoch', 'horizon')"))
        # a new node needs no history: it delivers what commits from now on
        last = int(await conn.fetchval("SELECT seq FROM seq_counter WHERE id = 1"))
    return settings["epoch"], int(settings.get("horizon", 0)), last


class PgStore(SqlStore):
    """The `api.Store` over a PostgreSQL database shared by the nodes of a cluster; also
    the writer's `BatchCommitter`."""

    def __init__(self, url: str, *, timeout: float = DB_TIMEOUT, node_name: str | None = None,
                 node_timeout: float = NODE_TIMEOUT, notify: bool = True,
                 pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.where = describe_url(url)
        self.timeout = timeout
        self.node = node_name or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.node_timeout = node_timeout
        self.notify = notify  # False only to measure what NOTIFY costs (bench)
        self.pool_size = pool_size
        self.epoch = ""
        self._pool: asyncpg.Pool | None = None
        self._closing = False
        self.codec = CODEC
        self.q = QUERIES
        self.listeners = Listeners()
        self.feed = ClusterFeed(self.listeners, self._run, node=self.node, timeout=timeout,
                                active=lambda: not self._closing and self._pool is not None)
        self.listener = ListenConnection(url, self.node, timeout, self.feed.notified, [],
                                         self.feed.request_catch_up)
        self.nodes = ClusterNodes(self.listener, self._run, url=url, node=self.node,
                                  node_timeout=node_timeout, timeout=timeout,
                                  where=self.where)
        # the name lock first (it may refuse the start), then the feed's horizon
        self.listener.hooks += [self.nodes.on_connected, self.feed.on_connected]
        self._background: list[asyncio.Task[None]] = []
        self.outage = Outage(self.where, lambda: self.timeout, self._refused_so_far)

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Connect, apply the schema (under an advisory lock: nodes may start together),
        read the shared settings, LISTEN, and start the writer and the feed. `exclusive`
        does not apply: a shared database is the point."""
        try:
            self._pool = await asyncio.wait_for(self._create_pool(), self.timeout)
            async with self._pool.acquire() as conn:
                self.epoch, self.horizon, self.last_seq = await asyncio.wait_for(
                    _apply_schema(conn, self.where), self.timeout * 4)
            await self.listener.connect(starting=True)
            await self.nodes.heartbeat()
        except StoreRefused:
            await self.close()
            raise
        except StorageUnavailable as exc:
            await self.close()
            raise StoreRefused(f"cannot open PostgreSQL database {self.where}:"
                               f" {exc.message}") from None
        except Exception as exc:
            await self.close()
            reason = unavailable_reason(exc)
            if reason is None and isinstance(exc, asyncpg.PostgresError):
                reason = f"{type(exc).__name__}: {exc}"  # the server's words, no URL in them
            if reason is None and isinstance(exc, ValueError | OverflowError | TypeError):
                reason = "invalid PostgreSQL URL"  # its text may quote the URL: not shown
            if reason is None:
                raise
            raise StoreRefused(f"cannot open PostgreSQL database {self.where}: {reason}"
                               ) from None
        self._start_writer()
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self.listener.keep(), name="taskpush-pg-listener"),
            loop.create_task(self._tick(), name="taskpush-pg-feed"),
        ]

    async def _create_pool(self) -> asyncpg.Pool:
        # min_size 0: connections are made when needed (asyncpg's own upkeep of a floor
        # would log a traceback every retry while the database is down)
        return await asyncpg.create_pool(
            self.url, min_size=0, max_size=self.pool_size, timeout=self.timeout,
            command_timeout=self.timeout, reset=_no_reset,
            server_settings={"application_name": f"taskpush {self.node}"[:63],
                             "jit": "off"})

    async def close(self) -> None:
        """Finish queued writes, stop the feed, disconnect."""
        self._closing = True
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.nodes.close()
        await self.feed.close()
        await self.listener.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.timeout)
            except Exception:
                pool.terminate()

    # ---- calls, failures and outages ---------------------------------------------------

    async def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """`fn(connection, *args)` on a pooled connection, bounded by the timeout; a
        failure of the database raises StorageUnavailable (and begins an outage)."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("store is not open")
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    async with _pooled(pool, self.timeout) as conn:
                        return await fn(conn, *args)
                except Exception as exc:
                    if unavailable_reason(exc) != LOST:
                        raise
                # the connection was found dead (the server restarted, or ended it):
                # once more on another, within the same time
                async with _pooled(pool, self.timeout) as conn:
                    return await fn(conn, *args)
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: Exception) -> StorageUnavailable:
        """The 503 for a failure of the database (an outage begins, unless a transaction
        only lost a race); anything else is a bug, raised as is."""
        failure = classify(exc)
        if failure is None:
            raise exc
        return self.outage.error(failure)

    # ---- background: heartbeat, probe, timer catch-up ------------------------------------

    async def _tick(self) -> None:
        """Every second a catch-up (a lost NOTIFY only delays a change); a heartbeat every
        third of --node-timeout; while the database is unavailable, a write probe (the
        heartbeat) every PROBE_INTERVAL, which ends the outage when it commits."""
        loop = asyncio.get_running_loop()
        beat_every = self.node_timeout / 3
        next_beat = loop.time() + beat_every
        next_catch_up = loop.time() + CATCH_UP_EVERY
        while True:
            await asyncio.sleep(PROBE_INTERVAL if self.outage.reason is not None
                                else min(CATCH_UP_EVERY, beat_every))
            now = loop.time()
            if self.outage.reason is not None or now >= next_beat:
                was_out = self.outage.reason is not None
                try:
                    await self.nodes.heartbeat()
                except StorageUnavailable:
                    pass
                except Exception:
                    log.exception("node heartbeat failed")
                else:
                    self.outage.recovered()
                    next_beat = now + beat_every
                    if was_out:
                        next_catch_up = now  # back: deliver what committed meanwhile
            if now >= next_catch_up:
                next_catch_up = now + CATCH_UP_EVERY
                self.feed.request_catch_up()

    # ---- writes -----------------------------------------------------------------------------

    async def commit(self, ops: list[Operation], deadline: float) -> Committed:
        """Apply and commit one batch in one transaction (the writer's `BatchCommitter`)."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        committing = False
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.05)):
                async with _pooled(pool, self.timeout) as conn:
                    txn = conn.transaction()
                    try:
                        await txn.start()
                        prev = int(await conn.fetchval(
                            "SELECT seq FROM seq_counter WHERE id = 1 FOR UPDATE"))
                        outcomes, last, view = await apply_batch(conn, ops, prev, self.node)
                        after, gap = prev, []
                        if last > prev:
                            after = self.last_seq
                            gap = await write_batch(conn, view, last, after, prev, self.node,
                                                    self.notify)
                            committing = True
                            await txn.commit()
                        else:  # nothing to write: let the counter go at once
                            await txn.rollback()
                    except (asyncio.CancelledError, TimeoutError):
                        raise  # the connection is ended (_pooled): nothing to roll back
                    except BaseException:
                        if not committing and not conn.is_closed():
                            with contextlib.suppress(Exception):
                                await txn.rollback()
                        raise
        except StorageUnavailable:
            raise
        except Exception as exc:
            error = self._failed(exc)
            if committing:  # it may have committed: never apply it twice
                error.retry_until_deadline = False
            raise error from exc
        self.outage.recovered()
        return Committed(outcomes, prev, last, after, gap)

    # ---- reads ------------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        async def read(conn: asyncpg.Connection) -> list[Any]:
            return await conn.fetch(sql, *params)

        return list(await self._run(read))

    async def _write_then_read(self, write: str, params: Sequence[Any], read: str) -> Any:
        async def run(conn: asyncpg.Connection) -> Any:
            await conn.execute(write, *params)
            return await conn.fetchval(read)

        return await self._run(run)

    def _storable(self, text: str) -> bool:
        return storable(text)

    async def active_page(self, user_id: int, after: int, max_bytes: int
                          ) -> tuple[list[Task], int | None]:
        """The user's active tasks with created_seq above `after`, in created_seq order, as
        many as fit in about `max_bytes` (at least one); the cursor for the next page, None
        at the end."""
        async def read(conn: asyncpg.Connection) -> list[Any]:
            return await conn.fetch(_ACTIVE_PAGE_SQL, user_id, after, max_bytes)

        rows, more = _page(await self._run(read))
        tasks = [CODEC.task(row) for row in rows]
        return tasks, (tasks[-1].created_seq if more else None)

    async def changes_page(self, user_id: int, after: int, upto: int, max_bytes: int
                           ) -> tuple[list[Task | tuple[str, int]], int | None] | None:
        """The user's tasks and tombstones with seq in (after, upto], in seq order, about
        `max_bytes` of them; the cursor for the next page (None at the end). None if the
        history after `after` is no longer kept (resync): the horizon is read in the same
        snapshot as the rows, since another node's sweep may move it."""
        async def read(conn: asyncpg.Connection) -> Any:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                horizon = int(await conn.fetchval(
                    "SELECT coalesce((SELECT value FROM settings WHERE key = 'horizon'), '0')"))
                self.horizon = max(self.horizon, horizon)
                if after < horizon:
                    return None
                taken, more = _page(await conn.fetch(_CHANGES_PAGE_SQL, user_id, after, upto,
                                                     max_bytes))
                deleted = await conn.fetch(self.q.tombstones, user_id, after,
                                           page_top(taken, more, upto), PAGE_ROWS)
                return taken, more, deleted

        got = await self._run(read)
        if got is None:
            return None
        rows, more, deleted = got
        return CODEC.merge_tombstones(rows, more, upto, deleted)

    async def active_by_origin(self, origin: str) -> list[Task]:
        """Active tasks of this origin; "inprocess": only this node's."""
        if origin == "inprocess":
            return await self._tasks(_INPROCESS_SQL, (self.node,))
        return await super().active_by_origin(origin)

    async def purge_tombstones(self, deleted_before: str) -> int:
        """Forget old tombstones (a `since` older than the newest forgotten one must
        resync) and feed rows older than the feed's retention. Run by the sweep leader."""
        async def purge(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await conn.execute(
                    "DELETE FROM feed WHERE committed_at < now() - make_interval(secs => $1)",
                    float(FEED_RETENTION_S))
                top = await conn.fetchval(self.q.purge_top, deleted_before)
                if top is None:
                    return 0
                status = await conn.execute(self.q.purge, top)
                await conn.execute(
                    "INSERT INTO settings VALUES ('horizon', $1) ON CONFLICT (key) DO UPDATE"
                    " SET value = greatest(settings.value::bigint,"
                    " excluded.value::bigint)::text", str(top))
                # every node judges `since` against it: tell them (on commit)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"horizon {top}")
            self.horizon = max(self.horizon, int(top))
            return int(status.split()[-1])

        return int(await self._run(purge))
