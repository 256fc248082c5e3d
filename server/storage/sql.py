"""What every SQL engine does the same way, written once: the statements both run
(`Queries`, written with `?` and numbered `$1..$n` for PostgreSQL), the rules' loop over
a batch (`apply_all`) and `SqlStore`, the base of `sqlite.store.SqliteStore` and
`postgres.store.PgStore`.

An engine supplies its connections, its transactions and what SQL truly differs (the hooks
at the end of `SqlStore`); this class gives it the listeners (`Listeners`), the feed that
hands commits to them (`Feed`: `local.LocalFeed` or `postgres.feed.ClusterFeed`), the
node registry that says who runs the cluster jobs (`Nodes`), submitting through the
group-commit writer, the outage state, and every read the two engines run alike."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..core.model import Operation, Outcome, Task, TxnView, apply_op, utc_now
from .api import CommitListener, Feed, Listeners, Nodes, PublishListener, WholeReads
from .outage import Outage
from .rows import ACTIVE_SQL, COLUMNS, HISTORY_COLUMNS, TERMINAL_SQL, RowCodec
from .writer import Committed, GroupWriter

_TASKS = f"SELECT {COLUMNS} FROM tasks"


def _numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1..$n` (the statements here quote no `?`)."""
    n = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(n)}", sql)


class Queries:
    """Every statement both engines run, built once per store."""

    def __init__(self, *, numbered: bool = False) -> None:
        sql: Callable[[str], str] = _numbered if numbered else str
        self.get_task = sql(f"{_TASKS} WHERE task_id = ?")
        # (by status, before a created_seq) -> a user's tasks, newest first
        self.list_tasks = {
            (by_status, by_before): sql(
                f"{_TASKS} WHERE user_id = ?" + (" AND status = ?" if by_status else "")
                + (" AND created_seq < ?" if by_before else "")
                + " ORDER BY created_seq DESC LIMIT ?")
            for by_status in (False, True) for by_before in (False, True)}
        self.changed_since = sql(f"{_TASKS} WHERE user_id = ? AND seq > ? ORDER BY seq LIMIT ?")
        self.active_before = sql(f"{_TASKS} WHERE status IN {ACTIVE_SQL}"
                                 " AND updated_at < ? ORDER BY updated_at LIMIT ?")
        self.active_by_origin = sql(f"{_TASKS} WHERE status IN {ACTIVE_SQL} AND origin = ?")
        self.finished_before = sql(f"{_TASKS} WHERE status IN {TERMINAL_SQL}"
                                   " AND updated_at < ? ORDER BY updated_at LIMIT ?")
        self.history = sql(f"SELECT {', '.join(HISTORY_COLUMNS)} FROM events"
                           " WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?")
        self.tombstones = sql("SELECT task_id, seq FROM tombstones WHERE user_id = ?"
                              " AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?")
        self.purge_top = sql("SELECT max(seq) FROM tombstones WHERE deleted_at < ?")
        self.purge = sql("DELETE FROM tombstones WHERE seq <= ?")
        self.demo_insert = sql("INSERT INTO settings VALUES ('demo_secret', ?)"
                               " ON CONFLICT (key) DO NOTHING")
        self.demo_select = "SELECT value FROM settings WHERE key = 'demo_secret'"


def apply_all(view: TxnView, ops: Sequence[Operation], seq: int
              ) -> tuple[list[Outcome], int]:
    """Each operation through the rules over one transaction's view, in order: the
    outcomes, and the last seq handed out (`seq` if none was)."""
    now = utc_now()
    outcomes: list[Outcome] = []
    append = outcomes.append
    for op in ops:
        outcome, seq = apply_op(view, op, seq, now)
        append(outcome)
    return outcomes, seq


