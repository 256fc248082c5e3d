"""A PostgreSQL write batch: its view (`PgTxn`, the `model.TxnView` the rules run over:
everything they may ask is read before they run, `apply_batch`) and the one statement
that writes it (`write_batch`: arrays of table rows, unnested, with the feed rows and the
NOTIFY), in the database's own text (PostgreSQL text cannot hold U+0000)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import asyncpg
from msgspec.structs import asdict

from ...core import jsonutil
from ...core.model import ACTIVE, CHANGING_FIELDS, Change, Operation, Outcome, Register, Task
from ..rows import ACTIVE_SQL, COLUMNS, RowCodec, dumps
from ..sql import apply_all
from .feed import FEED_PAGE
from .listen import CHANNEL

# ---- text the database cannot hold -------------------------------------------------------
# PostgreSQL text cannot hold U+0000, which a message may carry: stored escaped (U+FFFF as
# the escape), restored on read. Other text is stored verbatim.
_ESC = "\uffff"
_UNESCAPE = re.compile("\uffff([01])")


def put(text: str | None) -> str | None:
    if text is None or ("\x00" not in text and _ESC not in text):
        return text
    return text.replace(_ESC, _ESC + "1").replace("\x00", _ESC + "0")


def get(text: str | None) -> str | None:
    if text is None or _ESC not in text:
        return text
    return _UNESCAPE.sub(lambda m: "\x00" if m.group(1) == "0" else _ESC, text)


def storable(text: str) -> bool:
    """Whether PostgreSQL can compare with `text` as it is (ids and keys are printable:
    one that is not names nothing stored)."""
    return "\x00" not in text


# the tasks table's columns are model.Task's fields, in order, then `node`
CODEC = RowCodec(text_in=put, text_out=get, float_progress=True)


def task_row(task: Task, node: str | None) -> tuple[Any, ...]:
    """A `tasks` row (model.Task's fields in order, then the node) for a task."""
    values = CODEC.row(task)
    values.append(node)
    return tuple(values)


def task_json(task: Task) -> str:
    """The task as a feed row carries it (every field, internal ones too)."""
    return jsonutil.dumps(asdict(task))


# ---- the transaction's view -----------------------------------------------------------------


class PgTxn:
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
            seq, task_id, task.status, float(task.progress), put(task.message),
            put(task.step), dumps(task.result), put(task.error), put(task.error_type),
            now, key, digest))
        self.feed.append((seq, "changed", task_json(task), None))
        if key is not None:
            self.keys[(task_id, key)] = (seq, digest)

    def created(self, task: Task, now: str) -> None:
        task_id, seq = task.task_id, task.seq
        self._moved(task.user_id, None, task.status)
        self.overlay[task_id] = task
        self.inserted.add(task_id)
        self.events.setdefault(task_id, []).append((
            seq, task_id, "pending", 0.0, None, None, None, None, None, now, None, None))
        self.feed.append((seq, "created", task_json(task), None))

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
        self.feed.append((seq, "deleted", task_json(task), None))

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
                inserts.append(task_row(task, node))
            else:
                updates.append(task_row(task, node))
        return events, inserts, updates


# ---- the batch: read what the rules need, run them, write it in one statement ---------------

PREDICT_IDS = 4000  # generated task ids read ahead of a batch, at most
MAX_PASSES = 5  # runs of a batch's rules (each after reading what the last one missed)

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


async def apply_batch(conn: asyncpg.Connection, ops: list[Operation], prev: int, node: str
                      ) -> tuple[list[Outcome], int, PgTxn]:
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
                    and storable(op.task_id) and storable(op.idem_key)):
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
    await _load(conn, list(ids | predicted), stored)
    if keys:
        for task_id, key, seq, digest in await conn.fetch(
                "SELECT e.task_id, e.idem_key, e.seq, e.idem_digest FROM events e JOIN"
                " unnest($1::text[], $2::text[]) k(task_id, idem_key)"
                " ON e.task_id = k.task_id AND e.idem_key = k.idem_key",
                [k[0] for k in keys], [k[1] for k in keys]):
            known_keys[(task_id, key)] = (seq, digest)
    if users:
        await _count(conn, users, counts)
    for _ in range(MAX_PASSES):
        view = PgTxn(stored, known_keys, counts, node)
        outcomes, seq = apply_all(view, ops, prev)
        if not view.misses:
            return outcomes, seq, view
        missed_users = {int(m[6:]) for m in view.misses if m.startswith("\x00user:")}
        missed_ids = [m for m in view.misses if not m.startswith("\x00user:")]
        stored.update(dict.fromkeys(missed_ids))
        await _load(conn, missed_ids, stored)
        if missed_users:
            await _count(conn, missed_users, counts)
    raise RuntimeError(f"the rules still asked for unread rows after {MAX_PASSES} passes")


async def _load(conn: asyncpg.Connection, ids: list[str],
                stored: dict[str, Task | None]) -> None:
    ids = [i for i in ids if storable(i)]  # others name no task (ids are printable)
    if ids:
        for row in await conn.fetch(f"SELECT {COLUMNS} FROM tasks"
                                    " WHERE task_id = ANY($1::text[])", ids):
            stored[row[0]] = CODEC.task(row)


async def _count(conn: asyncpg.Connection, users: Iterable[int],
                 counts: dict[int, int]) -> None:
    wanted = list(users)
    counts.update(dict.fromkeys(wanted, 0))
    for user_id, count in await conn.fetch(
            f"SELECT user_id, count(*) FROM tasks WHERE user_id = ANY($1::bigint[])"
            f" AND status IN {ACTIVE_SQL} GROUP BY user_id", wanted):
        counts[user_id] = count


async def write_batch(conn: asyncpg.Connection, view: PgTxn, last: int, after: int, prev: int,
                      node: str, notify: bool) -> list[Any] | None:
    """Write the batch; returns the feed rows in (after, prev] (None: more than a
    page of them, so not all)."""
    if view.purged:  # deleted tasks (and their history) go before any row is written
        purged = list(view.purged)
        await conn.execute("DELETE FROM events WHERE task_id = ANY($1::text[])", purged)
        await conn.execute("DELETE FROM tasks WHERE task_id = ANY($1::text[])", purged)
    events, inserts, updates = view.rows()
    rows = await conn.fetch(_WRITE_NOTIFY if notify else _WRITE_QUIET, events,
                            inserts, updates, view.tombstones, view.feed, last, node,
                            after, prev, FEED_PAGE)
    gap = [tuple(row) for row in rows if row[0] is not None]
    return None if len(gap) == FEED_PAGE else gap
