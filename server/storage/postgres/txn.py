"""A PostgreSQL write transaction's view (`PgTxn`, the `model.TxnView` the rules run
over: everything they may ask read before they run) and the rows it writes, in the
database's own text (PostgreSQL text cannot hold U+0000)."""

from __future__ import annotations

import re
from typing import Any

from msgspec.structs import asdict

from ...core import jsonutil
from ...core.model import ACTIVE, Task
from ..rows import RowCodec, dumps

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
    return (*CODEC.row(task), node)


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
