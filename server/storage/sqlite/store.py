"""The SQLite engine: one process owns the file (an advisory lock on `<db>.lock`), so its
feed is local and it leads every job (`local`); the SQL both engines share is `sql.py`'s.

Two connections to one WAL database. Writes use a writer connection, reads aiosqlite's,
so a reader never sees a write half-done. A whole transaction is one plain function
(`txn.py`) run in one go, so no other coroutine's statements can interleave with it. A
third connection, on a thread of its own, only runs WAL checkpoints (`wal.py`).

Writes go through the group-commit writer (`writer.GroupWriter`), for which this store is
the `BatchCommitter`: each batch is applied (`model.apply_op` over `txn.SqliteTxn`) and
committed in ONE transaction, and the listeners see it (`published`) before any caller is
answered. A small batch is written on the event loop's thread: it costs less than the two
thread wake-ups of a hop (docs/performance.md); a large one, any delete (a task's history
may be long), and the sweeps, go to the writer's own thread so the loop keeps serving
meanwhile. That thread is not aiosqlite's: a write waiting for another process's lock
never holds up a read. No connection checkpoints on commit; the checkpoint thread does, in
the background (`wal.Checkpointer`).

A write that cannot commit (the lock held past `timeout`, disk full, I/O error, the file
deleted or replaced under us) is rolled back and its callers get `StorageUnavailable`; the
store's `outage.Outage` keeps that state (`unavailable()`, for /healthz), logs one line
when it begins and one when it ends, and probes in the background until a write commits
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, NoReturn

import aiosqlite

from ...core.errors import StorageUnavailable
from ...core.model import Delete, Operation, Outcome, Task
from ..api import Listeners, StoreCorrupt, StoreLocked, StoreRefused
from ..local import LocalFeed, SingleNode
from ..outage import Failure, Outage
from ..sql import SqlStore
from ..writer import Committed
from .txn import (
    CODEC,
    QUERIES,
    SCHEMA_PATH,
    active_page,
    apply_batch,
    changes_page,
    open_schema,
    probe,
    rollback,
)
from .txn import SCHEMA_VERSION as SCHEMA_VERSION  # what the file's user_version may be
from .txn import select_task as _select_task  # a module global: tests make it fail
from .wal import Checkpointer, connect_sync

log = logging.getLogger(__name__)

INLINE_MAX_OPS = 64  # batches up to this size are written on the loop's thread
DB_TIMEOUT = 5.0  # default seconds a write waits for another process's lock (--db-timeout)
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


class PageReads:
    """Page reads asked for meanwhile run together, in one read transaction, in one hop
    to the reads' thread (`run(requests)`: `SqliteStore._txn_pages`)."""

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self._run = run
        self._requests: list[tuple[Callable[..., Any], tuple[Any, ...],
                                   asyncio.Future[Any]]] = []
        self._reader: asyncio.Task[None] | None = None

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(connection, *args)`'s page."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._requests.append((fn, args, future))
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        return await future

    async def _read(self) -> None:
        try:
            while self._requests:
                batch, self._requests = self._requests, []
                try:
                    pages = await self._run([(fn, args) for fn, args, _ in batch])
                except Exception as exc:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), page in zip(batch, pages, strict=True):
                    if not future.done():
                        future.set_result(page)
        finally:
            self._reader = None


class SqliteStore(SqlStore):
    """The `api.Store` over one SQLite file; also the writer's `BatchCommitter`."""

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
        self.wal = Checkpointer()  # in the background, on a thread of its own
        self.epoch = ""
        self.listeners = Listeners()
        self.feed = LocalFeed(self.listeners)  # last_seq, horizon
        self.nodes = SingleNode()
        self.codec = CODEC
        self.q = QUERIES
        self._lock_handle: IO[str] | None = None
        # tasks as last committed; changed only by the writer, after COMMIT
        self._cache: OrderedDict[str, Task] = OrderedDict()
        # concurrent page reads (a reconnect storm) share one thread hop
        self._pages = PageReads(lambda requests: self._call(self._txn_pages, requests))

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
        await self._call(connect_sync, self._busy_ms)
        self.wal.open(self.path, self._busy_ms)
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
        await self.wal.close()
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
            await self._call_writer(probe, lock_wait=0)

    def _txn_open(self, conn: sqlite3.Connection, schema: str) -> None:
        self.epoch, self.horizon, self.last_seq = open_schema(conn, self.path, schema,
                                                              self._busy_ms)

    def _txn_apply(self, conn: sqlite3.Connection, ops: list[Operation], wait: bool = True
                   ) -> list[Outcome] | None:
        """One transaction for the whole batch (`txn.apply_batch`); None at once if
        `wait` is False and another process holds the write lock."""
        done = apply_batch(conn, ops, self._cache, self.last_seq, wait)
        if done is None:
            return None
        outcomes, self.last_seq = done
        return outcomes

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
        self.wal.committed(len(ops))
        return Committed(applied)

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
            return CODEC.tasks(conn.execute(sql, tuple(params)))

        return list(await self._call(read))

    def _changes_page(self, conn: sqlite3.Connection, *args: Any) -> Any:
        return changes_page(conn, self.horizon, *args)  # the horizon when the read runs

    async def active_page(self, user_id: int, after: int, max_bytes: int
                          ) -> tuple[list[Task], int | None]:
        """The user's active tasks with created_seq above `after`, in created_seq order
        (a cursor no change moves, so no task is read twice), as many as fit in about
        `max_bytes` (at least one); and the cursor for the next page, None at the end."""
        return await self._pages.read(active_page, user_id, after, max_bytes)

    async def changes_page(self, user_id: int, after: int, upto: int, max_bytes: int
                           ) -> tuple[list[Task | tuple[str, int]], int | None] | None:
        """The user's tasks and tombstones with seq in (after, upto], in seq order, about
        `max_bytes` of them; and the cursor for the next page (None at the end). None if
        the history after `after` is no longer kept (resync)."""
        return await self._pages.read(self._changes_page, user_id, after, upto, max_bytes)

    @staticmethod
    def _txn_pages(conn: sqlite3.Connection,
                   requests: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
        conn.execute("BEGIN")
        try:
            return [fn(conn, *args) for fn, args in requests]
        finally:
            conn.execute("COMMIT")

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
                rollback(conn)
                raise
            self.horizon = max(self.horizon, int(top))
            return cursor.rowcount

        return await self._call_writer(purge, proves_recovery=False)
