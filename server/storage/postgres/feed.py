"""The cluster feed: how the changes of every node reach this node's listeners, in seq
order, through one path (`Listeners.publish`).

After its own commit a node first hands over any earlier seqs other nodes committed (the
write statement returns them; else read from `feed`), then its batch. On a NOTIFY (only a
wake-up, never the data), at start, after the listening connection comes back and every
second, it reads `feed` after the last seq it delivered (`last_seq`). seqs are contiguous
and a later seq is never visible before an earlier one, so a node never skips a change; a
lost notification only delays it, and a gap the feed no longer holds (a node away for
longer than it is kept) closes the sockets so that clients resume (`on_feed_lost`). The
sweep leader's purge of tombstones notifies `horizon <seq>`: every node then answers a
`since` below it with resync."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from ...core import jsonutil
from ...core.errors import StorageUnavailable
from ...core.model import Kind, Publication, Task
from ..api import Listeners
from ..writer import Committed

log = logging.getLogger(__name__)

FEED_PAGE = 1000  # feed rows read (and handed to on_publish) at once

Run = Callable[..., Awaitable[Any]]  # fn(connection, *args) on a pooled connection


def publication(seq: int, kind: str, text: str) -> Publication:
    """A feed row: a change another node committed."""
    return Publication(seq, Kind(kind), Task(**jsonutil.loads(text)))


class ClusterFeed:
    """The `api.Feed` of a PostgreSQL node. `run` is the store's bounded call on a pooled
    connection; `active()` says whether the store is open (not closing)."""

    def __init__(self, listeners: Listeners, run: Run, *, node: str, timeout: float,
                 active: Callable[[], bool]) -> None:
        self.listeners = listeners
        self.node = node
        self.timeout = timeout
        self.last_seq = 0  # the highest seq handed to on_publish
        self.horizon = 0
        self._run = run
        self._active = active
        self._lock = asyncio.Lock()
        self._catching_up: asyncio.Task[None] | None = None
        self._again = False

    # ---- wake-ups ---------------------------------------------------------------------

    def notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        """A wake-up: another node committed up to that seq (or purged tombstones up to
        the new horizon). Our own commits are ours to deliver (`published`): reading them
        back here would cost a read per commit."""
        seq, _, node = payload.partition(" ")
        if seq == "horizon":  # another node's sweep forgot tombstones up to that seq
            with contextlib.suppress(ValueError):
                self.horizon = max(self.horizon, int(node))
            return
        if node == self.node:
            return
        try:
            announced = int(seq)
        except ValueError:
            announced = self.last_seq + 1
        if announced > self.last_seq:
            self.request_catch_up()

    async def on_connected(self, conn: asyncpg.Connection, starting: bool) -> None:
        """A new listening connection: a purge announced while this node was not
        listening moved the horizon."""
        if not starting:
            self.horizon = max(self.horizon, int(await conn.fetchval(
                "SELECT coalesce((SELECT value FROM settings WHERE key = 'horizon'), '0')")))

    # ---- reading the feed ---------------------------------------------------------------

    def request_catch_up(self) -> None:
        if not self._active():
            return
        if self._catching_up is not None:
            self._again = True
            return
        self._catching_up = asyncio.get_running_loop().create_task(
            self._catch_up_loop(), name="taskpush-pg-catch-up")

    async def _catch_up_loop(self) -> None:
        try:
            again = True
            while again:
                self._again = False
                try:
                    async with self._lock:
                        await self._catch_up_locked()
                except StorageUnavailable:
                    return  # the outage is logged; the timer tries again
                except Exception:
                    log.exception("reading the cluster feed failed")
                    return
                again = self._again
        finally:
            self._catching_up = None

    async def _catch_up_locked(self, upto: int | None = None) -> None:
        """Hand every committed change after `last_seq` (up to `upto`) to on_publish, in
        seq order, by pages. Called with the feed lock held."""
        while upto is None or self.last_seq < upto:
            after = self.last_seq
            rows = await self._run(self._read, after, upto)
            if not rows:
                return
            first = rows[0][0]
            if first != after + 1 or rows[-1][0] != first + len(rows) - 1:
                self._lost(after, first)
            self.last_seq = rows[-1][0]
            self.listeners.publish([publication(*row) for row in rows], False)

    @staticmethod
    async def _read(conn: asyncpg.Connection, after: int, upto: int | None) -> list[Any]:
        if upto is None:
            return await conn.fetch("SELECT seq, kind, task FROM feed WHERE seq > $1"
                                    " ORDER BY seq LIMIT $2", after, FEED_PAGE)
        return await conn.fetch("SELECT seq, kind, task FROM feed WHERE seq > $1"
                                " AND seq <= $2 ORDER BY seq LIMIT $3", after, upto, FEED_PAGE)

    async def catch_up(self, seq: int) -> None:
        """Deliver every change up to `seq` now (a client resuming here from a seq another
        node sent it); a database that cannot answer leaves it to the timer."""
        if seq <= self.last_seq or not self._active():
            return
        with contextlib.suppress(StorageUnavailable, TimeoutError):
            async with asyncio.timeout(self.timeout), self._lock:
                await self._catch_up_locked(upto=seq)

    def _lost(self, after: int, kept: int) -> None:
        """The feed no longer holds changes this node has not delivered (it was away for
        longer than the feed is kept): its sockets must resume from the database."""
        log.error("cluster feed: changes after seq %d are no longer kept (next kept: %d);"
                  " sockets are closed so that clients resume", after, kept)
        self.listeners.feed_lost()

    # ---- this node's commits ----------------------------------------------------------------

    def published(self, committed: Committed, seconds: float) -> Awaitable[None] | None:
        """After this node's commit: its changes go to on_publish after every earlier seq
        (committed by another node, not yet delivered here), then on_commit."""
        if not self._lock.locked() and self._fill_gap(committed):
            self._publish_local(committed)
            self.listeners.committed(committed.outcomes, seconds)
            return None
        return self._published_in_order(committed, seconds)

    def _fill_gap(self, committed: Committed) -> bool:
        """Deliver the changes committed before this batch (seq up to `prev`) from the rows
        the write statement returned; False if they do not cover them (read the feed)."""
        delivered, prev, gap = self.last_seq, committed.prev, committed.before
        if prev <= delivered:
            return True
        if gap is None or delivered < committed.seen:
            return False
        rows = [row for row in gap if row[0] > delivered]
        if not rows or rows[0][0] != delivered + 1 or rows[-1][0] != prev:
            return False
        self.last_seq = prev
        self.listeners.publish([publication(*row) for row in rows], False)
        return True

    async def _published_in_order(self, committed: Committed, seconds: float) -> None:
        prev = committed.prev
        async with self._lock:
            try:
                if not self._fill_gap(committed):
                    await self._catch_up_locked(upto=prev)
                    if self.last_seq < prev:  # committed before this batch, yet not kept
                        self._lost(self.last_seq, prev + 1)
                        self.last_seq = prev
            except StorageUnavailable:
                pass  # this batch waits for the gap: a catch-up delivers both, in order
            else:
                self._publish_local(committed)
        self.listeners.committed(committed.outcomes, seconds)

    def _publish_local(self, committed: Committed) -> None:
        delivered, outcomes = self.last_seq, committed.outcomes
        if committed.last <= delivered:  # a catch-up got there first (or nothing committed)
            return
        if any(o.seq is not None and o.news and o.seq <= delivered for o in outcomes):
            outcomes = [o for o in outcomes if not (o.news and o.seq is not None
                                                    and o.seq <= delivered)]
        self.last_seq = committed.last
        self.listeners.publish(outcomes, True)

    async def close(self) -> None:
        """Stop a catch-up in progress."""
        task, self._catching_up = self._catching_up, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
