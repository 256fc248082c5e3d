"""The SQLite engine: the one module that owns SQLite's SQL and connections.

Two connections to one WAL database. Writes use a writer connection, reads aiosqlite's,
so a reader never sees a write half-done.
A whole transaction is one plain function (`_txn_*`) run in one go, so no other coroutine's
statements can interleave with it. A third connection, on a thread of its own, only runs
WAL checkpoints.

Writes go through the group-commit writer (`writer.GroupWriter`), for which this store is
the `BatchCommitter`: each batch is applied (`model.apply_op` over `_Txn`) and committed
in ONE transaction, and the listeners see it (`published`) before any caller is answered.
A small batch is written on the event loop's thread: it costs less than the two thread
wake-ups of a hop (docs/performance.md); a large one, any delete (a task's history may be
long), and the sweeps, go to the writer's own thread so the loop keeps serving meanwhile.
That thread is not aiosqlite's: a write waiting for another process's lock never holds up
a read. No connection checkpoints on commit; the checkpoint thread does, in the background
(`_committed`).

A write that cannot commit (the lock held past `timeout`, disk full, I/O error, the file
deleted or replaced under us) is rolled back and its callers get `StorageUnavailable`; the
store keeps that state (`unavailable()`, for /healthz), logs one line when it begins and
one when it ends, and probes in the background until a write commits again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import sqlite3
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter
from pathlib import Path
from typing import IO, Any, NoReturn

import aiosqlite

from ...core.errors import StorageUnavailable
from ...core.model import (
    CHANGING_FIELDS,
    TASK_COLUMNS,
    TASK_TYPES,
    Delete,
    Operation,
    Outcome,
    Task,
)
from ..api import (
    PAGE_ROWS,
    Listeners,
    StoreCorrupt,
    StoreLocked,
    StoreRefused,
)
from ..local import LocalFeed, SingleNode
from ..outage import Failure, Outage
from ..rows import ACTIVE_SQL, COLUMNS, RowCodec, dumps, page_top
from ..sql import Queries, SqlStore, apply_all
from ..writer import Committed

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "schema.sql"
INLINE_MAX_OPS = 64  # batches up to this size are written on the loop's thread
# A WAL checkpoint after CHECKPOINT_EVERY_COMMITS commits or CHECKPOINT_EVERY_OPS operations
# (each about 30 MB of WAL, from the WAL bytes per commit and per batched event measured in
# docs/performance.md, "Figures behind the store's constants"), or CHECKPOINT_EVERY_S after
# a commit, whichever is first
CHECKPOINT_EVERY_COMMITS = 2_000
CHECKPOINT_EVERY_OPS = 12_000
CHECKPOINT_EVERY_S = 2.0
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is cut back to this after a checkpoint
DB_TIMEOUT = 5.0  # default seconds a write waits for another process's lock (--db-timeout)
PROBE_BYTES = 8192  # a probe writes (then deletes) this much: it needs fresh pages, as writes do
TASK_CACHE_SIZE = 20_000  # tasks as last committed by the writer, most recent kept
_TEXT = slice(TASK_COLUMNS.index("message"), TASK_COLUMNS.index("metadata") + 1)
# What a change writes: the fields a change moves, the plain ones read in one C call, then
# `result`, the one JSON field a change moves (status first: a change that keeps it leaves
# it out of the UPDATE, sparing the status indexes).
_CHANGING_PLAIN = tuple(name for name in CHANGING_FIELDS if TASK_TYPES[name] is not Any)
assert _CHANGING_PLAIN[0] == "status"
assert tuple(name for name in CHANGING_FIELDS if TASK_TYPES[name] is Any) == ("result",)
_changing_plain = attrgetter(*_CHANGING_PLAIN)
_UPDATE_SQL = ("UPDATE tasks SET " + ", ".join(f"{name} = ?" for name in _CHANGING_PLAIN)
               + ", result = ? WHERE task_id = ?")
_UPDATE_SAME_STATUS_SQL = ("UPDATE tasks SET "
                           + ", ".join(f"{name} = ?" for name in _CHANGING_PLAIN[1:])
                           + ", result = ? WHERE task_id = ?")
_INSERT_SQL = (f"INSERT INTO tasks ({COLUMNS}) VALUES"
               f" ({', '.join('?' for _ in TASK_COLUMNS)})")


def _schema_version(schema: str) -> int:
    """The version schema.sql declares (`PRAGMA user_version = N`): a database with a
    higher one was written by a newer taskpush, whose changes this one would not keep."""
    found = re.search(r"^PRAGMA user_version\s*=\s*(\d+)", schema, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"{SCHEMA_PATH} declares no PRAGMA user_version")
    return int(found.group(1))


SCHEMA_VERSION = _schema_version(SCHEMA_PATH.read_text(encoding="utf-8"))
MOVED = "database file was deleted or replaced"
_LOCKED = "database is locked by another process"
_REASONS = {  # primary SQLite result code -> why a write cannot be stored
    sqlite3.SQLITE_BUSY: _LOCKED,
    sqlite3.SQLITE_LOCKED: _LOCKED,
    sqlite3.SQLITE_PROTOCOL: _LOCKED,
    sqlite3.SQLITE_FULL: "database or disk is full",
    sqlite3.SQLITE_IOERR: "disk I/O error",
    sqlite3.SQLITE_READONLY: "database file is read-only",
    sqlite3.SQLITE_PERM: "database file is not writable",
    sqlite3.SQLITE_CANTOPEN: "database file cannot be opened",
    sqlite3.SQLITE_CORRUPT: "database file is corrupt",
    sqlite3.SQLITE_NOTADB: "database file is corrupt",
}


def storage_reason(exc: BaseException) -> str | None:
    """Why the storage failed, if `exc` is a storage failure (not a bug); else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else _REASONS.get(code & 0xFF)


