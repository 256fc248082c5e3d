"""What every SQL engine does the same way, written once: `SqlStore`, the base of
`sqlite.store.SqliteStore` and `postgres.store.PgStore`.

An engine supplies its connections, its transactions and what SQL truly differs; this
class gives it the listeners (`Listeners`), the feed that hands commits to them (`Feed`:
`local.LocalFeed` or the cluster's), the node registry that says who runs the cluster
jobs (`Nodes`), submitting through the group-commit writer and the whole reads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..core.model import Task
from .api import CommitListener, Feed, Listeners, Nodes, PublishListener, WholeReads
from .writer import Committed, WriterFront


class SqlStore(WholeReads, WriterFront):
    """The `api.Store` parts every engine shares; also the writer's `published`."""

    listeners: Listeners
    feed: Feed
    nodes: Nodes

    # ---- listeners (assigned by app.store_ctx, and by tests) -------------------------

    @property
    def on_publish(self) -> PublishListener | None:
        return self.listeners.on_publish

    @on_publish.setter
    def on_publish(self, listener: PublishListener | None) -> None:
        self.listeners.on_publish = listener

    @property
    def on_commit(self) -> CommitListener | None:
        return self.listeners.on_commit

    @on_commit.setter
    def on_commit(self, listener: CommitListener | None) -> None:
        self.listeners.on_commit = listener

    @property
    def on_feed_lost(self) -> Callable[[], None] | None:
        return self.listeners.on_feed_lost

    @on_feed_lost.setter
    def on_feed_lost(self, listener: Callable[[], None] | None) -> None:
        self.listeners.on_feed_lost = listener

    # ---- the feed and the nodes -------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The highest seq handed to on_publish (a `connected` snapshot's seq)."""
        return self.feed.last_seq

    @last_seq.setter
    def last_seq(self, seq: int) -> None:
        self.feed.last_seq = seq

    @property
    def horizon(self) -> int:
        """A `since` below this cannot be replayed (its tombstones purged)."""
        return self.feed.horizon

    @horizon.setter
    def horizon(self, seq: int) -> None:
        self.feed.horizon = seq

    def published(self, committed: Committed, seconds: float) -> Awaitable[None] | None:
        """The writer's `BatchCommitter.published`: the feed hands the batch over."""
        return self.feed.published(committed, seconds)

    async def catch_up(self, seq: int) -> None:
        """Deliver every change up to `seq` committed through any node (`api.Store`)."""
        await self.feed.catch_up(seq)

    async def lead(self, name: str) -> bool:
        """Whether this node runs the cluster-wide job `name` ("sweep") now."""
        return await self.nodes.lead(name)

    async def gone_nodes_tasks(self) -> list[Task]:
        """Active in-process tasks of nodes that stopped heartbeating (cluster only)."""
        return await self.nodes.gone_nodes_tasks()
