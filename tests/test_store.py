"""The SQLite engine (server/storage/sqlite/store.py) on its own: a real file under
tmp_path, no app, no sockets.

What only a SQLite file has: the schema (idempotent, re-runnable DDL), WAL, the statements it
actually runs answered from an index, where writes run (the loop's thread or the writer's),
background checkpoints, a write lock held by another process, a newer schema version, and
the --db setting choosing the engine. What every engine does (epoch, seq, the group-commit
writer, the rules, tombstones and the horizon) is tests/test_store_contract.py, run on both.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.core.model import Change, Delete, Register
from server.storage.sqlite.store import SCHEMA_PATH
from server.storage.sqlite.store import SqliteStore as Store
from tests.support import finished, ok


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    s = Store(str(db_path))
    await s.open()
    yield s
    await s.close()


async def reopen(store: Store) -> Store:
    await store.close()
    again = Store(store.path)
    await again.open()
    return again


def rows(path: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the file from a separate connection: only committed data is visible."""
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# ---- schema, WAL, epoch ----------------------------------------------------------------


async def test_schema_is_applied_idempotently(store: Store, db_path: Path) -> None:
    await ok(store, Register("t1", 1, "job", {"k": "v"}))
    store = await reopen(store)  # schema.sql runs again on an existing database
    try:
        task = await store.get_task("t1")
        assert task is not None and task.metadata == {"k": "v"}
        tables = {r[0] for r in rows(db_path, "SELECT name FROM sqlite_master"
                                              " WHERE type = 'table'")}
        assert {"tasks", "events", "tombstones", "settings"} <= tables
        # and the DDL itself is re-runnable on the same connection
        conn = sqlite3.connect(str(db_path))
        try:
            conn.executescript(SCHEMA_PATH.read_text(encoding="utf-8"))
            conn.executescript(SCHEMA_PATH.read_text(encoding="utf-8"))
        finally:
            conn.close()
        assert rows(db_path, "SELECT count(*) FROM tasks") == [(1,)]
    finally:
        await store.close()


async def test_wal_mode_is_on(store: Store, db_path: Path) -> None:
    assert rows(db_path, "PRAGMA journal_mode") == [("wal",)]


# ---- every per-user and per-task statement is answered from an index --------------------


async def _trace(store: Store, callback) -> None:
    """Trace (or with None, stop tracing) the statements of both connections."""
    await store._call(lambda conn: conn.set_trace_callback(callback))
    assert store._wconn is not None
    store._wconn.set_trace_callback(callback)


def _scans(conn: sqlite3.Connection, sql: str) -> list[str]:
    """The plan lines that read a whole table (or a whole index) instead of searching."""
    plan = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    return [row[-1] for row in plan if row[-1].startswith("SCAN")]


async def test_per_user_and_per_task_statements_use_an_index(store: Store,
                                                             db_path: Path) -> None:
    # some data, so every statement has something to find
    for n in range(3):
        await finished(store, f"f{n}", user_id=n + 1)
        await ok(store, Register(f"a{n}", n + 1, "job"))

    statements: list[str] = []

    await _trace(store, statements.append)
    # what users and producers do, per user and per task
    await ok(store, Register("p", 1, "job", max_active=10))   # existence + active count
    await ok(store, Register("p", 1, "job"))                  # idempotent repeat
    await ok(store, Change("p", "progress", progress=5))
    await ok(store, Change("p", "completed"))
    await ok(store, Delete("p", owner=1))                     # events + tasks + tombstone
    await store.get_task("a1")
    await store.history("a1")
    await store.list_tasks(1, status=None, limit=10, before=None)
    await store.list_tasks(1, status="pending", limit=10, before=5)
    await store.changed_since(1, 2, 100)
    await store.snapshot(1, None)
    await store.snapshot(1, 1)
    await _trace(store, None)

    reads = [s for s in statements
             if s.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE"))
             and any(t in s for t in ("tasks", "events", "tombstones"))]
    assert len(reads) >= 12, statements
    conn = sqlite3.connect(str(db_path))
    try:
        for sql in reads:
            assert _scans(conn, sql) == [], sql
    finally:
        conn.close()


