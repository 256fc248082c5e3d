"""The per-connection outgoing buffer, sans I/O: a bounded queue of updates with its
coalescing rule (a task's progress updates merge, status changes and terminal states
never do) and the rule that a task's seq never goes back for the client."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from .messages import Update

if TYPE_CHECKING:
    pass

class Outbox:
    """A bounded per-connection queue of updates.

    While an update waits unsent, a newer update of the same task with the same
    non-terminal status replaces it (the latest wins, so progress is coalesced); a change of
    status, a terminal state and a deletion are always kept. `push()` returns False when the
    queue is over its bound even after merging: the connection is too slow and must go.
    Updates at or below the seq a task was last sent with are dropped (no duplicates, no
    going back), which is what lets a connection attach to live updates before it reads its
    snapshot from the database.
    """

    __slots__ = ("_ahead", "_floor", "_items", "_latest", "_live", "_sent", "limit", "merged",
                 "replaying")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[int, Update] = OrderedDict()  # keyed by seq: send order
        self._latest: dict[str, int] = {}  # task_id -> seq of its newest queued update
        self._sent: dict[str, int] = {}  # task_id -> seq last sent (active tasks only)
        self._floor: dict[str, int] | None = None  # task_id -> seq already sent out of band
        self._live = 0  # the highest seq pushed (live updates come in seq order)
        self._ahead = 0  # the highest seq the snapshot sent that live updates had not reached
        self.merged = 0
        self.replaying = True

    def __len__(self) -> int:
        return len(self._items)

    def mark_sent(self, task_id: str, seq: int) -> bool:
        """Remember what was sent while the snapshot overlaps live updates; after that,
        updates arrive once each in seq order and nothing needs remembering. The highest seq
        is kept; False (nothing recorded) when the task was already sent at a LATER seq:
        the caller skips that older state, so the client never sees the task go back (and
        the live update of the later seq, covered, is not sent again). The same seq is
        True: the `since` replay repeats what `active_tasks` carried (SPEC: one
        `task_status` for every task changed after SEQ)."""
        if self.replaying:
            sent = self._sent.get(task_id)
            if sent is not None and seq < sent:
                return False
            self._sent[task_id] = seq
        elif self._sent:
            self._sent.pop(task_id, None)
        return True

    def end_replay(self) -> None:
        """The snapshot is sent: forget what it sent, except for queued tasks and states
        live updates have not reached yet (a node behind the database reads its pages
        ahead of its feed: those updates are still to come, and must not go out again)."""
        self.replaying = False
        live = self._live
        self._sent = {t: s for t, s in self._sent.items() if t in self._latest or s > live}
        self._ahead = max((s for s in self._sent.values() if s > live), default=0)

    def _reached(self) -> None:
        """Live updates have passed every state the snapshot sent ahead of them."""
        self._ahead = 0
        self._sent = {t: s for t, s in self._sent.items() if t in self._latest}

    def raise_floor(self, task_id: str, seq: int) -> None:
        """A task's state at `seq` went out of the usual order (a subscribe reads the task
        and may see a commit whose push is still on its way): later pushes of the task at
        or below `seq` are dropped, so the client never sees it go back."""
        if self._floor is None:
            self._floor = {}
        self._floor[task_id] = max(seq, self._floor.get(task_id, seq))

    def clear_floor(self, task_id: str) -> None:
        """The task's next push goes out even if its state was sent before (a subscribe
        sends the current state again)."""
        if self._floor:
            self._floor.pop(task_id, None)
        if self._sent and not self.replaying:
            self._sent.pop(task_id, None)

    def push(self, update: Update) -> bool:
        if update.seq > self._live:
            self._live = update.seq
        if self._floor:
            floor = self._floor.get(update.task_id)
            if floor is not None:
                if update.seq <= floor:
                    return True
                del self._floor[update.task_id]
        sent = self._sent.get(update.task_id)
        if sent is not None and update.seq <= sent:
            if self._ahead and update.seq >= self._ahead and not self.replaying:
                self._reached()
            return True
        prev_seq = self._latest.get(update.task_id)
        if prev_seq is not None:
            if update.seq <= prev_seq:  # a newer state of this task is already queued
                return True
            prev = self._items.get(prev_seq)
            if prev is not None and prev.mergeable and prev.status == update.status:
                del self._items[prev_seq]
                self.merged += 1
        self._items[update.seq] = update
        self._latest[update.task_id] = update.seq
        if self._ahead and update.seq >= self._ahead and not self.replaying:
            self._reached()
        return len(self._items) <= self.limit

    def pop(self) -> Update | None:
        while self._items:
            _, update = self._items.popitem(last=False)
            if self._latest.get(update.task_id) == update.seq:
                del self._latest[update.task_id]
            sent = self._sent.get(update.task_id)
            if sent is None or update.seq > sent:
                self.mark_sent(update.task_id, update.seq)
                return update
            if not self.replaying and update.task_id not in self._latest:
                del self._sent[update.task_id]
        return None
