"""The per-connection outgoing buffer, sans I/O: a bounded queue of updates with its
coalescing rule (a task's progress updates merge, status changes and terminal states
never do) and the rule that a task's seq never goes back for the client."""

from __future__ import annotations

import dataclasses
import enum
from collections import OrderedDict

from .messages import Update


class Queued(enum.Enum):
    """What became of an update handed to the outbox; false only for OVERFLOW."""

    DROPPED = "dropped"  # nothing new for the client (it has, or will have, a newer state)
    QUEUED = "queued"
    MERGED = "merged"  # it replaced the queued update of its task (progress coalesced)
    OVERFLOW = "overflow"  # queued, and the queue is over its bound: the peer is too slow

    def __bool__(self) -> bool:
        return self is not Queued.OVERFLOW


DROPPED, QUEUED, MERGED, OVERFLOW = Queued


class Outbox:
    """A bounded per-connection queue of updates.

    While an update waits unsent, a newer update of the same task with the same
    non-terminal status replaces it (the latest wins, so progress is coalesced); a change of
    status, a terminal state and a deletion are always kept. `push()` says what it did
    (`Queued`), OVERFLOW (false) when the queue is over its bound even after merging: the
    connection is too slow and must go.

    "A task's seq never goes back" rests on one fact and one record. The fact: pushes (the
    hub's) come in seq order, so `_live`, the highest seq pushed, is a point every later
    push is above. The record: `_mark`, per task, the highest seq the client was sent or
    will be sent outside that order: by the snapshot (`mark_sent`), by a subscribe's read
    (`current`, `raise_floor`), and, while the snapshot or a read is in flight
    (`settled` False), by the queue itself. A push or a queued update at or below its
    task's mark is not sent. A mark is forgotten once pushes have reached it (nothing
    later can be at or below it), so a settled connection keeps no per-task state beyond
    its queue (`_latest` indexes the queue: its newest update per task, for coalescing).
    """

    __slots__ = ("_items", "_latest", "_live", "_mark", "_reads", "limit", "merged",
                 "replaying")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[int, Update] = OrderedDict()  # keyed by seq: send order
        self._latest: dict[str, int] = {}  # task_id -> seq of its newest queued update
        self._mark: dict[str, int] = {}  # task_id -> highest seq sent out of push order
        self._live = 0  # the highest seq pushed (pushes come in seq order)
        self._reads = 0  # reads of a task's current state in flight (subscribes)
        self.merged = 0
        self.replaying = True  # the snapshot is being written

    def __len__(self) -> int:
        return len(self._items)

    @property
    def settled(self) -> bool:
        """No snapshot and no read in flight: marks that pushes reached may go."""
        return not self.replaying and not self._reads

    def _settle(self) -> None:
        """Forget the marks pushes have reached, except those of queued tasks (whose
        older queued updates the mark still skips)."""
        live, latest = self._live, self._latest
        if self._mark:
            self._mark = {t: s for t, s in self._mark.items() if s > live or t in latest}

    # ---- states sent out of the push order -------------------------------------------

    def mark_sent(self, task_id: str, seq: int) -> bool:
        """The snapshot is about to send the task at `seq`. False (not recorded) when it
        was sent at a LATER seq: the caller skips that older state, so the client never
        sees the task go back. The same seq is True: the `since` replay repeats what
        `active_tasks` carried (SPEC: one `task_status` for every task changed after
        SEQ). A queued push of that very state is not sent again."""
        mark = self._mark.get(task_id)
        if mark is not None and seq < mark:
            return False
        self._mark[task_id] = seq
        if self._latest.get(task_id) == seq:
            del self._items[seq], self._latest[task_id]
        return True

    def end_replay(self) -> None:
        """The snapshot is sent. A node behind the database read its pages ahead of its
        pushes: the marks above `_live` stay until those pushes come (and are dropped)."""
        self.replaying = False
        if not self._reads:
            self._settle()

    def raise_floor(self, task_id: str, seq: int) -> None:
        """A task's state at `seq` went out of the push order (a subscribe read a commit
        whose push may still be on its way): its pushes at or below `seq` are dropped."""
        mark = self._mark.get(task_id)
        if mark is None or seq > mark:
            self._mark[task_id] = seq

    def reading(self) -> None:
        """A read of a task's current state begins (a subscribe): until it is done,
        what is sent is marked, so an older state read is not sent after a newer one."""
        self._reads += 1

    def read_done(self) -> None:
        if self._reads:
            self._reads -= 1
            if self.settled:
                self._settle()

    def current(self, update: Update) -> Queued:
        """A task's current state read out of the push order (a subscribe): queued even if
        it was sent before (a subscribe sends the state again), unless a newer state was
        sent or queued meanwhile; pushes of the task at or below it are then dropped. Its
        update is marked out of order (`in_order` False): it proves nothing about other
        tasks."""
        task_id, seq = update.task_id, update.seq
        mark = self._mark.get(task_id)
        if mark is not None and seq < mark:
            return DROPPED  # a newer state was sent while the task was read: it stands
        latest = self._latest.get(task_id)
        if latest is not None and seq <= latest:
            return DROPPED  # that state or a newer one is queued
        self._mark[task_id] = seq
        return self._queue(dataclasses.replace(update, in_order=False), latest)

    # ---- pushes, in seq order ----------------------------------------------------------

    def push(self, update: Update) -> Queued:
        task_id, seq = update.task_id, update.seq
        if seq > self._live:
            self._live = seq
        latest = self._latest.get(task_id)
        marks = self._mark
        if marks:
            mark = marks.get(task_id)
            if mark is not None:
                if seq < mark:
                    return DROPPED  # the client has (or will have) a newer state
                if latest is None and not (self.replaying or self._reads):
                    del marks[task_id]  # reached: every later push is above it
                if seq == mark:
                    return DROPPED
        if latest is not None and seq <= latest:
            return DROPPED  # a newer state of this task is already queued
        return self._queue(update, latest)

    def _queue(self, update: Update, latest: int | None) -> Queued:
        items = self._items
        done = QUEUED
        if latest is not None:
            prev = items.get(latest)
            if prev is not None and prev.mergeable and prev.status == update.status:
                del items[latest]
                self.merged += 1
                done = MERGED
        items[update.seq] = update
        self._latest[update.task_id] = update.seq
        return done if len(items) <= self.limit else OVERFLOW

    def pop(self) -> Update | None:
        items, latest, marks = self._items, self._latest, self._mark
        while items:
            seq, update = items.popitem(last=False)
            task_id = update.task_id
            if latest.get(task_id) == seq:
                del latest[task_id]
            if marks:
                mark = marks.get(task_id)
                if mark is not None and seq < mark:
                    # covered: the client has a newer state
                    if task_id not in latest and mark <= self._live and self.settled:
                        del marks[task_id]
                    continue
            if self.replaying or self._reads:
                marks[task_id] = seq
            return update
        return None
