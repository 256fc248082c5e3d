"""The PostgreSQL engine: any number of nodes on one database are one service.

Connections: an asyncpg pool for reads and writes, and one dedicated connection that
LISTENs for the cluster's wake-ups and holds the session advisory locks of the jobs this
node leads (`lead`). Every call is bounded by `timeout` (--db-timeout); a failure of the
database (unreachable, restarting, out of connections, too slow) is `StorageUnavailable`
(503) and begins an outage (`unavailable()`, one log line at its start and one at its end,
a background write probe); anything else is a bug and raised as is.

Writes go through the group-commit writer (`writer.GroupWriter`), for which this store is
the `BatchCommitter`. A batch is one transaction that first locks the one row of
`seq_counter`: writers of every node are serialized by that lock, held until COMMIT, so
seq follows commit order and every statement after the lock sees every earlier commit
(the rules' reads, `model.apply_op` over `_Txn`, are race-free). The batch's tasks are read
in one statement, its rows written in one more (arrays of table rows, unnested), together
with one `feed` row per seq and a NOTIFY carrying the last seq and the node's name.

The feed is how changes reach every node's sockets: after a commit, or on a NOTIFY (only a
wake-up, never the data), on start, after the listening connection comes back and every
second, a node reads the feed after the last seq it delivered (`last_seq`) and hands the
changes to `on_publish` in seq order. seqs are contiguous, and rows of a later seq are
never visible before those of an earlier one, so a node never skips a change; a lost
notification only delays it. The sweep leader's purge of tombstones notifies
`horizon <seq>`: every node then answers a `since` below it with resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from msgspec.structs import asdict

from ...core import jsonutil
from ...core.errors import StorageUnavailable
from ...core.model import (
    ACTIVE,
    CHANGING_FIELDS,
    TASK_COLUMNS,
    Change,
    Kind,
    Operation,
    Outcome,
    Publication,
    Register,
    Task,
    apply_op,
    utc_now,
)
from ..api import PAGE_ROWS, Listeners, StoreRefused
from ..outage import PROBE_INTERVAL, Failure, Outage
from ..rows import ACTIVE_SQL, COLUMNS, TERMINAL_SQL, RowCodec, dumps, page_top
from ..sql import SqlStore
from ..writer import Committed, GroupWriter

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "schema.postgres.sql"
SCHEMA_VERSION = 2
DB_TIMEOUT = 5.0
NODE_TIMEOUT = 30.0
CHANNEL = "taskpush"
POOL_SIZE = 10
FEED_PAGE = 1000  # feed rows read (and handed to on_publish) at once
CATCH_UP_EVERY = 1.0  # seconds: a node reads the feed this often even without a NOTIFY
FEED_RETENTION_S = 3600  # feed rows older than this are purged by the sweep leader
RECONNECT_MIN, RECONNECT_MAX = 0.1, 2.0  # the listening connection's backoff
PAGE_LIMIT = 1000  # task rows one page read fetches at most
PREDICT_IDS = 4000  # generated task ids read ahead of a batch, at most
MAX_PASSES = 5  # runs of a batch's rules (each after reading what the last one missed)
_SCHEMA_LOCK = 0x7461736B70757368  # 'taskpush': the advisory lock around schema creation

# The one write statement of a batch: rows passed as arrays of the tables' own row types.
_WRITE_SQL = """
WITH ev AS (
    INSERT INTO events SELECT * FROM unnest($1::events[])
), ins AS (
    INSERT INTO tasks SELECT * FROM unnest($2::tasks[])
), upd AS (
    UPDATE tasks t SET {changing} FROM unnest($3::tasks[]) u WHERE t.task_id = u.task_id
), tomb AS (
    INSERT INTO tombstones SELECT * FROM unnest($4::tombstones[])
), fd AS (
    INSERT INTO feed (seq, kind, task) SELECT f.seq, f.kind, f.task FROM unnest($5::feed[]) f
), counter AS (
    UPDATE seq_counter SET seq = $6::bigint WHERE id = 1
)
SELECT f.seq, f.kind, f.task FROM (SELECT {notify}) n LEFT JOIN LATERAL (
    SELECT seq, kind, task FROM feed WHERE seq > $8 AND seq <= $9 ORDER BY seq LIMIT $10
) f ON true
"""
# the wake-up's payload: "<last seq> <node>" (a node ignores its own). The statement also
# returns the feed rows other nodes committed between what this node delivered ($8) and
# this batch ($9): they go to on_publish first, and reading them here costs no round trip.
_CHANGING = ", ".join(f"{name} = u.{name}" for name in CHANGING_FIELDS)  # what a change moves
_WRITE_NOTIFY = _WRITE_SQL.format(
    changing=_CHANGING, notify=f"pg_notify('{CHANNEL}', $6::bigint::text || ' ' || $7::text)")
_WRITE_QUIET = _WRITE_SQL.format(changing=_CHANGING, notify="$6::bigint, $7::text")

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


def _page(rows: list[Any]) -> tuple[list[Any], bool]:
    """A page's task rows (without the flag), and whether more follow."""
    if len(rows) > PAGE_LIMIT:
        return [row[:-1] for row in rows[:PAGE_LIMIT]], True
    return [row[:-1] for row in rows], bool(rows) and rows[-1][-1]


