"""The SQLite engine's transactions, each one plain function run in one go on one
connection (so no other coroutine's statements can interleave with it): the schema check
at open, a write batch over `SqliteTxn` (the `model.TxnView` the rules run over, on the
writer connection), the storage probe, and the snapshot's page reads."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any

from ...core.model import CHANGING_FIELDS, TASK_COLUMNS, TASK_TYPES, Operation, Outcome, Task
from ..api import PAGE_ROWS, StoreCorrupt, StoreRefused
from ..rows import ACTIVE_SQL, COLUMNS, RowCodec, dumps, page_top
from ..sql import Queries, apply_all
from .wal import connect_sync

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "schema.sql"
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


CODEC = RowCodec(bools=True)  # sqlite3 gives a boolean column as 0/1
QUERIES = Queries()


def _row_bytes(row: tuple[Any, ...]) -> int:
    """About what a task row weighs once serialized (its free-text fields dominate)."""
    return 200 + sum(len(v) for v in row[_TEXT] if isinstance(v, str))


def rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction. SQLite may already have rolled it back (SQLITE_FULL, an I/O
    error): a ROLLBACK then fails, and must not hide the error that caused it."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def probe(conn: sqlite3.Connection) -> None:
    """A write shaped like the real ones (fresh pages, a commit), leaving nothing behind."""
    rollback(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT INTO settings VALUES ('probe', zeroblob(?)) ON CONFLICT(key)"
                     " DO UPDATE SET value = excluded.value", (PROBE_BYTES,))
        conn.execute("DELETE FROM settings WHERE key = 'probe'")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def select_task(conn: sqlite3.Connection, task_id: str) -> Task | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?",
                       (task_id,)).fetchone()
    return None if row is None else CODEC.task(row)


class SqliteTxn:
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
            task = select_task(self.conn, task_id)
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
        self.conn.execute(_INSERT_SQL, CODEC.row(task))
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


def apply_batch(conn: sqlite3.Connection, ops: list[Operation], cache: OrderedDict[str, Task],
                seq: int, wait: bool = True) -> tuple[list[Outcome], int] | None:
    """One transaction for the whole batch; each operation applied or refused alone.

    `wait=False` (on the loop's thread, where the writer connection's busy timeout is
    0): None at once if another process holds the write lock (a sqlite3 shell,
    `run.py token`); the caller retries on the writer's thread, where `_call_writer`
    lets it wait out the rest of --db-timeout without stalling any socket."""
    rollback(conn)  # a transaction a failed COMMIT may have left open
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if not wait and exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return None
        raise
    txn = SqliteTxn(conn, cache)
    try:
        outcomes, seq = apply_all(txn, ops, seq)
        txn.flush()
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    txn.publish_to_cache()
    return outcomes, seq


def open_schema(conn: sqlite3.Connection, path: str, schema: str, busy_ms: int
                ) -> tuple[str, int, int]:
    """Check the file, apply the schema: (epoch, horizon, last seq)."""
    connect_sync(conn, busy_ms)
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        detail = "; ".join(line for row in problems for line in str(row).splitlines()
                           if not line.startswith("***"))
        raise StoreCorrupt(f"{path} is corrupt (PRAGMA quick_check: {detail[:300]});"
                           " restore it from a backup (docs/operations.md)")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreRefused(f"{path} has schema version {version}, newer than this"
                           f" taskpush knows ({SCHEMA_VERSION}): upgrade taskpush")
    conn.executescript(schema)
    if "idem_digest" not in {row[1] for row in conn.execute("PRAGMA table_info(events)")}:
        # a file written before digests were kept: its keys replay as they did
        conn.execute("ALTER TABLE events ADD COLUMN idem_digest TEXT")
    settings = dict(conn.execute("SELECT key, value FROM settings").fetchall())
    if "epoch" not in settings:
        settings["epoch"] = uuid.uuid4().hex
        conn.execute("INSERT INTO settings VALUES ('epoch', ?)", (settings["epoch"],))
    horizon = int(settings.get("horizon", 0))
    top = conn.execute(
        "SELECT max(coalesce((SELECT max(seq) FROM events), 0),"
        " coalesce((SELECT max(seq) FROM tombstones), 0))"
    ).fetchone()[0]
    # every seq ever issued is at most an event's, a tombstone's (above its task's
    # events) or the horizon (the newest purged tombstone): no counter to keep
    return settings["epoch"], horizon, max(int(top), horizon)


# ---- the snapshot's page reads -----------------------------------------------------------


def fill(rows: Iterable[Any], max_bytes: int, size: Callable[[Any], int]) -> list[Any]:
    """Rows from a cursor until about `max_bytes` are taken (at least one row)."""
    taken: list[Any] = []
    total = 0
    for row in rows:
        taken.append(row)
        total += size(row)
        if total >= max_bytes:
            break
    return taken


def _taken(cursor: sqlite3.Cursor, max_bytes: int) -> tuple[list[Any], bool]:
    """A page's rows from `cursor` (about `max_bytes`), and whether more follow."""
    try:
        rows = fill(cursor, max_bytes, _row_bytes)
        return rows, cursor.fetchone() is not None
    finally:
        cursor.close()


def active_page(conn: sqlite3.Connection, user_id: int, after: int, max_bytes: int
                ) -> tuple[list[Task], int | None]:
    cursor = conn.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE user_id = ?"
        f" AND status IN {ACTIVE_SQL} AND created_seq > ? ORDER BY created_seq",
        (user_id, after),
    )
    rows, more = _taken(cursor, max_bytes)
    tasks = [CODEC.task(row) for row in rows]
    return tasks, (tasks[-1].created_seq if more else None)


def changes_page(conn: sqlite3.Connection, horizon: int, user_id: int, after: int,
                 upto: int, max_bytes: int
                 ) -> tuple[list[Task | tuple[str, int]], int | None] | None:
    if after < horizon:
        return None
    cursor = conn.execute(
        f"SELECT {COLUMNS} FROM tasks WHERE user_id = ? AND seq > ? AND seq <= ?"
        " ORDER BY seq",
        (user_id, after, upto),
    )
    rows, more = _taken(cursor, max_bytes)
    deleted = conn.execute(QUERIES.tombstones,
                           (user_id, after, page_top(rows, more, upto), PAGE_ROWS)
                           ).fetchall()
    return CODEC.merge_tombstones(rows, more, upto, deleted)