async def test_sweeper_statements_do_not_scan_the_tasks_table(store: Store,
                                                              db_path: Path) -> None:
    """Global sweeps read only the active or finished subset through a partial index."""
    await finished(store, "f")
    await ok(store, Register("a", 1, "job"))
    statements: list[str] = []
    await _trace(store, statements.append)
    await store.active_before("9999-12-31T00:00:00.000Z")
    await store.finished_before("9999-12-31T00:00:00.000Z")
    await store.active_by_origin("inprocess")
    await _trace(store, None)
    reads = [s for s in statements if s.upper().startswith("SELECT")]
    assert len(reads) == 3
    conn = sqlite3.connect(str(db_path))
    try:
        for sql in reads:
            plan = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            details = [row[-1] for row in plan]
            assert not any(d.startswith("SCAN tasks") and "INDEX" not in d
                           for d in details), (sql, details)
    finally:
        conn.close()


# ---- where writes run, and checkpoints ------------------------------------------------------


def trace_writer_threads(store: Store) -> list[int]:
    """The threads on which the writer connection inserts events, in order (until
    `store._wconn.set_trace_callback(None)`)."""
    import threading

    writers: list[int] = []
    assert store._wconn is not None
    store._wconn.set_trace_callback(
        lambda sql: writers.append(threading.get_ident()) if sql.startswith("INSERT INTO events")
        else None)
    return writers


async def test_small_batches_are_written_on_the_loop_thread_large_ones_on_the_worker(
        store: Store, db_path: Path) -> None:
    """A small commit costs less than a thread hop; a large one must not stall the loop."""
    import threading

    from server.storage.sqlite import store as store_module

    await ok(store, Register("t", 1, "job"))
    writers = trace_writer_threads(store)
    await ok(store, Change("t", "progress", progress=1))
    big = store_module.INLINE_MAX_OPS + 1
    outcomes = await store.submit_many([Change("t", "progress", progress=n % 100)
                                        for n in range(big)])
    store._wconn.set_trace_callback(None)
    assert writers[0] == threading.get_ident()
    assert writers[1] != threading.get_ident()
    assert [o.seq for o in outcomes] == list(range(3, 3 + big))
    assert rows(db_path, "SELECT count(*) FROM events WHERE task_id = 't'") == [(big + 2,)]