# ---- text the database cannot hold -------------------------------------------------------
# PostgreSQL text cannot hold U+0000, which a message may carry: stored escaped (U+FFFF as
# the escape), restored on read. Other text is stored verbatim.
_ESC = "\uffff"
_UNESCAPE = re.compile("\uffff([01])")


def _put(text: str | None) -> str | None:
    if text is None or ("\x00" not in text and _ESC not in text):
        return text
    return text.replace(_ESC, _ESC + "1").replace("\x00", _ESC + "0")


def _get(text: str | None) -> str | None:
    if text is None or _ESC not in text:
        return text
    return _UNESCAPE.sub(lambda m: "\x00" if m.group(1) == "0" else _ESC, text)


def _storable(text: str) -> bool:
    """Whether PostgreSQL can compare with `text` as it is (ids and keys are printable:
    one that is not names nothing stored)."""
    return "\x00" not in text


# the tasks table's columns are model.Task's fields, in order, then `node`
CODEC = RowCodec(text_in=_put, text_out=_get, float_progress=True)
_row_to_task = CODEC.task


def _task_row(task: Task, node: str | None) -> tuple[Any, ...]:
    """A `tasks` row (model.Task's fields in order, then the node) for a task."""
    return (*CODEC.row(task), node)


def _task_json(task: Task) -> str:
    """The task as a feed row carries it (every field, internal ones too)."""
    return jsonutil.dumps(asdict(task))


# ---- failures -----------------------------------------------------------------------------

_LOST = "connection to the database lost"
_UNREACHABLE = "database server unreachable"
_SLOW = "the database does not answer in time"
_STARTING = "database server is starting up or shutting down"
_FULL = "too many connections to the database"
_RESOURCES = "database server out of resources (disk or memory)"
_READ_ONLY = "database is read-only (a standby?)"
_AUTH = "the database refuses our credentials"
# a batch that failed for one of these before COMMIT was sent never reached the database:
# a caller with time left is tried again (the server may be back within it)
_CONFLICT = "a transaction conflict (deadlock or serialization failure)"
_RETRYABLE = frozenset({_LOST, _UNREACHABLE, _STARTING, _FULL, _CONFLICT})


def unavailable_reason(exc: BaseException) -> str | None:
    """Why the database cannot serve us, if `exc` says it cannot (not a bug); else None."""
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        return _SLOW
    if isinstance(exc, asyncpg.TransactionRollbackError):  # SQLSTATE class 40
        return _CONFLICT
    if isinstance(exc, asyncpg.PostgresConnectionError):  # SQLSTATE class 08
        return _LOST
    if isinstance(exc, asyncpg.InterfaceError):
        text = str(exc)
        return _LOST if "closed" in text or "closing" in text else None
    if isinstance(exc, asyncpg.InternalClientError):
        # a pooled connection the server ended while idle, used before its end was read:
        # the protocol meets the server's FATAL mid-statement (connections are never
        # shared here, so nothing else confuses it)
        return _LOST
    if isinstance(exc, asyncpg.CannotConnectNowError | asyncpg.AdminShutdownError
                  | asyncpg.CrashShutdownError):
        return _STARTING
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return _FULL
    if isinstance(exc, asyncpg.InsufficientResourcesError):
        return _RESOURCES
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return _READ_ONLY
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError
                  | asyncpg.InvalidPasswordError):
        return _AUTH
    if isinstance(exc, ConnectionRefusedError):
        return _UNREACHABLE
    if isinstance(exc, ConnectionError | EOFError):
        return _LOST
    if isinstance(exc, OSError):
        return _UNREACHABLE
    return None


def classify(exc: BaseException) -> Failure | None:
    """A failure of the database as the outage sees it (None: a bug). A conflict is no
    outage (one transaction lost a race, the database is fine)."""
    reason = unavailable_reason(exc)
    if reason is None:
        return None
    return Failure(reason, retry=reason in _RETRYABLE, outage=reason != _CONFLICT)


