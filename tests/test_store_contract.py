"""The Store contract: what every engine does, run on SQLite and on PostgreSQL alike
(conftest's `engine`), each checked against what another connection sees in the database.

The identity of a database (epoch) and its numbering (seq, strictly increasing across
restarts and deletions), the group-commit writer (one transaction per batch, each operation
applied or refused on its own, commit before the listeners and the answer), the rules
(terminal finality, idempotent/conflicting register, generated ids, the active-task quota,
conditional changes, delete of an active task), tombstones with their resume horizon, the
demo secret. What only one engine has stays apart: tests/test_store.py (the SQLite file:
schema, WAL, checkpoints, the writer's thread, the file lock) and tests/test_pg_store.py
(PostgreSQL: nodes, one seq across them, the feed, lost connections).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server.core.errors import Conflict, NotFound, TaskActive, TaskFinal, TooMany
from server.core.model import Change, Delete, Kind, Outcome, Register
from server.storage.api import Store
from server.storage.postgres.store import PgStore
from server.storage.sqlite.store import SqliteStore
from tests.engines import Engine
from tests.support import finished, ok


class Kit:
    """The engine under test: opens its stores, reads its database from another connection."""

    def __init__(self, engine: Engine, tmp_path: Path) -> None:
        self.engine = engine
        self.tmp_path = tmp_path
        self.db = engine.database() or str(tmp_path / "store.db")

    @property
    def postgres(self) -> bool:
        return self.engine.postgres

    def new(self, db: str | None = None, node: str = "n1") -> Any:
        db = self.db if db is None else db
        return PgStore(db, node_name=node) if self.postgres else SqliteStore(db)

    async def open(self, db: str | None = None, node: str = "n1") -> Any:
        store = self.new(db, node)
        await store.open()
        return store

    async def reopen(self, store: Store) -> Any:
        await store.close()
        return await self.open()

    def other_database(self) -> str:
        return self.engine.database() or str(self.tmp_path / "other.db")

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the database from a separate connection: only committed data is visible."""
        if self.postgres:
            conn = await asyncpg.connect(self.db)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def rows_now(self, sql: str) -> list[tuple[str, ...]]:
        """The same, synchronously (from inside a listener), every value as text."""
        return self.engine.query(self.db, sql)


@pytest.fixture
def kit(engine: Engine, tmp_path: Path) -> Kit:
    return Kit(engine, tmp_path)


@pytest.fixture
async def store(kit: Kit) -> AsyncIterator[Any]:
    s = await kit.open()
    yield s
    await s.close()


# ---- epoch, seq ------------------------------------------------------------------------


async def test_epoch_is_stable_across_reopen_and_differs_per_database(
        store: Store, kit: Kit) -> None:
    epoch = store.epoch
    assert epoch
    assert len(epoch) >= 16
    store = await kit.reopen(store)
    try:
        assert store.epoch == epoch
    finally:
        await store.close()
    other = await kit.open(kit.other_database())
    try:
        assert other.epoch and other.epoch != epoch
    finally:
        await other.close()


async def test_seq_strictly_increases_across_reopen_and_deletes(store: Store, kit: Kit) -> None:
    seqs = [(await ok(store, Register("a", 1, "job"))).seq]
    seqs.append((await ok(store, Change("a", "progress", progress=10))).seq)
    seqs.append((await ok(store, Change("a", "completed"))).seq)
    seqs.append((await ok(store, Delete("a"))).seq)  # the newest event row is gone now
    assert all(isinstance(s, int) for s in seqs) and seqs == sorted(set(seqs))
    assert seqs == list(range(1, 5))
    store = await kit.reopen(store)
    try:
        assert store.last_seq == seqs[-1]
        seqs.append((await ok(store, Register("b", 1, "job"))).seq)
        # forget the tombstones too: nothing in events/tombstones remembers the top seq
        await store.submit(Change("b", "completed"))
        seqs.append((await ok(store, Delete("b"))).seq)
        await store.purge_tombstones("9999-12-31T00:00:00.000Z")
    finally:
        await store.close()
    store = await kit.open()
    try:
        assert store.last_seq >= seqs[-1]
        seqs.append((await ok(store, Register("a", 1, "job"))).seq)  # same id, reused
        assert seqs == sorted(set(seqs)), seqs
        assert seqs[-1] > seqs[-2]
    finally:
        await store.close()


async def test_seq_per_task_row_is_that_of_its_latest_event(store: Store, kit: Kit) -> None:
    await ok(store, Register("t", 1, "job"))
    last = await ok(store, Change("t", "progress", progress=50, message="half"))
    assert await kit.rows("SELECT seq FROM tasks WHERE task_id = 't'") == [(last.seq,)]
    assert await kit.rows("SELECT max(seq) FROM events WHERE task_id = 't'") == [(last.seq,)]
    assert [e["status"] for e in await store.history("t")] == ["pending", "progress"]