class SqlStore(WholeReads):
    """The `api.Store` parts every engine shares; also the writer's `published`."""

    timeout: float
    epoch: str
    listeners: Listeners
    feed: Feed
    nodes: Nodes
    outage: Outage
    codec: RowCodec
    q: Queries
    _writer: GroupWriter | None = None

    # ---- writes -------------------------------------------------------------------------

    def _start_writer(self) -> None:
        self._writer = GroupWriter(self, self.timeout)  # type: ignore[arg-type]
        self._writer.start()

    async def submit(self, op: Operation) -> Outcome:
        """Apply one operation durably; returns after its transaction has committed."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        return await self._writer.submit(op)

    async def submit_many(self, ops: Sequence[Operation]) -> list[Outcome]:
        """Apply operations, each on its own, all committed before this returns."""
        if self._writer is None:
            raise RuntimeError("store is not open")
        return await self._writer.submit_many(ops)

    def _refused_so_far(self) -> int:
        """Callers answered 503 so far (the outage's log counts them)."""
        return 0 if self._writer is None else self._writer.refused

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

    # ---- reads ---------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> Task | None:
        if not self._storable(task_id):
            return None
        rows = await self._tasks(self.q.get_task, (task_id,))
        return rows[0] if rows else None

    async def list_tasks(self, user_id: int, *, status: str | None, limit: int,
                         before: int | None) -> list[Task]:
        """A user's tasks, newest (by creation) first; `before` is a created_seq cursor."""
        if status is not None and not self._storable(status):
            return []
        params: list[Any] = [user_id]
        if status is not None:
            params.append(status)
        if before is not None:
            params.append(before)
        params.append(limit)
        return await self._tasks(self.q.list_tasks[status is not None, before is not None],
                                 params)

    async def changed_since(self, user_id: int, since: int, limit: int) -> list[Task]:
        """A user's tasks whose latest change is after `since`, in seq order."""
        return await self._tasks(self.q.changed_since, (user_id, since, limit))

    async def history_page(self, task_id: str, after: int, limit: int
                           ) -> tuple[list[dict[str, Any]], int | None]:
        """Up to `limit` recorded changes of a task with seq above `after`, oldest first;
        and the seq to continue after, None when there are no more."""
        if not self._storable(task_id):
            return [], None
        return self.codec.history(await self._fetch(self.q.history, (task_id, after, limit + 1)),
                                  limit)

    async def active_before(self, updated_before: str, limit: int = 500) -> list[Task]:
        """Active tasks whose last change is older than the given time (stale candidates)."""
        return await self._tasks(self.q.active_before, (updated_before, limit))

    async def active_by_origin(self, origin: str) -> list[Task]:
        """Active tasks of this origin."""
        return await self._tasks(self.q.active_by_origin, (origin,))

    async def finished_before(self, updated_before: str, limit: int = 500) -> list[Task]:
        return await self._tasks(self.q.finished_before, (updated_before, limit))

    async def ping(self) -> bool:
        return bool((await self._fetch("SELECT 1", ()))[0][0] == 1)

    async def demo_secret(self) -> str:
        """The generated demo-mode secret, created once and kept (for every node), so
        tokens survive restarts."""
        return str(await self._write_then_read(self.q.demo_insert, (secrets.token_urlsafe(32),),
                                               self.q.demo_select))

    def unavailable(self) -> str | None:
        """Why writes are refused now ("storage unavailable: ..."), or None; never waits."""
        return self.outage.unavailable()

    # ---- what each dialect supplies --------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows of one read statement."""
        raise NotImplementedError

    async def _tasks(self, sql: str, params: Sequence[Any]) -> list[Task]:
        """The tasks of one read statement of whole task rows."""
        return self.codec.tasks(await self._fetch(sql, params))

    async def _write_then_read(self, write: str, params: Sequence[Any], read: str) -> Any:
        """Run `write`, then the first value of `read`, in one transaction that writes."""
        raise NotImplementedError

    def _storable(self, text: str) -> bool:
        """Whether the database can compare with `text` as it is (else it names nothing
        stored)."""
        return True