def classify(exc: BaseException) -> Failure | None:
    """A storage failure as the outage sees it (None: a bug). The lock may free before a
    caller's own --db-timeout is up: the writer retries those callers."""
    reason = storage_reason(exc)
    return None if reason is None else Failure(reason, retry=reason == _LOCKED)


def _row_bytes(row: tuple[Any, ...]) -> int:
    """About what a task row weighs once serialized (its free-text fields dominate)."""
    return 200 + sum(len(v) for v in row[_TEXT] if isinstance(v, str))


CODEC = RowCodec(bools=True)  # sqlite3 gives a boolean column as 0/1
QUERIES = Queries()
_row_to_task = CODEC.task
_task_row = CODEC.row


def _connect_sync(conn: sqlite3.Connection, busy_ms: int = int(DB_TIMEOUT * 1000)) -> None:
    """Connection setup: WAL, a busy timeout, and durability that survives a process crash.

    No automatic checkpoint: it would run inside a COMMIT, on the loop's thread, with an
    fsync; `SqliteStore._committed` has the checkpoint thread run it instead."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: durable across process crashes
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    conn.execute("PRAGMA foreign_keys=ON")


def _waiting(conn: sqlite3.Connection, busy_ms: int, fn: Callable[..., Any], *args: Any
             ) -> Any:
    """Run `fn(conn, *args)` allowed to wait `busy_ms` for another process's lock. The
    writer connection's busy timeout is 0 otherwise: on the loop's thread it must never
    wait."""
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    try:
        return fn(conn, *args)
    finally:
        conn.execute("PRAGMA busy_timeout=0")


def _rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction. SQLite may already have rolled it back (SQLITE_FULL, an I/O
    error): a ROLLBACK then fails, and must not hide the error that caused it."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _probe(conn: sqlite3.Connection) -> None:
    """A write shaped like the real ones (fresh pages, a commit), leaving nothing behind."""
    _rollback(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT INTO settings VALUES ('probe', zeroblob(?)) ON CONFLICT(key)"
                     " DO UPDATE SET value = excluded.value", (PROBE_BYTES,))
        conn.execute("DELETE FROM settings WHERE key = 'probe'")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file without waiting on readers or the writer."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _select_task(conn: sqlite3.Connection, task_id: str) -> Task | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?",
                       (task_id,)).fetchone()
    return None if row is None else _row_to_task(row)


class _Txn:
    """One write transaction in progress, on the writer connection: the `model.TxnView`
    the rules run over.

    Tasks it reads or changes live in an overlay of the store's task cache (merged into the
    cache only after COMMIT, so a rollback leaves the cache true); event rows and the final
    row of each changed task are written in bulk (`executemany`) when the batch ends, or
    before a statement that must see them.
    """

    __slots__ = ("cache", "conn", "events", "keys", "overlay", "stored_status", "updates")

    def __init__(self, conn: sqlite3.Connection, cache: OrderedDict[str, Task]) -> None:
        self.conn = conn
        self.cache = cache
        self.overlay: dict[str, Task | None] = {}
        self.events: list[tuple[Any, ...]] = []
        self.updates: dict[str, tuple[Any, ...]] = {}
        self.keys: dict[tuple[str, str], tuple[int, str | None]] = {}
        self.stored_status: dict[str, str] = {}  # status in the file, for the UPDATE's form

    def load(self, task_id: str) -> Task | None:
        if task_id in self.overlay:
            return self.overlay[task_id]
        task = self.cache.get(task_id)
        if task is None:
            task = _select_task(self.conn, task_id)
        self.overlay[task_id] = task
        if task is not None:
            self.stored_status.setdefault(task_id, task.status)
        return task

    def applied_with_key(self, task_id: str, key: str) -> tuple[int, str | None] | None:
        """The seq and event digest of the change this idempotency key already made."""
        done = self.keys.get((task_id, key))
        if done is not None:
            return done
        row = self.conn.execute(
            "SELECT seq, idem_digest FROM events WHERE task_id = ? AND idem_key = ?",
            (task_id, key)).fetchone()
        return None if row is None else (int(row[0]), row[1])

    def changed(self, task: Task, now: str, key: str | None, digest: str | None = None
                ) -> None:
        task_id, seq, result = task.task_id, task.seq, dumps(task.result)
        self.overlay[task_id] = task
        self.events.append((seq, task_id, task.status, task.progress, task.message,
                            task.step, result, task.error, task.error_type, now, key,
                            digest))
        self.updates[task_id] = (*_changing_plain(task), result, task_id)
        if key is not None:
            self.keys[(task_id, key)] = (seq, digest)

    def active_count(self, user_id: int) -> int:
        self.flush()  # the count must see the batch so far
        (count,) = self.conn.execute(
            f"SELECT count(*) FROM tasks WHERE user_id = ? AND status IN {ACTIVE_SQL}",
            (user_id,),
        ).fetchone()
        return int(count)

    def created(self, task: Task, now: str) -> None:
        task_id, seq = task.task_id, task.seq
        self.flush()  # the INSERT lands after every row of the batch so far
        self.conn.execute(_INSERT_SQL, _task_row(task))
        self.overlay[task_id] = task
        self.stored_status[task_id] = "pending"
        self.events.append((seq, task_id, "pending", 0, None, None, None, None, None, now,
                            None, None))

    def deleted(self, task: Task, seq: int, now: str) -> None:
        task_id = task.task_id
        if self.keys:  # its keys go with its history: a task registered again starts afresh
            self.keys = {k: v for k, v in self.keys.items() if k[0] != task_id}
        self.flush()  # no pending row of this task may land after its deletion
        conn = self.conn
        conn.execute("DELETE FROM events WHERE task_id = ?", (task_id,))
        conn.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
        conn.execute(
            "INSERT INTO tombstones (seq, task_id, user_id, deleted_at) VALUES (?, ?, ?, ?)",
            (seq, task_id, task.user_id, now),
        )
        self.overlay[task_id] = None

    def flush(self) -> None:
        if self.events:
            self.conn.executemany(
                "INSERT INTO events (seq, task_id, status, progress, message, step, result,"
                " error, error_type, timestamp, idem_key, idem_digest)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                self.events)
            self.events = []
        if self.updates:
            same, other = [], []
            for task_id, row in self.updates.items():
                (same if row[0] == self.stored_status.get(task_id) else other).append(row)
                self.stored_status[task_id] = row[0]
            if other:
                self.conn.executemany(_UPDATE_SQL, other)
            if same:  # status unchanged: leaving it out of SET spares the status indexes
                self.conn.executemany(_UPDATE_SAME_STATUS_SQL, [row[1:] for row in same])
            self.updates = {}

    def publish_to_cache(self) -> None:
        cache = self.cache
        for task_id, task in self.overlay.items():
            if task is None:
                cache.pop(task_id, None)
            else:
                cache[task_id] = task
                cache.move_to_end(task_id)
        while len(cache) > TASK_CACHE_SIZE:
            cache.popitem(last=False)


class SqliteStore(SqlStore):
    """The `store.Store` over one SQLite file; also the writer's `BatchCommitter`."""

    def __init__(self, path: str, *, timeout: float = DB_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout  # seconds a write may wait for another process's lock
        self._db: aiosqlite.Connection | None = None  # reads
        self._wconn: sqlite3.Connection | None = None  # writes, one at a time (_write_lock)
        # the writer's thread for large batches, deletes and sweeps: not aiosqlite's, so a
        # write waiting on another process's lock never holds up a read
        self._wthread: ThreadPoolExecutor | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self.outage = Outage(path, lambda: self.timeout, self._refused_so_far,
                             probe=self._probe)
        self._write_lock = asyncio.Lock()
        self._ops_since_checkpoint = 0
        self._commits_since_checkpoint = 0
        # checkpoints on a thread and connection of their own: a large write batch or a
        # snapshot read on aiosqlite's thread never waits behind one
        self._checkpointer: ThreadPoolExecutor | None = None
        self._cconn: sqlite3.Connection | None = None
        self._checkpoint_due: asyncio.TimerHandle | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self.epoch = ""
        self.listeners = Listeners()
        self.feed = LocalFeed(self.listeners)  # last_seq, horizon
        self.nodes = SingleNode()
        self.codec = CODEC
        self.q = QUERIES
        self._lock_handle: IO[str] | None = None
        # tasks as last committed; changed only by the writer, after COMMIT
        self._cache: OrderedDict[str, Task] = OrderedDict()
        self._page_requests: list[
            tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._page_reader: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def open(self, *, exclusive: bool = True) -> None:
        """Open (creating from schema.sql). `exclusive`: refuse a database another taskpush
        process is serving, before touching anything in it (see `_lock`)."""
        if exclusive:
            self._lock()
        # check_same_thread=False: large batches are written on the writer's thread, always
        # one at a time (`_write_lock`)
        self._wconn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._wthread = ThreadPoolExecutor(1, thread_name_prefix="taskpush-writer")
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        schema = SCHEMA_PATH.read_text(encoding="utf-8")
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._wthread, _waiting, self._wconn, self._busy_ms, self._txn_open, schema)
        except sqlite3.Error as exc:
            await self.close()
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise StoreCorrupt(f"{self.path} is corrupt or not a taskpush database ({exc});"
                                   " restore it from a backup (docs/operations.md)") from None
            raise StoreRefused(f"cannot open {self.path}: {exc}") from None
        except StoreRefused:
            await self.close()
            raise
        await self._call(_connect_sync, self._busy_ms)
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="taskpush-checkpoint")
        self._cconn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._cconn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        self._start_writer()

    def _lock(self) -> None:
        """An advisory lock on `<db>.lock`, held while the process lives: a second server
        started on the same file must not, say, mark the first one's jobs interrupted."""
        lock_path = self.path + ".lock"
        handle = open(lock_path, "a+")  # noqa: SIM115 (held open until close())
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreLocked(f"{self.path} is in use by another taskpush process") from None
        self._lock_handle = handle

    @property
    def _busy_ms(self) -> int:
        return int(self.timeout * 1000)

    async def close(self) -> None:
        """Finish queued writes, then close the connection."""
        if self._writer is not None:
            await self._writer.close()  # a late submit() raises instead of waiting forever
        await self.outage.close()
        if self._checkpoint_due is not None:
            self._checkpoint_due.cancel()
            self._checkpoint_due = None
        if self._checkpointing is not None:
            await self._checkpointing
        if self._checkpoint_due is not None:  # set again by the checkpoint that just ended
            self._checkpoint_due.cancel()
            self._checkpoint_due = None
        if self._checkpointer is not None and self._cconn is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._run_checkpoint()
            self._checkpointer.shutdown()
            self._cconn.close()
            self._checkpointer = self._cconn = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._wthread is not None:
            self._wthread.shutdown()
            self._wthread = None
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None
        if self._lock_handle is not None:
            self._lock_handle.close()  # releases the flock
            self._lock_handle = None

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(sqlite3_connection, *args)` on aiosqlite's worker thread, in one hop.

        aiosqlite exposes no public way to run a function on its thread; `_execute` is the
        primitive its own methods are built on (stable since 0.17).
        """
        if self._db is None:
            raise RuntimeError("store is not open")
        conn = self._db
        try:
            return await conn._execute(lambda: fn(conn._conn, *args))
        except sqlite3.Error as exc:
            failure = classify(exc)
            if failure is None:
                raise
            # a read that fails begins no outage: writes say whether the storage is down
            raise StorageUnavailable(f"storage unavailable: {failure.reason}",
                                     self.outage.retry_after) from exc

    async def _call_writer(self, fn: Callable[..., Any], *args: Any,
                           lock_wait: float | None = None, proves_recovery: bool = True) -> Any:
        """Run `fn(writer_connection, *args)` on the writer's thread, alone among writes,
        waiting up to `lock_wait` s (default: the store's timeout) for another process's lock. A
        storage failure raises StorageUnavailable (and begins an outage). A write that needs
        no fresh pages (a purge) passes `proves_recovery=False`: its commit says nothing
        about a full disk, so it must not end an outage (health would flap)."""
        if self._wthread is None or self._wconn is None:
            raise RuntimeError("store is not open")
        wconn, thread = self._wconn, self._wthread
        busy_ms = self._busy_ms if lock_wait is None else max(0, int(lock_wait * 1000))
        async with self._write_lock:
            self._check_file()
            job = asyncio.get_running_loop().run_in_executor(thread, _waiting, wconn, busy_ms,
                                                             fn, *args)
            try:
                result = await asyncio.shield(job)
            except asyncio.CancelledError:
                # the function runs on in the writer's thread: the lock is held until it
                # ends, or a write on the loop's thread would share its transaction
                await asyncio.wait([job])
                raise
            except sqlite3.Error as exc:
                self._raise_failed(exc)
        if proves_recovery:
            self.outage.recovered()
        return result

    # ---- storage outages -------------------------------------------------------------

    def _moved(self) -> bool:
        """The path no longer names the file we opened (deleted, or replaced by another)."""
        if self._identity is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._identity

    def _check_file(self) -> None:
        """Before a commit: never acknowledge a write into a file nobody will open again."""
        if self._moved():
            raise self.outage.error(Failure(MOVED))

    def _raise_failed(self, exc: sqlite3.Error) -> NoReturn:
        """A failed write's callers get StorageUnavailable for a storage failure (which
        begins an outage), the error itself for anything else (a bug)."""
        failure = classify(exc)
        if failure is None:
            raise exc
        raise self.outage.error(failure) from exc

    def unavailable(self) -> str | None:
        """Why writes are refused now ("storage unavailable: ..."), or None. For /healthz:
        one stat, never waits on the writer."""
        if self.outage.reason is None and self._moved():
            self.outage.error(Failure(MOVED))
        return self.outage.unavailable()

    async def _probe(self) -> None:
        """A small write while an outage lasts (`Outage`): health recovers by itself when
        the lock or the disk frees, even if no producer writes meanwhile."""
        if self._wthread is not None:
            await self._call_writer(_probe, lock_wait=0)

    def _txn_open(self, conn: sqlite3.Connection, schema: str) -> None:
        _connect_sync(conn, self._busy_ms)
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            detail = "; ".join(line for row in problems for line in str(row).splitlines()
                               if not line.startswith("***"))
            raise StoreCorrupt(f"{self.path} is corrupt (PRAGMA quick_check: {detail[:300]});"
                               " restore it from a backup (docs/operations.md)")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreRefused(f"{self.path} has schema version {version}, newer than this"
                               f" taskpush knows ({SCHEMA_VERSION}): upgrade taskpush")
        conn.executescript(schema)
        if "idem_digest" not in {row[1] for row in conn.execute("PRAGMA table_info(events)")}:
            # a file written before digests were kept: its keys replay as they did
            conn.execute("ALTER TABLE events ADD COLUMN idem_digest TEXT")
        settings = dict(conn.execute("SELECT key, value FROM settings").fetchall())
        if "epoch" not in settings:
            settings["epoch"] = uuid.uuid4().hex
            conn.execute("INSERT INTO settings VALUES ('epoch', ?)", (settings["epoch"],))
        self.epoch = settings["epoch"]
        self.horizon = int(settings.get("horizon", 0))
        top = conn.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM events), 0),"
            " coalesce((SELECT max(seq) FROM tombstones), 0))"
        ).fetchone()[0]
        # every seq ever issued is at most an event's, a tombstone's (above its task's
        # events) or the horizon (the newest purged tombstone): no counter to keep
        self.last_seq = max(int(top), self.horizon)

    async def _write_then_read(self, write: str, params: Sequence[Any], read: str) -> Any:
        def run(conn: sqlite3.Connection) -> Any:
            conn.execute(write, tuple(params))
            return conn.execute(read).fetchone()[0]

        return await self._call_writer(run)

    # ---- writes ----------------------------------------------------------------------

    async def commit(self, ops: list[Operation], deadline: float) -> Committed:
        """Apply and commit one batch, or raise (rolled back). Small batches on the loop's
        thread, never waiting for a lock; large ones, deletes (a task's history may be long)
        and batches that met a lock held elsewhere on the writer's thread, waiting for the
        lock until `deadline` at most."""
        applied: list[Outcome] | None = None
        if (len(ops) <= INLINE_MAX_OPS and not self._write_lock.locked()
                and Delete not in map(type, ops)):
            self._check_file()
            assert self._wconn is not None
            try:
                applied = self._txn_apply(self._wconn, ops, False)
            except sqlite3.Error as exc:
                self._raise_failed(exc)
            if applied is not None:
                self.outage.recovered()
        if applied is None:  # large, a delete, or the file's write lock is held elsewhere
            wait = deadline - asyncio.get_running_loop().time()
            applied = await self._call_writer(
                self._txn_apply, ops, lock_wait=max(0.0, wait),
                proves_recovery=not all(type(op) is Delete for op in ops))  # deletes free pages
        assert applied is not None
        self._committed(len(ops))
        return Committed(applied)

    def _committed(self, ops: int) -> None:
        """Schedule a WAL checkpoint: soon after a burst, at the latest CHECKPOINT_EVERY_S."""
        self._ops_since_checkpoint += ops
        self._commits_since_checkpoint += 1
        if (self._ops_since_checkpoint >= CHECKPOINT_EVERY_OPS
                or self._commits_since_checkpoint >= CHECKPOINT_EVERY_COMMITS):
            self._start_checkpoint()
        elif self._checkpoint_due is None:
            self._checkpoint_due = asyncio.get_running_loop().call_later(
                CHECKPOINT_EVERY_S, self._on_checkpoint_timer)

    def _on_checkpoint_timer(self) -> None:
        self._checkpoint_due = None  # fired: a commit from now on may arm the next one
        self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        if self._checkpointing is not None or self._checkpointer is None:
            return  # the running one will be followed by a timer if more was written
        if self._checkpoint_due is not None:
            self._checkpoint_due.cancel()
            self._checkpoint_due = None
        self._ops_since_checkpoint = self._commits_since_checkpoint = 0
        self._checkpointing = asyncio.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            await self._run_checkpoint()
        except Exception:
            log.exception("WAL checkpoint failed")
        finally:
            self._checkpointing = None
        if (self._ops_since_checkpoint and self._checkpoint_due is None
                and self._checkpointer is not None):
            self._checkpoint_due = asyncio.get_running_loop().call_later(
                CHECKPOINT_EVERY_S, self._on_checkpoint_timer)

    async def _run_checkpoint(self) -> None:
        assert self._checkpointer is not None and self._cconn is not None
        await asyncio.get_running_loop().run_in_executor(self._checkpointer, _checkpoint,
                                                         self._cconn)

    def _txn_apply(self, conn: sqlite3.Connection, ops: list[Operation], wait: bool = True
                   ) -> list[Outcome] | None:
        """One transaction for the whole batch; each operation applied or refused alone.

        `wait=False` (on the loop's thread, where the writer connection's busy timeout is
        0): None at once if another process holds the write lock (a sqlite3 shell,
        `run.py token`); the caller retries on the writer's thread, where `_call_writer`
        lets it wait out the rest of --db-timeout without stalling any socket."""
        _rollback(conn)  # a transaction a failed COMMIT may have left open
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not wait and exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return None
            raise
        txn = _Txn(conn, self._cache)
        try:
            outcomes, seq = apply_all(txn, ops, self.last_seq)
            txn.flush()
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        txn.publish_to_cache()
        self.last_seq = seq
        return outcomes

    # ---- reads -----------------------------------------------------------------------

    async def get_task(self, task_id: str) -> Task | None:
        task = self._cache.get(task_id)  # committed state, like a read
        return task if task is not None else await self._call(_select_task, task_id)

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        def read(conn: sqlite3.Connection) -> list[Any]:
            return conn.execute(sql, tuple(params)).fetchall()

        return list(await self._call(read))

    async def _tasks(self, sql: str, params: Sequence[Any]) -> list[Task]:
        def read(conn: sqlite3.Connection) -> list[Task]:  # converted on the reads' thread
            return [_row_to_task(row) for row in conn.execute(sql, tuple(params))]

        return list(await self._call(read))

    async def active_page(self, user_id: int, after: int, max_bytes: int
                          ) -> tuple[list[Task], int | None]:
        """The user's active tasks with created_seq above `after`, in created_seq order
        (a cursor no change moves, so no task is read twice), as many as fit in about
        `max_bytes` (at least one); and the cursor for the next page, None at the end."""
        return await self._read_page(self._active_page, user_id, after, max_bytes)

    async def changes_page(self, user_id: int, after: int, upto: int, max_bytes: int
                           ) -> tuple[list[Task | tuple[str, int]], int | None] | None:
        """The user's tasks and tombstones with seq in (after, upto], in seq order, about
        `max_bytes` of them; and the cursor for the next page (None at the end). None if
        the history after `after` is no longer kept (resync)."""
        return await self._read_page(self._changes_page, user_id, after, upto, max_bytes)

    async def _read_page(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Concurrent page reads (a reconnect storm) share one thread hop."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._page_requests.append((fn, args, future))
        if self._page_reader is None:
            self._page_reader = asyncio.create_task(self._read_pages())
        return await future

    async def _read_pages(self) -> None:
        try:
            while self._page_requests:
                batch, self._page_requests = self._page_requests, []
                try:
                    pages = await self._call(self._txn_pages, [(fn, args) for fn, args, _ in batch])
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), page in zip(batch, pages, strict=True):
                    if not future.done():
                        future.set_result(page)
        finally:
            self._page_reader = None

    @staticmethod
    def _txn_pages(conn: sqlite3.Connection,
                   requests: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
        conn.execute("BEGIN")
        try:
            return [fn(conn, *args) for fn, args in requests]
        finally:
            conn.execute("COMMIT")

    @staticmethod
    def _fill(rows: Iterable[Any], max_bytes: int, size: Callable[[Any], int]) -> list[Any]:
        """Rows from a cursor until about `max_bytes` are taken (at least one row)."""
        taken: list[Any] = []
        total = 0
        for row in rows:
            taken.append(row)
            total += size(row)
            if total >= max_bytes:
                break
        return taken

    def _active_page(self, conn: sqlite3.Connection, user_id: int, after: int,
                     max_bytes: int) -> tuple[list[Task], int | None]:
        cursor = conn.execute(
            f"SELECT {COLUMNS} FROM tasks WHERE user_id = ?"
            f" AND status IN {ACTIVE_SQL} AND created_seq > ? ORDER BY created_seq",
            (user_id, after),
        )
        try:
            rows = self._fill(cursor, max_bytes, _row_bytes)
            more = cursor.fetchone() is not None
        finally:
            cursor.close()
        tasks = [_row_to_task(row) for row in rows]
        return tasks, (tasks[-1].created_seq if more else None)

    def _changes_page(self, conn: sqlite3.Connection, user_id: int, after: int, upto: int,
                      max_bytes: int) -> tuple[list[Task | tuple[str, int]], int | None] | None:
        if after < self.horizon:
            return None
        cursor = conn.execute(
            f"SELECT {COLUMNS} FROM tasks WHERE user_id = ? AND seq > ? AND seq <= ?"
            " ORDER BY seq",
            (user_id, after, upto),
        )
        try:
            rows = self._fill(cursor, max_bytes, _row_bytes)
            more = cursor.fetchone() is not None
        finally:
            cursor.close()
        deleted = conn.execute(QUERIES.tombstones,
                               (user_id, after, page_top(rows, more, upto), PAGE_ROWS)
                               ).fetchall()
        return CODEC.merge_tombstones(rows, more, upto, deleted)

    async def purge_tombstones(self, deleted_before: str) -> int:
        """Forget old tombstones; a `since` older than the newest forgotten one must resync."""

        def purge(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (top,) = conn.execute(QUERIES.purge_top, (deleted_before,)).fetchone()
                if top is None:
                    conn.execute("COMMIT")
                    return 0
                cursor = conn.execute(QUERIES.purge, (top,))
                conn.execute(
                    "INSERT INTO settings VALUES ('horizon', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(top),),
                )
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            self.horizon = max(self.horizon, int(top))
            return cursor.rowcount

        return await self._call_writer(purge, proves_recovery=False)