# ---- the writer: one transaction per batch, each operation on its own ------------------


async def test_batch_is_one_transaction_with_per_operation_refusal(store: Store,
                                                                   kit: Kit) -> None:
    await ok(store, Register("good1", 1, "job"))
    await ok(store, Register("good2", 1, "job"))
    await finished(store, "done")
    commits: list[list[Outcome]] = []
    store.on_commit = lambda outcomes, seconds: commits.append(list(outcomes))
    before = store.last_seq
    events_before = (await kit.rows("SELECT count(*) FROM events"))[0][0]

    ops = [
        Change("good1", "progress", progress=30),
        Change("missing", "progress", progress=30),          # not found
        Change("done", "failed", error="late"),               # terminal: refused
        Register("good1", 2, "other"),                        # conflicting register
        Change("good2", "running", message="go"),
        Change("good1", "progress", progress=60, owner=2),    # another user's task
        Delete("good2"),                                      # active: refused
    ]
    outcomes = await store.submit_many(ops)

    assert len(commits) == 1 and len(commits[0]) == len(ops)  # one commit for the lot
    assert [o.ok for o in outcomes] == [True, False, False, False, True, False, False]
    assert isinstance(outcomes[1].error, NotFound)
    assert isinstance(outcomes[2].error, TaskFinal)
    assert isinstance(outcomes[3].error, Conflict)
    assert isinstance(outcomes[5].error, NotFound)
    assert isinstance(outcomes[6].error, TaskActive)
    assert outcomes[0].seq == before + 1 and outcomes[4].seq == before + 2
    assert store.last_seq == before + 2

    # what another connection sees in the database: exactly the two valid changes
    assert await kit.rows("SELECT count(*) FROM events") == [(events_before + 2,)]
    assert await kit.rows("SELECT status, progress FROM tasks WHERE task_id = 'good1'"
                          ) == [("progress", 30)]
    assert await kit.rows("SELECT status, message FROM tasks WHERE task_id = 'good2'"
                          ) == [("running", "go")]
    assert await kit.rows("SELECT status, error FROM tasks WHERE task_id = 'done'"
                          ) == [("completed", None)]
    assert await kit.rows("SELECT count(*) FROM tasks WHERE task_id = 'missing'") == [(0,)]
    assert await kit.rows("SELECT max(seq) FROM events") == [(before + 2,)]


async def test_concurrent_submits_are_grouped_and_all_durable(store: Store, kit: Kit) -> None:
    await ok(store, Register("g", 1, "job"))
    commits: list[int] = []
    store.on_commit = lambda outcomes, seconds: commits.append(len(outcomes))
    outcomes = await asyncio.gather(*(store.submit(Change("g", "progress", progress=i))
                                      for i in range(50)))
    assert all(o.ok for o in outcomes)
    assert sum(commits) == 50 and len(commits) < 50  # grouped into fewer transactions
    assert [o.seq for o in outcomes] == sorted(o.seq for o in outcomes)
    assert await kit.rows("SELECT count(*) FROM events WHERE task_id = 'g'") == [(51,)]


async def test_commit_happens_before_the_listeners_and_the_answer(store: Store,
                                                                  kit: Kit) -> None:
    await ok(store, Register("c", 1, "job"))
    seen: list[list[tuple[str, ...]]] = []

    def committed(*_: Any) -> None:  # what another connection sees, at that moment
        seen.append(kit.rows_now("SELECT status FROM tasks WHERE task_id = 'c'"))

    store.on_publish = committed
    store.on_commit = committed
    await ok(store, Change("c", "running"))
    assert seen == [[("running",)], [("running",)]]


# ---- rules -----------------------------------------------------------------------------


async def test_terminal_state_is_final(store: Store, kit: Kit) -> None:
    done = await finished(store, "t")
    for status in ("progress", "running", "failed", "cancelled", "completed", "pending"):
        outcome = await store.submit(Change("t", status, progress=5, message="late"))
        assert isinstance(outcome.error, TaskFinal), status
        assert outcome.error.status == 409
    task = await store.get_task("t")
    assert task is not None
    assert (task.status, task.progress, task.message, task.result, task.seq) \
        == ("completed", 100, None, {"n": 1}, done.seq)
    assert await kit.rows("SELECT count(*) FROM events WHERE task_id = 't'") == [(2,)]