async def test_commits_do_not_checkpoint_but_a_background_checkpoint_follows(
        store: Store, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from server.storage.sqlite import wal as wal_module

    assert store._wconn is not None
    assert store._wconn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    monkeypatch.setattr(wal_module, "CHECKPOINT_EVERY_S", 0.05)
    await ok(store, Register("in-main-file", 1, "job"))

    def main_file_has_task() -> bool:
        copy = tmp_path / "main-only.db"  # the database file without its WAL
        shutil.copyfile(db_path, copy)
        conn = sqlite3.connect(f"file:{copy}?immutable=1", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM tasks WHERE task_id = 'in-main-file'"
                                ).fetchone() == (1,)
        except sqlite3.OperationalError:  # not even the schema has been copied yet
            return False
        finally:
            conn.close()

    deadline = asyncio.get_running_loop().time() + 10
    while not main_file_has_task():
        assert asyncio.get_running_loop().time() < deadline, "no checkpoint within 10 s"
        await asyncio.sleep(0.02)


async def test_a_sweep_and_a_large_batch_share_the_writer_safely(store: Store) -> None:
    from server.storage.sqlite import store as store_module

    await ok(store, Register("t", 1, "job"))
    big = [Change("t", "progress", progress=n % 100)
           for n in range(store_module.INLINE_MAX_OPS * 3)]
    results = await asyncio.gather(
        store.submit_many(big),
        store.purge_tombstones("9999-12-31T00:00:00.000Z"),
        store.submit(Change("t", "progress", progress=7)),
    )
    assert all(o.error is None for o in results[0]) and results[2].error is None
    assert (await store.get_task("t")).seq == store.last_seq


async def test_a_cancelled_worker_write_keeps_the_writer_to_itself(store: Store) -> None:
    """Found in review: cancelling a caller of the worker-thread write path released the
    write lock while its transaction still ran, and the next small batch, written on the
    loop's thread, then shared (and rolled back) that transaction."""
    import threading

    await ok(store, Register("t", 1, "job"))
    inside, release = threading.Event(), threading.Event()

    def sweep_like(conn: sqlite3.Connection) -> None:  # shaped like purge_tombstones
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("INSERT INTO settings VALUES ('review', '1') "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            inside.set()
            release.wait(5)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    loop = asyncio.get_running_loop()
    sweep = asyncio.create_task(store._call_writer(sweep_like))
    assert await loop.run_in_executor(None, inside.wait, 5)
    sweep.cancel()  # e.g. the sweeper cancelled at shutdown
    for _ in range(20):  # let the cancellation run its course (it must not free the writer)
        await asyncio.sleep(0)
    write = asyncio.create_task(store.submit(Change("t", "progress", progress=5)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not write.done()  # it waits for the sweep's transaction to end
    release.set()
    outcome = await asyncio.wait_for(write, 10)
    assert outcome.error is None
    with pytest.raises(asyncio.CancelledError):
        await sweep
    assert rows(store.path, "SELECT value FROM settings WHERE key = 'review'") == [("1",)]


async def test_the_checkpoint_timer_survives_firing_during_a_checkpoint(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a timer that fired while a checkpoint ran was left as 'due' forever,
    so no later commit armed another one."""
    import threading

    from server.storage.sqlite import wal as wal_module

    calls: list[int] = []
    first_running, first_may_end = threading.Event(), threading.Event()
    real = wal_module._checkpoint

    def slow_first(conn: sqlite3.Connection) -> None:
        calls.append(1)
        if len(calls) == 1:
            first_running.set()
            first_may_end.wait(5)
        real(conn)

    monkeypatch.setattr(wal_module, "_checkpoint", slow_first)
    monkeypatch.setattr(wal_module, "CHECKPOINT_EVERY_S", 0.01)
    loop = asyncio.get_running_loop()
    await ok(store, Register("t", 1, "job"))  # arms the timer; it starts checkpoint 1
    assert await loop.run_in_executor(None, first_running.wait, 5)
    await ok(store, Change("t", "progress", progress=2))  # arms a timer that fires meanwhile
    deadline = loop.time() + 5
    while store.wal.due is not None:  # fired (and found a checkpoint running)
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    first_may_end.set()
    while len(calls) < 2:  # the end of checkpoint 1 arms the next for the waiting commit
        assert loop.time() < deadline, "the commit of progress=2 is never checkpointed"
        await asyncio.sleep(0.01)


async def test_a_write_lock_held_by_another_process_does_not_stall_the_loop(
        store: Store, db_path: Path) -> None:
    """A small batch is tried on the loop's thread without waiting; when another process
    (a sqlite3 shell, `run.py token`) holds the write lock, it waits on the worker thread."""
    import threading

    await ok(store, Register("t", 1, "job"))
    writers = trace_writer_threads(store)
    other = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(store.submit(Change("t", "progress", progress=5)))
        for _ in range(5):
            await asyncio.sleep(0)  # the loop turns: nothing on it waits for the lock
        assert not write.done()
        other.execute("COMMIT")
        outcome = await asyncio.wait_for(write, 10)
    finally:
        other.close()
        store._wconn.set_trace_callback(None)
    assert outcome.error is None
    assert writers and writers[0] != threading.get_ident()  # written on the worker thread


# ---- schema version, engine choice -----------------------------------------------------


async def test_a_database_of_a_newer_schema_version_is_refused(store: Store,
                                                               db_path: Path) -> None:
    from server.storage.api import StoreRefused
    from server.storage.sqlite.store import SCHEMA_VERSION

    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    await store.close()
    conn = sqlite3.connect(str(db_path))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    newer = Store(str(db_path))
    with pytest.raises(StoreRefused) as refused:
        await newer.open()
    message = str(refused.value)
    assert "newer" in message and "\n" not in message
    assert rows(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]  # left as it was
    conn = sqlite3.connect(str(db_path))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.close()
    await store.open()  # the fixture closes it


def test_the_db_setting_picks_the_engine(tmp_path: Path) -> None:
    from server.storage.engines import make_store
    from server.storage.postgres.store import PgStore
    from server.storage.sqlite.store import SqliteStore

    assert isinstance(make_store(str(tmp_path / "x.db"), timeout=1), SqliteStore)
    for url in ("postgresql://u:pw@db.example/taskpush", "POSTGRES://u@db.example/t"):
        assert isinstance(make_store(url, timeout=1, node_name="n"), PgStore)