def describe_url(url: str) -> str:
    """`host:port/database` of a PostgreSQL URL: what a log line may show of it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "(unparsable URL)"
    return f"{host}:{port}{parts.path or '/'}"


def lock_key(name: str) -> int:
    """The advisory lock (a signed 64-bit key) of the cluster-wide job `name`."""
    digest = hashlib.blake2b(f"taskpush:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


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


# ---- the transaction's view -----------------------------------------------------------------


class _Txn:
    """One write transaction's state: the `model.TxnView` the rules run over.

    Everything the rules may ask is read before they run (the batch's tasks in one
    statement, its idempotency keys and its users' active counts in one each); a question
    about something not read (a generated id that was not foreseen) is a miss: the batch's
    rules run again once it has been read. Writes are kept as the rows of one statement.
    """

    __slots__ = ("counts", "events", "feed", "inserted", "keys", "known_keys", "misses",
                 "node", "overlay", "purged", "stored", "tombstones", "user_delta")

    def __init__(self, stored: dict[str, Task | None],
                 keys: dict[tuple[str, str], tuple[int, str | None]],
                 counts: dict[int, int], node: str) -> None:
        self.stored = stored  # task_id -> as committed (None: no such task)
        self.known_keys = keys
        self.counts = counts
        self.node = node
        self.overlay: dict[str, Task | None] = {}
        self.keys: dict[tuple[str, str], tuple[int, str | None]] = {}
        self.events: dict[str, list[tuple[Any, ...]]] = {}
        self.feed: list[tuple[Any, ...]] = []
        self.tombstones: list[tuple[Any, ...]] = []
        self.purged: set[str] = set()  # stored tasks deleted by this batch
        self.inserted: set[str] = set()  # ids this batch inserts (not stored before)
        self.user_delta: dict[int, int] = {}
        self.misses: set[str] = set()

    def load(self, task_id: str) -> Task | None:
        if task_id in self.overlay:
            return self.overlay[task_id]
        if task_id in self.stored:
            return self.stored[task_id]
        self.misses.add(task_id)
        return None

    def applied_with_key(self, task_id: str, key: str) -> tuple[int, str | None] | None:
        done = self.keys.get((task_id, key))
        return done if done is not None else self.known_keys.get((task_id, key))

    def active_count(self, user_id: int) -> int:
        if user_id not in self.counts:
            self.misses.add(f"\x00user:{user_id}")  # never a task id (they are printable)
            return 0
        return self.counts[user_id] + self.user_delta.get(user_id, 0)

    def _moved(self, user_id: int, before: str | None, after: str | None) -> None:
        delta = (after in ACTIVE) - (before in ACTIVE)
        if delta:
            self.user_delta[user_id] = self.user_delta.get(user_id, 0) + delta

    def changed(self, task: Task, now: str, key: str | None, digest: str | None = None
                ) -> None:
        task_id, seq = task.task_id, task.seq
        before = self.load(task_id)
        self._moved(task.user_id, before.status if before else None, task.status)
        self.overlay[task_id] = task
        self.events.setdefault(task_id, []).append((
            seq, task_id, task.status, float(task.progress), _put(task.message),
            _put(task.step), dumps(task.result), _put(task.error), _put(task.error_type),
            now, key, digest))
        self.feed.append((seq, "changed", _task_json(task), None))
        if key is not None:
            self.keys[(task_id, key)] = (seq, digest)

    def created(self, task: Task, now: str) -> None:
        task_id, seq = task.task_id, task.seq
        self._moved(task.user_id, None, task.status)
        self.overlay[task_id] = task
        self.inserted.add(task_id)
        self.events.setdefault(task_id, []).append((
            seq, task_id, "pending", 0.0, None, None, None, None, None, now, None, None))
        self.feed.append((seq, "created", _task_json(task), None))

    def deleted(self, task: Task, seq: int, now: str) -> None:
        task_id = task.task_id
        self._moved(task.user_id, task.status, None)
        self.overlay[task_id] = None
        self.events.pop(task_id, None)  # the history goes with the task, and its keys
        if self.keys:
            self.keys = {k: v for k, v in self.keys.items() if k[0] != task_id}
        if self.known_keys:
            self.known_keys = {k: v for k, v in self.known_keys.items() if k[0] != task_id}
        if task_id in self.inserted:
            self.inserted.discard(task_id)
        if self.stored.get(task_id) is not None:
            self.purged.add(task_id)
        self.tombstones.append((seq, task_id, task.user_id, now))
        self.feed.append((seq, "deleted", _task_json(task), None))

    def rows(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]],
                            list[tuple[Any, ...]]]:
        """(events, tasks to insert, tasks to update)."""
        events = [row for rows in self.events.values() for row in rows]
        inserts, updates = [], []
        for task_id, task in self.overlay.items():
            if task is None:
                continue
            node = self.node if task.origin == "inprocess" else None
            if task_id in self.inserted or task_id in self.purged:
                inserts.append(_task_row(task, node))
            else:
                updates.append(_task_row(task, node))
        return events, inserts, updates


# ---- the store ------------------------------------------------------------------------------


class PgStore(SqlStore):
    """The `store.Store` over a PostgreSQL database shared by the nodes of a cluster; also
    the writer's `BatchCommitter`."""

    last_seq = 0  # the highest seq handed to on_publish
    horizon = 0

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
        self.last_seq = 0  # the highest seq handed to on_publish
        self.horizon = 0
        self.listeners = Listeners()
        self._pool: asyncpg.Pool | None = None
        self._listen: asyncpg.Connection | None = None
        self._listen_lock = asyncio.Lock()  # one statement at a time on that connection
        self._listen_lost = asyncio.Event()
        self._listen_pid: int | None = None  # its server process: ended on a reconnect
        self._name_holder: asyncio.Task[None] | None = None  # see _hold_name
        self._leads: set[str] = set()
        self._feed_lock = asyncio.Lock()
        self._catching_up: asyncio.Task[None] | None = None
        self._catch_up_again = False
        self._writer: GroupWriter | None = None
        self._background: list[asyncio.Task[None]] = []
        self.outage = Outage(self.where, lambda: self.timeout, self._refused_so_far)
        self._closing = False

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Connect, apply the schema (under an advisory lock: nodes may start together),
        read the shared settings, LISTEN, and start the writer and the feed. `exclusive`
        does not apply: a shared database is the point."""
        try:
            self._pool = await asyncio.wait_for(self._create_pool(), self.timeout)
            async with self._pool.acquire() as conn:
                await asyncio.wait_for(self._apply_schema(conn), self.timeout * 4)
            await self._connect_listener(starting=True)
            await self._heartbeat()
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
        self._writer = GroupWriter(self, self.timeout)
        self._writer.start()
        loop = asyncio.get_running_loop()
        self._background = [
            loop.create_task(self._keep_listening(), name="taskpush-pg-listener"),
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

    async def _apply_schema(self, conn: asyncpg.Connection) -> None:
        schema = SCHEMA_PATH.read_text(encoding="utf-8")
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            exists = await conn.fetchval("SELECT to_regclass('settings') IS NOT NULL")
            version = None
            if exists:
                version = await conn.fetchval(
                    "SELECT value FROM settings WHERE key = 'schema_version'")
                if version is not None and not str(version).isdecimal():
                    raise StoreRefused(f"PostgreSQL database {self.where}: its schema_version"
                                       " setting is not a number")
                if version is not None and int(version) > SCHEMA_VERSION:
                    raise StoreRefused(
                        f"PostgreSQL database {self.where} has schema version {version},"
                        f" newer than this taskpush knows ({SCHEMA_VERSION}): upgrade taskpush")
            if version is None or int(version) < SCHEMA_VERSION:
                # DDL takes table locks: only when the schema is new or older, never while
                # other nodes write to a current one
                await conn.execute(schema)
            columns = tuple(await conn.fetchval(
                "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute"
                " WHERE attrelid = 'tasks'::regclass AND attnum > 0 AND NOT attisdropped"))
            if columns != (*TASK_COLUMNS, "node"):  # rows are written whole, in that order
                raise StoreRefused(f"PostgreSQL database {self.where}: the tasks table's"
                                   f" columns are not this taskpush's: {', '.join(columns)}")
            await conn.execute("INSERT INTO settings VALUES ('epoch', $1)"
                               " ON CONFLICT (key) DO NOTHING", uuid.uuid4().hex)
            settings = dict(await conn.fetch("SELECT key, value FROM settings"
                                             " WHERE key IN ('epoch', 'horizon')"))
            self.epoch = settings["epoch"]
            self.horizon = int(settings.get("horizon", 0))
            # a new node needs no history: it delivers what commits from now on
            self.last_seq = int(await conn.fetchval("SELECT seq FROM seq_counter WHERE id = 1"))

    async def close(self) -> None:
        """Finish queued writes, stop the feed, disconnect."""
        self._closing = True
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        tasks = [*self._background]
        if self._name_holder is not None:
            tasks.append(self._name_holder)
        if self._catching_up is not None:
            tasks.append(self._catching_up)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background = []
        listen, self._listen = self._listen, None
        if listen is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listen.close(), 1.0)
            listen.terminate()
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
                    if unavailable_reason(exc) != _LOST:
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

    def unavailable(self) -> str | None:
        """Why writes are refused now ("storage unavailable: ..."), or None; never waits."""
        return self.outage.unavailable()

    async def ping(self) -> bool:
        async def check(conn: asyncpg.Connection) -> bool:
            return await conn.fetchval("SELECT 1") == 1

        return bool(await self._run(check))

    # ---- background: heartbeat, probe, timer catch-up ------------------------------------

    async def _heartbeat(self) -> None:
        """This node's row in `nodes`, seen now (the database's clock: no skew)."""
        async def beat(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO nodes (name) VALUES ($1) ON CONFLICT (name)"
                " DO UPDATE SET seen_at = now()", self.node)

        await self._run(beat)

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
                    await self._heartbeat()
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
                self._request_catch_up()

    # ---- the listening connection --------------------------------------------------------

    async def _connect_listener(self, *, starting: bool = False) -> None:
        """The dedicated connection: LISTEN, and the lock on this node's name (held while it
        lives: two live nodes with one name would end each other's in-process tasks)."""
        # the server's keepalives end this session if this node's host goes silent (its
        # locks with it); a stuck session this node gave up on is ended below
        keepalive = str(max(1, math.ceil(self.timeout)))
        application = f"taskpush {self.node} listen"[:63]
        conn = await asyncpg.connect(
            self.url, timeout=self.timeout, command_timeout=self.timeout,
            server_settings={"application_name": application,
                             "tcp_keepalives_idle": keepalive,
                             "tcp_keepalives_interval": keepalive,
                             "tcp_keepalives_count": "3"})
        try:
            await conn.add_listener(CHANNEL, self._notified)
            if self._listen_pid is not None:
                # the previous session may live on server-side (stuck, or its TCP
                # connection half-open) and keep the name and job locks: end it
                with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = $1 AND application_name = $2"
                        " AND pid <> pg_backend_pid()",
                        self._listen_pid, application)
            # (a name held by a connection of its own stays there)
            named = self._name_holder is not None or await self._lock_name(
                conn, wait=self.timeout)
            if not starting:  # a purge announced while this node was not listening
                self.horizon = max(self.horizon, int(await conn.fetchval(
                    "SELECT coalesce((SELECT value FROM settings WHERE key = 'horizon'),"
                    " '0')")))
        except BaseException:
            conn.terminate()
            raise
        if not named and starting:
            conn.terminate()
            raise StoreRefused(f"node name {self.node!r} is in use by a running node on"
                               f" {self.where}: give each node its own --node-name")
        if not named and self._name_holder is None:  # listening still works meanwhile
            log.warning("node name %r is still locked by an ended session of this node;"
                        " taking it again when it is released", self.node)
            self._name_holder = asyncio.get_running_loop().create_task(
                self._hold_name(), name="taskpush-pg-name")
        conn.add_termination_listener(self._listener_closed)
        self._leads.clear()  # session locks died with the previous connection
        self._listen = conn
        self._listen_pid = conn.get_server_pid()
        self._listen_lost.clear()

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

    def _listener_closed(self, conn: asyncpg.Connection) -> None:
        if conn is self._listen:
            self._leads.clear()
            self._listen_lost.set()

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        """A wake-up: another node committed up to that seq (or purged tombstones up to
        the new horizon). Our own commits are ours to deliver (`published`): reading them
        back here would cost a read per commit."""
        seq, _, node = payload.partition(" ")
        if seq == "horizon":  # another node's sweep forgot tombstones up to that seq
            with contextlib.suppress(ValueError):
                self.horizon = max(self.horizon, int(node))
            return
        if node == self.node:
            return
        try:
            announced = int(seq)
        except ValueError:
            announced = self.last_seq + 1
        if announced > self.last_seq:
            self._request_catch_up()

    async def _keep_listening(self) -> None:
        """Re-establish the listening connection when it is lost (backoff), then catch up:
        what committed meanwhile was not announced to us."""
        delay = RECONNECT_MIN
        while True:
            await self._listen_lost.wait()
            old, self._listen = self._listen, None
            if old is not None:
                old.terminate()
            while True:
                try:
                    await self._connect_listener()
                except Exception as exc:
                    if unavailable_reason(exc) is None:
                        log.exception("cannot re-establish the listening connection")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                delay = RECONNECT_MIN
                break
            self._request_catch_up()

    def _drop_listener(self) -> None:
        """The listening connection did not answer: replace it."""
        if self._listen is not None:
            self._leads.clear()
            self._listen_lost.set()

    async def lead(self, name: str) -> bool:
        """Whether this node runs the cluster-wide job `name` now: it holds the job's
        session advisory lock on the listening connection (held while that connection
        lives; another node takes it over when this node dies)."""
        conn = self._listen
        if conn is None or conn.is_closed():
            return False
        try:
            async with asyncio.timeout(self.timeout), self._listen_lock:
                if name in self._leads:
                    await conn.fetchval("SELECT 1")  # still alive, so still holding it
                    return True
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(name)):
                    self._leads.add(name)
                    return True
                return False
        except Exception as exc:
            # whatever it was (lost, killed mid-statement, confused by a FATAL it had not
            # read yet), this connection cannot vouch for its locks: replace it
            if unavailable_reason(exc) is None:
                log.warning("the listening connection failed (%s): replacing it",
                            type(exc).__name__)
            self._drop_listener()
            return False

    # ---- the feed -------------------------------------------------------------------------

    def _request_catch_up(self) -> None:
        if self._closing or self._pool is None:
            return
        if self._catching_up is not None:
            self._catch_up_again = True
            return
        self._catching_up = asyncio.get_running_loop().create_task(
            self._catch_up_loop(), name="taskpush-pg-catch-up")

    async def _catch_up_loop(self) -> None:
        try:
            again = True
            while again:
                self._catch_up_again = False
                try:
                    async with self._feed_lock:
                        await self._catch_up_locked()
                except StorageUnavailable:
                    return  # the outage is logged; the timer tries again
                except Exception:
                    log.exception("reading the cluster feed failed")
                    return
                again = self._catch_up_again
        finally:
            self._catching_up = None

    async def _catch_up_locked(self, upto: int | None = None) -> None:
        """Hand every committed change after `last_seq` (up to `upto`) to on_publish, in
        seq order, by pages. Called with the feed lock held."""
        while upto is None or self.last_seq < upto:
            after = self.last_seq
            rows = await self._run(self._read_feed, after, upto)
            if not rows:
                return
            first = rows[0][0]
            if first != after + 1 or rows[-1][0] != first + len(rows) - 1:
                self._feed_lost(after, first)
            self.last_seq = rows[-1][0]
            self.listeners.publish([publication(*row) for row in rows], False)

    @staticmethod
    async def _read_feed(conn: asyncpg.Connection, after: int, upto: int | None
                         ) -> list[Any]:
        if upto is None:
            return await conn.fetch("SELECT seq, kind, task FROM feed WHERE seq > $1"
                                    " ORDER BY seq LIMIT $2", after, FEED_PAGE)
        return await conn.fetch("SELECT seq, kind, task FROM feed WHERE seq > $1"
                                " AND seq <= $2 ORDER BY seq LIMIT $3", after, upto, FEED_PAGE)

    async def catch_up(self, seq: int) -> None:
        """Deliver every change up to `seq` now (a client resuming here from a seq another
        node sent it); a database that cannot answer leaves it to the timer."""
        if seq <= self.last_seq or self._pool is None:
            return
        with contextlib.suppress(StorageUnavailable, TimeoutError):
            async with asyncio.timeout(self.timeout), self._feed_lock:
                await self._catch_up_locked(upto=seq)

    def _feed_lost(self, after: int, kept: int) -> None:
        """The feed no longer holds changes this node has not delivered (it was away for
        longer than the feed is kept): its sockets must resume from the database."""
        log.error("cluster feed: changes after seq %d are no longer kept (next kept: %d);"
                  " sockets are closed so that clients resume", after, kept)
        self.listeners.feed_lost()

    def published(self, committed: Committed, seconds: float) -> Awaitable[None] | None:
        """After this node's commit: its changes go to on_publish after every earlier seq
        (committed by another node, not yet delivered here), then on_commit."""
        if not self._feed_lock.locked() and self._fill_gap(committed):
            self._publish_local(committed)
            self.listeners.committed(committed.outcomes, seconds)
            return None
        return self._published_in_order(committed, seconds)

    def _fill_gap(self, committed: Committed) -> bool:
        """Deliver the changes committed before this batch (seq up to `prev`) from the rows
        the write statement returned; False if they do not cover them (read the feed)."""
        delivered, prev, gap = self.last_seq, committed.prev, committed.before
        if prev <= delivered:
            return True
        if gap is None or delivered < committed.seen:
            return False
        rows = [row for row in gap if row[0] > delivered]
        if not rows or rows[0][0] != delivered + 1 or rows[-1][0] != prev:
            return False
        self.last_seq = prev
        self.listeners.publish([publication(*row) for row in rows], False)
        return True

    async def _published_in_order(self, committed: Committed, seconds: float) -> None:
        prev = committed.prev
        async with self._feed_lock:
            try:
                if not self._fill_gap(committed):
                    await self._catch_up_locked(upto=prev)
                    if self.last_seq < prev:  # committed before this batch, yet not kept
                        self._feed_lost(self.last_seq, prev + 1)
                        self.last_seq = prev
            except StorageUnavailable:
                pass  # this batch waits for the gap: a catch-up delivers both, in order
            else:
                self._publish_local(committed)
        self.listeners.committed(committed.outcomes, seconds)

    def _publish_local(self, committed: Committed) -> None:
        delivered, outcomes = self.last_seq, committed.outcomes
        if committed.last <= delivered:  # a catch-up got there first (or nothing committed)
            return
        if any(o.seq is not None and o.news and o.seq <= delivered for o in outcomes):
            outcomes = [o for o in outcomes if not (o.news and o.seq is not None
                                                    and o.seq <= delivered)]
        self.last_seq = committed.last
        self.listeners.publish(outcomes, True)

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
                        outcomes, last, view = await self._apply(conn, ops, prev)
                        after, gap = prev, []
                        if last > prev:
                            after = self.last_seq
                            gap = await self._write(conn, view, last, after, prev)
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

    async def _apply(self, conn: asyncpg.Connection, ops: list[Operation], prev: int
                     ) -> tuple[list[Outcome], int, _Txn]:
        """Read what the rules need, then run them (again, if they asked for more)."""
        ids: set[str] = set()
        keys: list[tuple[str, str]] = []
        users: set[int] = set()
        generated: dict[str, int] = {}  # task type -> the last op that names one of it
        for index, op in enumerate(ops):
            if isinstance(op, Register):
                if op.task_id is not None:
                    ids.add(op.task_id)
                else:
                    generated[op.task_type] = index
                if op.max_active is not None:
                    users.add(op.user_id)
            else:
                ids.add(op.task_id)
                if (isinstance(op, Change) and op.idem_key is not None
                        and _storable(op.task_id) and _storable(op.idem_key)):
                    keys.append((op.task_id, op.idem_key))
        # the names generated ids may get (type_seq, seq at most one per op so far)
        predicted: set[str] = set()
        for task_type, index in generated.items():
            if len(predicted) + index >= PREDICT_IDS:
                break  # the rest is read if asked for (a miss)
            predicted.update(f"{task_type}_{s}" for s in range(prev + 1, prev + index + 2))
        stored: dict[str, Task | None] = dict.fromkeys(ids | predicted)
        known_keys: dict[tuple[str, str], tuple[int, str | None]] = {}
        counts: dict[int, int] = {}
        await self._load(conn, list(ids | predicted), stored)
        if keys:
            for task_id, key, seq, digest in await conn.fetch(
                    "SELECT e.task_id, e.idem_key, e.seq, e.idem_digest FROM events e JOIN"
                    " unnest($1::text[], $2::text[]) k(task_id, idem_key)"
                    " ON e.task_id = k.task_id AND e.idem_key = k.idem_key",
                    [k[0] for k in keys], [k[1] for k in keys]):
                known_keys[(task_id, key)] = (seq, digest)
        if users:
            await self._count(conn, users, counts)
        for _ in range(MAX_PASSES):
            view = _Txn(stored, known_keys, counts, self.node)
            now = utc_now()
            seq = prev
            outcomes: list[Outcome] = []
            for op in ops:
                outcome, seq = apply_op(view, op, seq, now)
                outcomes.append(outcome)
            if not view.misses:
                return outcomes, seq, view
            missed_users = {int(m[6:]) for m in view.misses if m.startswith("\x00user:")}
            missed_ids = [m for m in view.misses if not m.startswith("\x00user:")]
            stored.update(dict.fromkeys(missed_ids))
            await self._load(conn, missed_ids, stored)
            if missed_users:
                await self._count(conn, missed_users, counts)
        raise RuntimeError(f"the rules still asked for unread rows after {MAX_PASSES} passes")

    @staticmethod
    async def _load(conn: asyncpg.Connection, ids: list[str],
                    stored: dict[str, Task | None]) -> None:
        ids = [i for i in ids if _storable(i)]  # others name no task (ids are printable)
        if ids:
            for row in await conn.fetch(f"SELECT {COLUMNS} FROM tasks"
                                        " WHERE task_id = ANY($1::text[])", ids):
                stored[row[0]] = _row_to_task(row)

    @staticmethod
    async def _count(conn: asyncpg.Connection, users: Iterable[int],
                     counts: dict[int, int]) -> None:
        wanted = list(users)
        counts.update(dict.fromkeys(wanted, 0))
        for user_id, count in await conn.fetch(
                f"SELECT user_id, count(*) FROM tasks WHERE user_id = ANY($1::bigint[])"
                f" AND status IN {ACTIVE_SQL} GROUP BY user_id", wanted):
            counts[user_id] = count

    async def _write(self, conn: asyncpg.Connection, view: _Txn, last: int, after: int,
                     prev: int) -> list[Any] | None:
        """Write the batch; returns the feed rows in (after, prev] (None: more than a
        page of them, so not all)."""
        if view.purged:  # deleted tasks (and their history) go before any row is written
            purged = list(view.purged)
            await conn.execute("DELETE FROM events WHERE task_id = ANY($1::text[])", purged)
            await conn.execute("DELETE FROM tasks WHERE task_id = ANY($1::text[])", purged)
        events, inserts, updates = view.rows()
        rows = await conn.fetch(_WRITE_NOTIFY if self.notify else _WRITE_QUIET, events,
                                inserts, updates, view.tombstones, view.feed, last, self.node,
                                after, prev, FEED_PAGE)
        gap = [tuple(row) for row in rows if row[0] is not None]
        return None if len(gap) == FEED_PAGE else gap

    # ---- settings ---------------------------------------------------------------------------

    async def demo_secret(self) -> str:
        """The generated demo-mode secret, created once for the whole cluster."""
        async def get_or_create(conn: asyncpg.Connection) -> str:
            await conn.execute("INSERT INTO settings VALUES ('demo_secret', $1)"
                               " ON CONFLICT (key) DO NOTHING", secrets.token_urlsafe(32))
            return str(await conn.fetchval(
                "SELECT value FROM settings WHERE key = 'demo_secret'"))

        return str(await self._run(get_or_create))

    # ---- nodes -------------------------------------------------------------------------------

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
            return [_row_to_task(row) for row in rows]

        return list(await self._run(read))

    # ---- reads ------------------------------------------------------------------------------

    async def _rows(self, sql: str, *params: Any) -> list[Task]:
        async def read(conn: asyncpg.Connection) -> list[Task]:
            return [_row_to_task(row) for row in await conn.fetch(sql, *params)]

        return list(await self._run(read))

    async def get_task(self, task_id: str) -> Task | None:
        if not _storable(task_id):
            return None
        rows = await self._rows(f"SELECT {COLUMNS} FROM tasks WHERE task_id = $1",
                                task_id)
        return rows[0] if rows else None

    async def list_tasks(
        self, user_id: int, *, status: str | None, limit: int, before: int | None
    ) -> list[Task]:
        """A user's tasks, newest (by creation) first; `before` is a created_seq cursor."""
        if status is not None and not _storable(status):
            return []
        sql = f"SELECT {COLUMNS} FROM tasks WHERE user_id = $1"
        params: list[Any] = [user_id]
        if status is not None:
            params.append(status)
            sql += f" AND status = ${len(params)}"
        if before is not None:
            params.append(before)
            sql += f" AND created_seq < ${len(params)}"
        params.append(limit)
        sql += f" ORDER BY created_seq DESC LIMIT ${len(params)}"
        return await self._rows(sql, *params)

    async def changed_since(self, user_id: int, since: int, limit: int) -> list[Task]:
        """A user's tasks whose latest change is after `since`, in seq order."""
        return await self._rows(
            f"SELECT {COLUMNS} FROM tasks WHERE user_id = $1 AND seq > $2"
            " ORDER BY seq LIMIT $3", user_id, since, limit)

    async def active_page(self, user_id: int, after: int, max_bytes: int
                          ) -> tuple[list[Task], int | None]:
        """The user's active tasks with created_seq above `after`, in created_seq order, as
        many as fit in about `max_bytes` (at least one); the cursor for the next page, None
        at the end."""
        async def read(conn: asyncpg.Connection) -> list[Any]:
            return await conn.fetch(_ACTIVE_PAGE_SQL, user_id, after, max_bytes)

        rows, more = _page(await self._run(read))
        tasks = [_row_to_task(row) for row in rows]
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
                deleted = await conn.fetch(
                    "SELECT task_id, seq FROM tombstones WHERE user_id = $1 AND seq > $2"
                    " AND seq <= $3 ORDER BY seq LIMIT $4", user_id, after,
                    page_top(taken, more, upto), PAGE_ROWS)
                return taken, more, deleted

        got = await self._run(read)
        if got is None:
            return None
        rows, more, deleted = got
        return CODEC.merge_tombstones(rows, more, upto, deleted)

    async def history_page(self, task_id: str, after: int, limit: int
                           ) -> tuple[list[dict[str, Any]], int | None]:
        """Up to `limit` recorded changes of a task with seq above `after`, oldest first;
        and the seq to continue after, None when there are no more."""
        if not _storable(task_id):
            return [], None

        async def read(conn: asyncpg.Connection) -> list[Any]:
            return await conn.fetch(
                "SELECT seq, status, progress, message, step, error, error_type, timestamp"
                " FROM events WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                task_id, after, limit + 1)

        return CODEC.history(await self._run(read), limit)

    async def active_before(self, updated_before: str, limit: int = 500) -> list[Task]:
        """Active tasks whose last change is older than the given time (stale candidates)."""
        return await self._rows(
            f"SELECT {COLUMNS} FROM tasks WHERE status IN {ACTIVE_SQL}"
            " AND updated_at < $1 ORDER BY updated_at LIMIT $2", updated_before, limit)

    async def active_by_origin(self, origin: str) -> list[Task]:
        """Active tasks of this origin; "inprocess": only this node's."""
        if origin == "inprocess":
            return await self._rows(
                f"SELECT {COLUMNS} FROM tasks WHERE status IN {ACTIVE_SQL}"
                " AND origin = 'inprocess' AND node = $1", self.node)
        return await self._rows(
            f"SELECT {COLUMNS} FROM tasks WHERE status IN {ACTIVE_SQL}"
            " AND origin = $1", origin)

    async def finished_before(self, updated_before: str, limit: int = 500) -> list[Task]:
        return await self._rows(
            f"SELECT {COLUMNS} FROM tasks WHERE status IN {TERMINAL_SQL}"
            " AND updated_at < $1 ORDER BY updated_at LIMIT $2", updated_before, limit)

    async def purge_tombstones(self, deleted_before: str) -> int:
        """Forget old tombstones (a `since` older than the newest forgotten one must
        resync) and feed rows older than the feed's retention. Run by the sweep leader."""
        async def purge(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await conn.execute(
                    "DELETE FROM feed WHERE committed_at < now() - make_interval(secs => $1)",
                    float(FEED_RETENTION_S))
                top = await conn.fetchval(
                    "SELECT max(seq) FROM tombstones WHERE deleted_at < $1", deleted_before)
                if top is None:
                    return 0
                status = await conn.execute("DELETE FROM tombstones WHERE seq <= $1", top)
                await conn.execute(
                    "INSERT INTO settings VALUES ('horizon', $1) ON CONFLICT (key) DO UPDATE"
                    " SET value = greatest(settings.value::bigint,"
                    " excluded.value::bigint)::text", str(top))
                # every node judges `since` against it: tell them (on commit)
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"horizon {top}")
            self.horizon = max(self.horizon, int(top))
            return int(status.split()[-1])

        return int(await self._run(purge))


def publication(seq: int, kind: str, text: str) -> Publication:
    """A feed row: a change another node committed."""
    return Publication(seq, Kind(kind), Task(**jsonutil.loads(text)))
