"""The connect-time messages, written with backpressure: `connected`, `resync`,
`active_tasks` and (with `since`) the replay of `task_status` / `task_deleted`.

Nothing here is held whole. The store is read by pages of about PAGE_BYTES; each page is
serialized, written, and the writer drained (the peer has taken it) before the next page is
read. `active_tasks` stays ONE message however large: its JSON is produced page by page as
parts of one message (a WebSocket writes them as a fragmented message; an event stream
would write them as one `data:` line). Each connect first waits its turn (FIFO) for a grant
of two pages from a `ByteBudget` shared by every connect, keeps it for all its pages and
gives it back at the end, so the snapshot bytes in memory at once are bounded whatever the
number of connects (beyond it, connects wait their turn; see `write_snapshot` for why no
interleaving can deadlock).

The framing is the writer's business (`MessageWriter`), so the same sequence serves any
transport that can write a message, write a message in parts, and wait for its peer: a
WebSocket (`connection.FrameWriter`: a text frame, then continuation frames), or an event
stream (`event: active_tasks` and `data: ` before the first part, the parts as they come,
a blank line after the last; orjson writes no newline inside JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..storage.api import PAGE_BYTES, Store
from .messages import (
    Message,
    active_tasks_part,
    connected,
    error,
    simple,
    task_deleted,
    task_status,
)


class MessageWriter(Protocol):
    """Where the connect-time messages go (a WebSocket; an event stream)."""

    def message(self, message: Message) -> None:
        """Write one whole message; a replayed change (`task_status`, `task_deleted`)
        carries its seq, for a framing that lets its client resume from it."""

    def part(self, data: bytes, *, first: bool, last: bool) -> None:
        """Write a piece of one message (pieces of two messages never interleave)."""

    async def drain(self) -> None:
        """Return once the peer has taken most of what was written (raise if it is gone)."""


class ByteBudget:
    """Bytes that may be in flight at once, shared by every connect; FIFO waiters."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, amount: int) -> int:
        """Wait for `amount` bytes (a page larger than the whole budget goes alone); returns
        what was taken, to be given back with `release`."""
        amount = min(amount, self.total)
        if not self._waiters and self.used + amount <= self.total:
            self.used += amount
            return amount
        future = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(amount)  # granted just as it was cancelled
            else:
                with contextlib.suppress(ValueError):  # `_wake` may have dropped it already
                    self._waiters.remove(entry)
                self._wake()
            raise
        return amount

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        taken = await self.acquire(amount)
        try:
            yield
        finally:
            self.release(taken)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            amount, future = self._waiters.popleft()
            if future.cancelled():
                continue
            self.used += amount
            future.set_result(None)


_Page = tuple[list[Any], "int | None"]  # items, and the cursor of the next page (None: end)


class _Pages:
    """The pages of `read(cursor)`; with `ahead`, the next one is read while the caller
    writes and drains the current one (so a peer that reads fast is not kept waiting for
    the database). Takes nothing from the budget: the connect's grant covers its pages."""

    def __init__(self, read: Callable[[int], Awaitable[_Page]], cursor: int, *,
                 ahead: bool) -> None:
        self.read = read
        self.ahead = ahead
        self._cursor = cursor
        self._next: asyncio.Future[_Page] | None = None
        if ahead:
            self._start()

    def _start(self) -> None:
        self._next = asyncio.ensure_future(self.read(self._cursor))

    async def next(self) -> tuple[list[Any], bool]:
        """The next page's items and whether it is the last."""
        if self._next is None:
            self._start()
        assert self._next is not None
        items, cursor = await self._next
        self._next = None
        if cursor is not None:
            self._cursor = cursor
            if self.ahead:
                self._start()
        return items, cursor is None

    def close(self) -> None:
        pending, self._next = self._next, None
        if pending is not None:
            if not pending.done():
                pending.cancel()
            elif not pending.cancelled():
                pending.exception()  # retrieved: a read-ahead that failed is not an error


@dataclass(slots=True)
class Resume:
    """What the client asked to resume from, judged against the store: `since` None means
    no replay; `resync` that the client must drop its cache."""

    since: int | None
    resync: bool
    bad_since: bool