async def test_cancelled_task_refusal_says_cancel_requested(store: Store) -> None:
    await ok(store, Register("t", 1, "job"))
    await ok(store, Change("t", "cancelled", owner=1, cancel_requested=True))
    outcome = await store.submit(Change("t", "progress", progress=50))
    assert isinstance(outcome.error, TaskFinal)
    assert outcome.error.extra == {"cancel_requested": True}


async def test_register_is_idempotent_and_conflicts_on_a_different_body(
        store: Store, kit: Kit) -> None:
    first = await ok(store, Register("r", 7, "job", {"a": [1, 2]}))
    assert first.kind is Kind.CREATED
    assert first.task is not None and first.task.status == "pending"
    seq = store.last_seq
    again = await ok(store, Register("r", 7, "job", {"a": [1, 2]}))
    assert again.kind is Kind.UNCHANGED and again.seq == first.seq and store.last_seq == seq
    assert await kit.rows("SELECT count(*) FROM events WHERE task_id = 'r'") == [(1,)]
    for different in (Register("r", 8, "job", {"a": [1, 2]}),
                      Register("r", 7, "other", {"a": [1, 2]}),
                      Register("r", 7, "job", {"a": [2, 1]}),
                      Register("r", 7, "job", None)):
        outcome = await store.submit(different)
        assert isinstance(outcome.error, Conflict), different
    assert store.last_seq == seq


async def test_register_without_id_names_the_task_after_its_type(store: Store) -> None:
    outcome = await ok(store, Register(None, 1, "export"))
    assert outcome.task is not None and outcome.task.task_id == f"export_{outcome.seq}"
    other = await ok(store, Register(None, 1, "export"))
    assert other.task is not None and other.task.task_id != outcome.task.task_id
    # the name it would get is taken: another is made up (the rules ran again, knowing)
    taken = f"export_{store.last_seq + 2}"
    await ok(store, Register(taken, 1, "export"))
    assert store.last_seq + 1 == int(taken.rsplit("_", 1)[1])
    many = await store.submit_many([Register(None, 1, "export") for _ in range(5)])
    names = [o.task.task_id for o in many if o.task is not None]
    assert all(o.ok for o in many) and len(set(names)) == 5 and taken not in names


async def test_active_task_limit(store: Store) -> None:
    await ok(store, Register("a1", 1, "job", max_active=2))
    await ok(store, Register("a2", 1, "job", max_active=2))
    refused = await store.submit(Register("a3", 1, "job", max_active=2))
    assert isinstance(refused.error, TooMany)
    await ok(store, Register("b1", 2, "job", max_active=2))  # per user
    await ok(store, Change("a1", "completed"))
    await ok(store, Register("a3", 1, "job", max_active=2))  # a finished one frees a slot
    # within one batch too: the count includes the batch so far
    many = await store.submit_many([Register(f"c{i}", 3, "job", max_active=2)
                                    for i in range(4)])
    assert [o.ok for o in many] == [True, True, False, False]


async def test_conditional_change_is_skipped_when_the_task_moved(store: Store) -> None:
    registered = await ok(store, Register("s", 1, "job"))
    await ok(store, Change("s", "progress", progress=10))
    seq = store.last_seq
    outcome = await store.submit(Change("s", "failed", error_type="stale",
                                        expect_seq=registered.seq))
    assert outcome.kind is Kind.REFUSED and not outcome.ok and outcome.error is None
    assert store.last_seq == seq
    task = await store.get_task("s")
    assert task is not None and task.status == "progress"


async def test_each_operation_reports_the_kind_of_what_it_did(store: Store) -> None:
    """The store decides the kind where it applies the operation (hub/metrics only read it)."""
    assert (await store.submit(Register("k", 1, "job"))).kind is Kind.CREATED
    assert (await store.submit(Register("k", 1, "job"))).kind is Kind.UNCHANGED
    assert (await store.submit(Register("k", 2, "job"))).kind is Kind.REFUSED
    first = await store.submit(Change("k", "progress", progress=5, idem_key="a"))
    assert first.kind is Kind.CHANGED
    again = await store.submit(Change("k", "progress", progress=5, idem_key="a"))
    assert again.kind is Kind.UNCHANGED and again.seq == first.seq
    assert (await store.submit(Change("k", "failed", expect_seq=1))).kind is Kind.REFUSED
    assert (await store.submit(Change("nope", "running"))).kind is Kind.REFUSED
    await store.submit(Change("k", "completed"))
    assert (await store.submit(Delete("k"))).kind is Kind.DELETED


