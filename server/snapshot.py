"""The connect-time messages, written with backpressure: `connected`, `resync`,
`active_tasks` and (with `since`) the replay of `task_status` / `task_deleted`.

Nothing here is held whole. The store is read by pages of about PAGE_BYTES; each page is
serialized, written, and the writer drained (the peer has taken it) before the next page is
read. `active_tasks` stays ONE message however large: its JSON is produced page by page as
parts of one message (a WebSocket writes them as a fragmented message; an event stream
would write them as one `data:` line). Every page first takes its bytes from a `ByteBudget`
shared by every connect and gives them back once the peer has taken them, so the snapshot
bytes in memory at once are bounded whatever the number of connects (beyond it, connects
wait their turn).

The framing is the writer's business (`MessageWriter`), so the same sequence serves any
transport that can write a message, write a message in parts, and wait for its peer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from . import protocol
from .store import PAGE_BYTES, Store


class MessageWriter(Protocol):
    """Where the connect-time messages go (a WebSocket; an event stream)."""

    def message(self, text: str) -> None:
        """Write one whole message."""

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

    @contextlib.asynccontextmanager
    async def hold(self, amount: int) -> AsyncIterator[None]:
        amount = min(amount, self.total)  # a page larger than the whole budget goes alone
        if self._waiters or self.used + amount > self.total:
            future = asyncio.get_running_loop().create_future()
            entry = (amount, future)
            self._waiters.append(entry)
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self._release(amount)  # granted just as it was cancelled
                else:
                    self._waiters.remove(entry)
                    self._wake()
                raise
        else:
            self.used += amount
        try:
            yield
        finally:
            self._release(amount)

    def _release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            amount, future = self._waiters.popleft()
            if future.cancelled():
                continue
            self.used += amount
            future.set_result(None)


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
                         mark_sent: Callable[[str, int], None],
                         page_bytes: int | None = None) -> None:
    """Write the connect-time sequence to `out`; `mark_sent(task_id, seq)` is called for
    every task state written (the caller's outbox then drops live updates it covers).

    Raises HistorySwept if the `since` replay can no longer be completed, and whatever
    `out.drain()` raises when the peer goes away."""
    page_bytes = page_bytes or PAGE_BYTES
    seq = store.last_seq  # read before any page: the pages hold at least everything up to it
    out.message(protocol.connected(connection_id, store.epoch, seq))
    if resume.resync:
        out.message(protocol.simple("resync"))
    count = 0
    after: int | None = 0
    first = True
    while after is not None:
        async with budget.hold(page_bytes):
            tasks, after = await store.active_page(user_id, after, page_bytes)
            for task in tasks:
                mark_sent(task["task_id"], task["seq"])
            count += len(tasks)
            out.part(protocol.active_tasks_part(
                tasks, first=first, count=None if after is not None else count),
                first=first, last=after is None)
            first = False
            await out.drain()
    if resume.bad_since:
        out.message(protocol.error("invalid_since", "since must be a non-negative integer"))
    cursor = resume.since
    while cursor is not None:
        async with budget.hold(page_bytes):
            got = await store.changes_page(user_id, cursor, seq, page_bytes)
            if got is None:
                raise HistorySwept
            items, cursor = got
            for item in items:
                if isinstance(item, dict):
                    out.message(protocol.task_status(item))
                    mark_sent(item["task_id"], item["seq"])
                else:
                    task_id, deleted_seq = item
                    out.message(protocol.task_deleted(task_id))
                    mark_sent(task_id, deleted_seq)
            await out.drain()
