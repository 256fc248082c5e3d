"""What the rest of the server sees of storage: the `Store` interface every engine
implements (SQLite: `sqlite/store.py`; PostgreSQL: `postgres/store.py`), the `Snapshot` it reads,
and the refusals an engine raises when it cannot start. `engines.make_store` picks one.

Every engine keeps the same promises: a change is committed before it is pushed or
acknowledged; `on_publish` sees every change this node must push, strictly in seq order;
`submit` answers `StorageUnavailable` (503) within `timeout` when the database cannot take
a write, and `unavailable()` says so for /healthz without waiting on anything.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..core.model import Operation, Outcome, Published, Task

if TYPE_CHECKING:
    from .writer import Committed

log = logging.getLogger(__name__)

PAGE_BYTES = 256 * 1024  # a page of a snapshot read: about this much task text
PAGE_ROWS = 2000  # tombstones in one page of a replay

# (changes, local): this node's outcomes (local=True), or changes another node committed
PublishListener = Callable[[Sequence[Published], bool], None]
# (outcomes, seconds the commit took): this node's own commits only
CommitListener = Callable[[list[Outcome], float], None]


class StoreRefused(RuntimeError):
    """The store cannot start on this database; the message says why in one line."""


class StoreLocked(StoreRefused):
    """The database file is being served by another taskpush process."""


class StoreCorrupt(StoreRefused):
    """The database file fails SQLite's integrity check."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A user's whole snapshot (`WholeReads.snapshot`, for tools and tests): the active
    tasks and, with `since`, every change after it, consistent with `seq`. Sockets read the
    same by pages (`active_page`, `changes_page`) and never hold it whole."""

    seq: int
    active: list[Task]
    # changed tasks, and (task_id, seq) for a deleted one; None: resync (no `since`, or one
    # below the horizon)
    changes: list[Task | tuple[str, int]] | None


class Store(Protocol):
    """The storage engine, as app, rest, ws, snapshot, sse, tasks and sweeper use it."""

    epoch: str  # changes when the database is new: a client's seq from another one is void
    last_seq: int  # the highest seq handed to on_publish (a `connected` snapshot's seq)
    horizon: int  # a `since` below this cannot be replayed (its tombstones purged)
    timeout: float  # seconds a write (or a read, for /healthz) may take before a 503
    on_publish: PublishListener | None
    on_commit: CommitListener | None
    # the feed lost changes this node had not delivered yet (cluster): sockets must resume
    on_feed_lost: Callable[[], None] | None

    async def open(self, *, exclusive: bool = True) -> None:
        """Connect, apply the schema, start the writer. `exclusive`: refuse a database
        another taskpush process serves (SQLite; a shared database ignores it)."""
        ...

    async def close(self) -> None:
        """Finish queued writes, then disconnect."""
        ...

    async def submit(self, op: Operation) -> Outcome: ...

    async def submit_many(self, ops: Sequence[Operation]) -> list[Outcome]: ...

    def unavailable(self) -> str | None:
        """Why writes are refused now ("storage unavailable: ..."), or None; never waits."""
        ...

    async def ping(self) -> bool: ...

    async def demo_secret(self) -> str: ...

    async def lead(self, name: str) -> bool:
        """Whether this node runs the cluster-wide job `name` ("sweep") now."""
        ...

    async def gone_nodes_tasks(self) -> list[Task]:
        """Active in-process tasks of nodes that stopped heartbeating (cluster only)."""
        ...

    async def catch_up(self, seq: int) -> None:
        """Deliver (on_publish) every change up to `seq` committed through any node, if the
        database lets it within `timeout`: a client resuming here from a seq another node
        sent it must not be told to resync because this node is a few ms behind."""
        ...

    async def get_task(self, task_id: str) -> Task | None: ...

    async def list_tasks(self, user_id: int, *, status: str | None, limit: int,
                         before: int | None) -> list[Task]: ...

    async def changed_since(self, user_id: int, since: int, limit: int) -> list[Task]: ...

    async def snapshot(self, user_id: int, since: int | None) -> Snapshot: ...

    async def active_page(self, user_id: int, after: int, max_bytes: int
                          ) -> tuple[list[Task], int | None]: ...

    async def changes_page(self, user_id: int, after: int, upto: int, max_bytes: int
                           ) -> tuple[list[Task | tuple[str, int]], int | None] | None: ...

    async def history_page(self, task_id: str, after: int, limit: int
                           ) -> tuple[list[dict[str, Any]], int | None]: ...

    async def history(self, task_id: str) -> list[dict[str, Any]]: ...

    async def active_before(self, updated_before: str, limit: int = 500) -> list[Task]: ...

    async def active_by_origin(self, origin: str) -> list[Task]:
        """Active tasks of this origin; "inprocess": only this node's."""
        ...

    async def finished_before(self, updated_before: str, limit: int = 500) -> list[Task]: ...

    async def purge_tombstones(self, deleted_before: str) -> int: ...


