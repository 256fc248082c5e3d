"""The group-commit writer, for any engine.

`submit()` queues a caller's operations; one task takes everything queued at that moment
(up to `max_batch` operations), has the engine apply and commit it in ONE transaction,
hands the outcomes to the engine's `published()` (where updates are pushed, in seq order),
and only then answers each caller. So a write is durable before it is acknowledged or
pushed, and a burst of callers costs one commit.

A batch the engine cannot commit was rolled back; its callers get `StorageUnavailable`
(503), except, when the engine marks the failure `retry_until_deadline`, the callers whose
own deadline (`timeout` after they asked) is not up yet: they are tried again in the next
batch, after a pause (`RETRY_PAUSE`, less if a deadline comes sooner) in which the loop
serves everything else (health checks, reads, sockets) and the cause may go away. The
engine decides what is worth retrying: what may end by itself within seconds (a lock held
elsewhere, a lost or refused connection, a transaction conflict), not what will not (a
full disk, an I/O error, a file deleted or replaced, a read-only database): those are
answered 503 at once, long before --db-timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..core.errors import StorageUnavailable
from ..core.model import Operation, Outcome

log = logging.getLogger(__name__)

MAX_BATCH = 2000  # operations in one transaction, at most (a caller's batch is never split)
RETRY_MARGIN = 0.01  # seconds: a caller with less time left than this is answered at once
RETRY_PAUSE = 0.1  # seconds between tries of callers the engine said to retry, at most

# one caller's ops, its future, and the loop time by which it is answered
_Submission = tuple[Sequence[Operation], "asyncio.Future[list[Outcome]]", float]


@dataclass(frozen=True, slots=True)
class Committed:
    """What one batch's commit did, as `published` needs it: the outcomes, in the order
    of the operations; `prev`, the last seq before the batch; `last`, the batch's last seq
    (`prev` when it wrote nothing); `seen`, the seq this node had delivered when it wrote;
    `before`, the changes other nodes committed in (seen, prev] as the write read them
    (feed rows `(seq, kind, task JSON)`; None: more than it read). One node alone has no
    others: `seen` is `prev` and `before` empty."""

    outcomes: list[Outcome]
    prev: int = 0
    last: int = 0
    seen: int = 0
    before: Sequence[tuple[int, str, str]] | None = ()


class BatchCommitter(Protocol):
    """What the writer drives: one engine's transaction and its listeners."""

    async def commit(self, ops: list[Operation], deadline: float) -> Committed:
        """Apply `ops` in one transaction (each through `model.apply_op`) and commit, or
        raise (rolled back). `deadline` is the loop time the oldest caller is answered by.
        A `StorageUnavailable` with `retry_until_deadline = True` lets callers with time
        left be tried again instead of answered 503 at once."""
        ...

    def published(self, committed: Committed, seconds: float) -> Awaitable[None] | None:
        """Right after the commit, before any caller is answered: hand the changes to the
        listeners in seq order. May return an awaitable the writer waits for."""
        ...


class GroupWriter:
    def __init__(self, committer: BatchCommitter, timeout: float,
                 max_batch: int = MAX_BATCH) -> None:
        self.committer = committer
        self.timeout = timeout  # seconds a caller waits at most for its commit
        self.max_batch = max_batch
        self.refused = 0  # callers answered StorageUnavailable so far (the engine's outage log)
        self._queue: asyncio.Queue[_Submission] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="taskpush-writer")

    async def close(self) -> None:
        """Finish the queued writes, then stop; a later submit() raises."""
        if self._task is not None and self._queue is not None:
            await self._queue.join()
            self._queue = None
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, op: Operation) -> Outcome:
        """Apply one operation durably; returns after its transaction has committed."""
        return (await self.submit_many((op,)))[0]

    async def submit_many(self, ops: Sequence[Operation]) -> list[Outcome]:
        """Apply operations, each on its own, all committed before this returns (one
        future for them all: a batch of 500 costs one wake-up, not 500)."""
        if self._queue is None:
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        self._queue.put_nowait((ops, future, loop.time() + self.timeout))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        committer = self.committer
        loop = asyncio.get_running_loop()
        waiting: list[_Submission] = []  # refused with retry_until_deadline, time left
        while True:
            batch = waiting or [await queue.get()]
            waiting = []
            ops = [op for item in batch for op in item[0]]
            while len(ops) < self.max_batch and not queue.empty():
                item = queue.get_nowait()
                batch.append(item)
                ops.extend(item[0])
            started = time.perf_counter()
            try:
                committed = await committer.commit(ops, min(item[2] for item in batch))
            except StorageUnavailable as exc:  # rolled back; the engine logs the outage
                now = loop.time()
                retry = exc.retry_until_deadline
                for item in batch:
                    if retry and item[2] - now > RETRY_MARGIN:
                        waiting.append(item)
                        continue
                    self.refused += 1
                    if not item[1].done():
                        item[1].set_exception(exc)
                    queue.task_done()
                if waiting:  # the loop's turn (an engine may fail without awaiting)
                    soonest = min(item[2] for item in waiting) - loop.time() - RETRY_MARGIN
                    await asyncio.sleep(max(0.0, min(RETRY_PAUSE, soonest)))
                continue
            except Exception as exc:  # a bug: the whole transaction rolled back
                log.exception("write transaction failed (%d operations)", len(ops))
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)
                    queue.task_done()
                continue
            elapsed = time.perf_counter() - started
            try:
                pending = committer.published(committed, elapsed)
                if pending is not None:
                    await pending
            except Exception:
                log.exception("commit listener failed")
            start = 0
            outcomes = committed.outcomes
            for item_ops, future, _ in batch:
                end = start + len(item_ops)
                if not future.done():
                    future.set_result(outcomes[start:end])
                start = end
                queue.task_done()