def judge_resume(store: Store, since: int | str | None, epoch: str | None) -> Resume:
    """`since` as parsed from the query (an int, "invalid" or None) and `epoch`."""
    bad = since == "invalid"
    value = since if isinstance(since, int) else None
    if value is not None and (
        (epoch and epoch != store.epoch) or value > store.last_seq or value < store.horizon
    ):
        return Resume(None, True, bad)
    return Resume(value, False, bad)


class HistorySwept(Exception):
    """The replay's history was swept while it was being written: resume again."""


async def write_snapshot(out: MessageWriter, store: Store, budget: ByteBudget, *,
                         user_id: int, connection_id: str, resume: Resume,
                         mark_sent: Callable[[str, int], bool],
                         page_bytes: int | None = None, what: str = "WebSocket connection",
                         node: str | None = None) -> None:
    """Write the connect-time sequence to `out`. `mark_sent(task_id, seq)` is called for
    every task state about to be written; it returns False when that task was already sent
    at a later seq (the older state is then skipped: per task a client never sees seq go
    back), and the caller's outbox drops the live updates it covers.

    Raises HistorySwept if the `since` replay can no longer be completed, and whatever
    `out.drain()` or a page read (StorageUnavailable) raises.

    The budget, as a resource-ordering problem: a connect takes from the ByteBudget ONCE,
    before its first page read, in one FIFO `acquire` of at most two pages (the page being
    written and the one read ahead; the whole budget when smaller), reuses that grant for
    every page of `active_tasks` and of the replay, and gives it back in `finally` on every
    exit (done, peer gone, 4408, cancelled, read error). Invariant: nothing that holds a
    grant ever waits for the budget (no hold-and-wait), and each snapshot holds at most one
    grant, so no cycle of waits can form: a waiting connect waits only for holders, and
    every holder finishes (or is closed by --send-timeout) without needing anyone else's
    bytes. The replay's first page is read only once the last `active_tasks` page has been
    read (never before: a task changed in between would otherwise be replayed at an older
    seq than the one `active_tasks` carried)."""
    page_bytes = page_bytes or PAGE_BYTES
    seq = store.last_seq  # read before any page: the pages hold at least everything up to it
    out.message(connected(connection_id, store.epoch, seq, what=what, node=node))
    if resume.resync:
        out.message(simple("resync"))

    async def read_changes(after: int) -> _Page:
        got = await store.changes_page(user_id, after, seq, page_bytes)
        if got is None:
            raise HistorySwept
        return got

    grant = await budget.acquire(2 * page_bytes)  # the connect's only wait for the budget
    ahead = grant >= 2 * page_bytes  # room for a page read ahead of the one being written
    active = changes = None
    try:
        active = _Pages(lambda after: store.active_page(user_id, after, page_bytes), 0,
                        ahead=ahead)
        count = 0
        first, last = True, False
        while not last:
            tasks, last = await active.next()
            tasks = [task for task in tasks if mark_sent(task.task_id, task.seq)]
            if last and resume.since is not None:
                # every active page is read: the replay's first page may be read now
                changes = _Pages(read_changes, resume.since, ahead=ahead)
            count += len(tasks)
            out.part(active_tasks_part(tasks, first=first,
                                                count=count if last else None),
                     first=first, last=last)
            first = False
            await out.drain()
        if resume.bad_since:
            out.message(error("invalid_since", "since must be a non-negative integer"))
        last = changes is None
        while not last:
            assert changes is not None
            items, last = await changes.next()
            for item in items:
                if not isinstance(item, tuple):  # a task (a tuple is a tombstone)
                    if mark_sent(item.task_id, item.seq):
                        out.message(task_status(item))
                else:
                    task_id, deleted_seq = item
                    if mark_sent(task_id, deleted_seq):
                        out.message(task_deleted(task_id, deleted_seq))
            await out.drain()
    finally:
        if active is not None:
            active.close()
        if changes is not None:
            changes.close()
        budget.release(grant)