class Listeners:
    """A store's listeners, each called guarded (a listener that raises is logged, never
    stops the store): `on_publish` sees every change this node must push, in seq order,
    `on_commit` this node's own commits, `on_feed_lost` a gap the feed cannot fill."""

    __slots__ = ("on_commit", "on_feed_lost", "on_publish")

    def __init__(self) -> None:
        self.on_publish: PublishListener | None = None
        self.on_commit: CommitListener | None = None
        self.on_feed_lost: Callable[[], None] | None = None

    def publish(self, changes: Sequence[Published], local: bool) -> None:
        if self.on_publish is not None and changes:
            try:
                self.on_publish(changes, local)
            except Exception:
                log.exception("publish listener failed")

    def committed(self, outcomes: list[Outcome], seconds: float) -> None:
        if self.on_commit is not None:
            try:
                self.on_commit(outcomes, seconds)
            except Exception:
                log.exception("commit listener failed")

    def feed_lost(self) -> None:
        if self.on_feed_lost is not None:
            try:
                self.on_feed_lost()
            except Exception:
                log.exception("feed-lost listener failed")


class Feed(Protocol):
    """How committed changes reach `Listeners.publish`, one path for this node's and other
    nodes' changes: `local.LocalFeed` (one process owns the database) or
    `postgres.feed.ClusterFeed`."""

    last_seq: int  # the highest seq handed to on_publish
    horizon: int  # a `since` below this cannot be replayed

    def published(self, committed: Committed, seconds: float) -> Awaitable[None] | None:
        """After this node's commit, before its callers are answered (`BatchCommitter`)."""
        ...

    async def catch_up(self, seq: int) -> None: ...


class Nodes(Protocol):
    """Who runs the cluster-wide jobs: `local.SingleNode`, `postgres.nodes.ClusterNodes`."""

    async def lead(self, name: str) -> bool: ...

    async def gone_nodes_tasks(self) -> list[Task]: ...


class WholeReads:
    """What every engine derives from its page reads: a whole snapshot and a whole task
    history, for tools and tests. Sockets read page by page (`active_page`,
    `changes_page`), so that no snapshot is ever held whole."""

    async def snapshot(self: Store, user_id: int, since: int | None) -> Snapshot:
        """Active tasks and (with `since`) every change after it, all pages at once."""
        seq = self.last_seq
        active: list[Task] = []
        after: int | None = 0
        while after is not None:
            page, after = await self.active_page(user_id, after, PAGE_BYTES)
            active.extend(page)
        if since is None:
            return Snapshot(seq, active, None)
        changes: list[Task | tuple[str, int]] = []
        cursor: int | None = since
        while cursor is not None:
            got = await self.changes_page(user_id, cursor, seq, PAGE_BYTES)
            if got is None:
                return Snapshot(seq, active, None)
            items, cursor = got
            changes.extend(items)
        return Snapshot(seq, active, changes)

    async def history(self: Store, task_id: str) -> list[dict[str, Any]]:
        """Every recorded change of a task (all pages)."""
        events: list[dict[str, Any]] = []
        after: int | None = 0
        while after is not None:
            page, after = await self.history_page(task_id, after, 1000)
            events.extend(page)
        return events