async def test_delete_needs_a_finished_task_of_the_owner(store: Store, kit: Kit) -> None:
    await ok(store, Register("act", 1, "job"))
    assert isinstance((await store.submit(Delete("act"))).error, TaskActive)
    assert isinstance((await store.submit(Delete("nope"))).error, NotFound)
    await finished(store, "fin", user_id=1)
    assert isinstance((await store.submit(Delete("fin", owner=2))).error, NotFound)
    deleted = await ok(store, Delete("fin", owner=1))
    assert deleted.kind is Kind.DELETED
    assert await store.get_task("fin") is None
    assert await kit.rows("SELECT count(*) FROM events WHERE task_id = 'fin'") == [(0,)]
    assert await kit.rows("SELECT seq, task_id, user_id FROM tombstones"
                          ) == [(deleted.seq, "fin", 1)]
    forced = await ok(store, Delete("act", allow_active=True))
    assert forced.kind is Kind.DELETED and await store.get_task("act") is None


async def test_an_idempotency_key_is_forgotten_with_its_deleted_task_within_one_batch(
        store: Store) -> None:
    """Deleted and registered again in one batch, a task starts afresh: a change with a key
    the deleted task had used is applied, as it would be in a batch of its own; also when
    the key was committed by an earlier batch (read from the database)."""
    outcomes = await store.submit_many([
        Register("again", 1, "t"), Change("again", "running", idem_key="k"),
        Delete("again", allow_active=True), Register("again", 1, "t"),
        Change("again", "running", idem_key="k")])
    assert outcomes[-1].kind is Kind.CHANGED
    assert outcomes[-1].seq == outcomes[-2].seq + 1
    assert (await store.get_task("again")).status == "running"

    await store.submit_many([Register("later", 1, "t"), Change("later", "running",
                                                               idem_key="old")])
    outcomes = await store.submit_many([
        Change("later", "progress", idem_key="k"), Delete("later", allow_active=True),
        Register("later", 1, "t"), Change("later", "running", idem_key="k"),
        Change("later", "progress", idem_key="old")])
    assert [o.kind for o in outcomes[-2:]] == [Kind.CHANGED, Kind.CHANGED]
    assert (await store.get_task("later")).status == "progress"


# ---- tombstones and the resume horizon --------------------------------------------------


async def test_snapshot_reports_deletions_after_since_in_seq_order(store: Store) -> None:
    await finished(store, "old", user_id=1)
    since = store.last_seq
    await ok(store, Register("live", 1, "job"))
    gone = await ok(store, Delete("old"))
    await ok(store, Change("live", "progress", progress=20))
    await ok(store, Register("theirs", 2, "job"))

    snap = await store.snapshot(1, since)
    assert snap.seq == store.last_seq
    assert [t.task_id for t in snap.active] == ["live"]
    assert snap.changes is not None
    assert [c if isinstance(c, tuple) else (c.task_id, c.seq) for c in snap.changes] \
        == [("old", gone.seq), ("live", store.last_seq - 1)]
    assert (await store.snapshot(1, None)).changes is None


async def test_purging_tombstones_moves_the_horizon_for_every_node_and_persists(
        store: Store, kit: Kit) -> None:
    # PostgreSQL: a second node on the same database, that does not purge
    other = await kit.open(node="n2") if kit.postgres else None
    try:
        await finished(store, "x")
        first = await ok(store, Delete("x"))
        assert store.horizon == 0
        assert await store.purge_tombstones("2000-01-01T00:00:00.000Z") == 0  # none that old
        assert store.horizon == 0
        assert await store.purge_tombstones("9999-12-31T00:00:00.000Z") == 1
        assert store.horizon == first.seq
        assert await kit.rows("SELECT count(*) FROM tombstones") == [(0,)]
        # a `since` older than forgotten tombstones cannot be replayed: resync (changes None)
        assert (await store.snapshot(1, first.seq - 1)).changes is None
        assert (await store.snapshot(1, first.seq)).changes == []
        if other is not None:
            await other.catch_up(first.seq)
            # the node that did not purge knows too: a `since` before it cannot be replayed
            assert (await other.snapshot(1, first.seq - 1)).changes is None
            assert (await other.snapshot(1, first.seq)).changes == []
            assert other.horizon == first.seq
    finally:
        if other is not None:
            await other.close()
    store = await kit.reopen(store)
    try:
        assert store.horizon == first.seq
        assert (await store.snapshot(1, first.seq - 1)).changes is None
    finally:
        await store.close()


async def test_demo_secret_is_created_once(store: Store, kit: Kit) -> None:
    secret = await store.demo_secret()
    assert len(secret) >= 32 and await store.demo_secret() == secret
    store = await kit.reopen(store)
    try:
        assert await store.demo_secret() == secret
    finally:
        await store.close()
