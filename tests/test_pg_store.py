"""server/storage/postgres/store.py on its own: a real PostgreSQL database per test, no
app, no sockets.

What every engine does is tests/test_store_contract.py, run on SQLite and PostgreSQL alike;
here is what only a shared database has: the schema applied by nodes starting together, one
seq for every node's writes with no gap, connections lost and replaced, text PostgreSQL
cannot hold as is, generated ids in large batches, reads cut by the server, in-process tasks
per node, and that every statement is answered from an index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from server.core.errors import NotFound, StorageUnavailable
from server.core.model import Change, Delete, Kind, Register
from server.storage.api import Store, StoreRefused
from server.storage.postgres.store import SCHEMA_VERSION, PgStore
from tests.cluster_support import deafen
from tests.support import finished, ok, until


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PgStore]:
    s = PgStore(pg_url, node_name="n1")
    await s.open()
    yield s
    await s.close()


async def reopen(store: PgStore) -> PgStore:
    await store.close()
    again = PgStore(store.url, node_name=store.node)
    await again.open()
    return again


async def rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the database from a separate connection: only committed data is visible."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *params)]
    finally:
        await conn.close()


def test_the_engine_implements_the_store_interface(pg_url: str) -> None:
    from server.storage.engines import make_store

    made = make_store(pg_url, timeout=1, node_name="x", node_timeout=3)
    assert isinstance(made, PgStore)
    wanted = {name for name in dir(Store) if not name.startswith("_")}
    wanted |= set(Store.__annotations__)
    assert not {name for name in wanted if not hasattr(made, name)}
    assert (made.node, made.node_timeout, made.timeout) == ("x", 3, 1)


# ---- schema, epoch ---------------------------------------------------------------------


async def test_schema_is_applied_idempotently(store: PgStore, pg_url: str) -> None:
    await ok(store, Register("t1", 1, "job", {"k": "v"}))
    store = await reopen(store)  # the schema runs again on an existing database
    try:
        task = await store.get_task("t1")
        assert task is not None and task.metadata == {"k": "v"}
        tables = {r[0] for r in await rows(
            pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"tasks", "events", "tombstones", "settings", "seq_counter", "feed",
                "nodes"} <= tables
        assert await rows(pg_url, "SELECT value FROM settings WHERE key = 'schema_version'"
                          ) == [(str(SCHEMA_VERSION),)]
    finally:
        await store.close()


async def test_nodes_starting_together_all_open(pg_url: str) -> None:
    """The schema is created under an advisory lock: concurrent CREATEs would collide."""
    stores = [PgStore(pg_url, node_name=f"n{i}") for i in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert len({s.epoch for s in stores}) == 1
        assert len({await s.demo_secret() for s in stores}) == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_newer_schema_is_refused(store: PgStore, pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE settings SET value = $1 WHERE key = 'schema_version'",
                           str(SCHEMA_VERSION + 1))
        again = PgStore(pg_url, node_name="n2")
        with pytest.raises(StoreRefused, match="newer") as refused:
            await again.open()
        assert "\n" not in str(refused.value)
    finally:
        await conn.execute("UPDATE settings SET value = $1 WHERE key = 'schema_version'",
                           str(SCHEMA_VERSION))
        await conn.close()


async def test_a_schema_version_that_is_not_a_number_is_refused_as_such(store: PgStore,
                                                                        pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE settings SET value = 'x1' WHERE key = 'schema_version'")
        again = PgStore(pg_url, node_name="n2")
        with pytest.raises(StoreRefused, match="schema_version setting is not a number"):
            await again.open()
    finally:
        await conn.execute("UPDATE settings SET value = $1 WHERE key = 'schema_version'",
                           str(SCHEMA_VERSION))
        await conn.close()


async def test_an_unreachable_database_is_refused_in_one_line(pg_server: Any) -> None:
    url = f"postgresql://u:pw-not-shown@127.0.0.1:{pg_server.port + 1}/none"
    with pytest.raises(StoreRefused) as refused:
        await PgStore(url, timeout=2).open()
    message = str(refused.value)
    assert "unreachable" in message and "pw-not-shown" not in message and "\n" not in message


# ---- seq -------------------------------------------------------------------------------


async def test_writers_on_several_nodes_share_one_gapless_seq(pg_url: str) -> None:
    nodes = [PgStore(pg_url, node_name=f"n{i}") for i in range(3)]
    await asyncio.gather(*(n.open() for n in nodes))
    try:
        for i, node in enumerate(nodes):
            await ok(node, Register(f"t{i}", 1, "job"))
        outcomes = await asyncio.gather(*(
            node.submit(Change(f"t{i}", "progress", progress=p))
            for p in range(40) for i, node in enumerate(nodes)))
        seqs = sorted(o.seq for o in outcomes if o.seq is not None)
        assert seqs == list(range(4, 4 + len(outcomes)))
        assert await rows(pg_url, "SELECT seq FROM seq_counter") == [(seqs[-1],)]
        assert await rows(pg_url, "SELECT count(*), min(seq), max(seq) FROM feed"
                          ) == [(seqs[-1], 1, seqs[-1])]
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


async def test_a_commit_is_handed_over_after_every_earlier_seq_of_other_nodes(
        pg_url: str) -> None:
    """B hears of nothing by itself (no timer, no wake-ups); when it commits, what A
    committed before goes to B's listeners first, as remote changes, then B's own."""
    a, b = PgStore(pg_url, node_name="a"), PgStore(pg_url, node_name="b")
    await a.open()
    await b.open()
    try:
        await deafen(b)
        seen: list[tuple[int | None, bool]] = []
        b.on_publish = lambda outcomes, local: seen.extend((o.seq, local) for o in outcomes)
        for n in range(3):
            await ok(a, Register(f"from-a-{n}", 1, "job"))
        mine = await ok(b, Register("from-b", 1, "job"))
        assert seen == [(1, False), (2, False), (3, False), (mine.seq, True)]
        assert b.last_seq == mine.seq == 4
    finally:
        await a.close()
        await b.close()


# ---- the writer: one transaction per batch, each operation on its own ------------------


async def test_a_batch_that_loses_its_connection_is_tried_again(store: PgStore,
                                                               pg_server: Any,
                                                               pg_url: str) -> None:
    """The batch waits for the counter row (held by another session); its connection is
    killed; the caller, whose --db-timeout is not up, is answered by the next try."""
    await ok(store, Register("lost", 1, "job"))
    database = pg_url.rsplit("/", 1)[1]
    holder = asyncio.create_task(asyncio.to_thread(
        pg_server.sql, "BEGIN; SELECT seq FROM seq_counter WHERE id = 1 FOR UPDATE;"
        " SELECT pg_sleep(1.5); COMMIT;", database))
    await until(lambda: sessions(pg_server, database, HOLDING))
    waiting = asyncio.create_task(store.submit(Change("lost", "running")))
    await until(lambda: sessions(pg_server, database, "wait_event_type = 'Lock'"
                                 " AND application_name = 'taskpush n1'"))
    killed = await sessions(pg_server, database, "application_name = 'taskpush n1'"
                            " AND wait_event_type = 'Lock'", "count(pg_terminate_backend(pid))")
    assert killed == 1
    outcome = await asyncio.wait_for(waiting, 10)
    assert outcome.ok and outcome.task is not None and outcome.task.status == "running"
    await holder
    assert await rows(pg_url, "SELECT count(*) FROM events WHERE task_id = 'lost'") == [(2,)]


async def test_connections_the_server_ended_are_replaced_unnoticed(store: PgStore,
                                                                   pg_server: Any,
                                                                   pg_url: str) -> None:
    """The server ends the pooled connections while they are idle (a restart, an admin);
    the next read and write, sent before the store has even read that news (psql runs on
    the loop's thread here), are served by new connections."""
    await ok(store, Register("ended", 1, "job"))
    await store.get_task("ended")
    database = pg_url.rsplit("/", 1)[1]
    killed = pg_server.sql(TERMINATE.format(database=database, application="taskpush n1"))
    assert int(killed) >= 1
    task = await store.get_task("ended")
    assert task is not None and task.status == "pending"
    assert (await ok(store, Change("ended", "running"))).task.status == "running"
    assert store.unavailable() is None


async def test_a_write_past_the_timeout_is_answered_503(pg_url: str, pg_server: Any) -> None:
    store = PgStore(pg_url, node_name="n1", timeout=0.5)
    await store.open()
    try:
        await ok(store, Register("slow", 1, "job"))
        database = pg_url.rsplit("/", 1)[1]
        holder = asyncio.create_task(asyncio.to_thread(
            pg_server.sql, "BEGIN; SELECT seq FROM seq_counter WHERE id = 1 FOR UPDATE;"
            " SELECT pg_sleep(2); COMMIT;", database))
        await until(lambda: sessions(pg_server, database, HOLDING))
        with pytest.raises(StorageUnavailable) as refused:
            await store.submit(Change("slow", "running"))
        assert refused.value.status == 503
        await holder
        await ok(store, Change("slow", "running"))  # and the next write ends the outage
    finally:
        await store.close()


# ---- rules -----------------------------------------------------------------------------


async def test_generated_ids_in_a_large_batch_never_collide(store: PgStore,
                                                             pg_url: str) -> None:
    """2,000 registrations without an id, of three types, in one batch, where the names
    the third type would get are taken (that type is past what is read ahead: the rules
    ask, miss, and run again knowing)."""
    await store.submit_many([Register(f"c_{n}", 1, "job") for n in range(2101, 4101)])
    outcomes = await store.submit_many([Register(None, 2, "abc"[i % 3]) for i in range(2000)])
    assert all(o.kind is Kind.CREATED for o in outcomes)
    names = [o.task.task_id for o in outcomes if o.task is not None]
    assert len(set(names)) == 2000
    assert {f"c_{n}" for n in range(2101, 4101)}.isdisjoint(names)
    assert sum(1 for n in names if n.count("_") == 2) > 500  # the taken ones, renamed
    assert await rows(pg_url, "SELECT count(*) FROM tasks") == [(4000,)]


async def test_a_task_deleted_and_registered_again_in_one_batch(store: PgStore,
                                                               pg_url: str) -> None:
    await finished(store, "again")
    outcomes = await store.submit_many([
        Delete("again"), Register("again", 1, "job", {"v": 2}),
        Change("again", "running"), Register("brief", 1, "job"),
        Change("brief", "completed"), Delete("brief")])
    assert [o.kind for o in outcomes] == [Kind.DELETED, Kind.CREATED, Kind.CHANGED,
                                          Kind.CREATED, Kind.CHANGED, Kind.DELETED]
    task = await store.get_task("again")
    assert task is not None and (task.status, task.metadata) == ("running", {"v": 2})
    assert [e["status"] for e in await store.history("again")] == ["pending", "running"]
    assert await store.get_task("brief") is None
    assert await rows(pg_url, "SELECT count(*) FROM events WHERE task_id = 'brief'") == [(0,)]
    assert await rows(pg_url, "SELECT task_id FROM tombstones ORDER BY seq"
                      ) == [("again",), ("brief",)]


# ---- text, reads ---------------------------------------------------------------------------


async def test_text_postgresql_cannot_hold_as_is_comes_back_verbatim(store: PgStore) -> None:
    odd = "nul\x00 and escape \uffff0 \uffff1 \uffff and '; DROP TABLE tasks; --"
    await ok(store, Register("odd", 1, "job", {"k": odd}))
    await ok(store, Change("odd", "failed", message=odd, step=odd, error=odd, error_type=odd,
                           result=[odd]))
    task = await store.get_task("odd")
    assert task is not None
    assert [getattr(task, f) for f in ("message", "step", "error", "error_type")] == [odd] * 4
    assert task.metadata == {"k": odd} and task.result == [odd]
    last = (await store.history("odd"))[-1]
    assert [last[f] for f in ("message", "step", "error", "error_type")] == [odd] * 4
    assert (await store.list_tasks(1, status="failed", limit=5, before=None))[0] == task


async def test_an_id_postgresql_cannot_hold_names_nothing_and_spoils_no_batch(
        store: PgStore) -> None:
    """A NUL cannot be sent to PostgreSQL as text; ids are printable, so one holding it
    names no task: its operation is refused alone, reads find nothing."""
    await ok(store, Register("fine", 1, "job"))
    outcomes = await store.submit_many([Change("a\x00b", "running", idem_key="k"),
                                        Delete("\x00"), Change("fine", "running")])
    assert [type(o.error) for o in outcomes] == [NotFound, NotFound, type(None)]
    assert await store.get_task("a\x00b") is None
    assert await store.history_page("a\x00b", 0, 10) == ([], None)
    assert await store.list_tasks(1, status="\x00", limit=5, before=None) == []


async def test_reads_page_and_filter_as_on_sqlite(store: PgStore) -> None:
    for n in range(5):
        await ok(store, Register(f"l{n}", 1, "job"))
    await ok(store, Change("l1", "completed"))
    await ok(store, Register("other", 2, "job"))
    listed = await store.list_tasks(1, status=None, limit=3, before=None)
    assert [t.task_id for t in listed] == ["l4", "l3", "l2"]
    older = await store.list_tasks(1, status=None, limit=10, before=listed[-1].created_seq)
    assert [t.task_id for t in older] == ["l1", "l0"]
    assert [t.task_id for t in await store.list_tasks(1, status="completed", limit=9,
                                                          before=None)] == ["l1"]
    assert [t.task_id for t in await store.changed_since(1, 3, 10)] == ["l3", "l4", "l1"]
    page, after = await store.active_page(1, 0, 1)  # tiny pages: one task each
    assert [t.task_id for t in page] == ["l0"] and after == page[0].created_seq
    seen = []
    cursor: int | None = 0
    while cursor is not None:
        page, cursor = await store.active_page(1, cursor, 1)
        seen.extend(t.task_id for t in page)
    assert seen == ["l0", "l2", "l3", "l4"]
    events, more = await store.history_page("l1", 0, 1)
    assert [e["status"] for e in events] == ["pending"] and more == events[0]["seq"]
    assert await store.ping() is True


async def test_a_page_of_large_tasks_is_cut_by_the_server(store: PgStore) -> None:
    """A page never holds far more than its byte budget: the rows beyond it are not even
    fetched (memory measured while the page is read)."""
    import tracemalloc

    pad = "m" * 60_000
    await store.submit_many([Register(f"big{n}", 1, "job", {"pad": pad}) for n in range(60)])
    await ok(store, Change("big0", "running"))
    budget = 256 * 1024
    tracemalloc.start()
    try:
        page, after = await store.active_page(1, 0, budget)
        changes = await store.changes_page(1, 0, store.last_seq, budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 1 <= len(page) <= 6 and after == page[-1].created_seq
    assert changes is not None and 1 <= len(changes[0]) <= 6 and changes[1] is not None
    assert peak < 8 * budget, peak  # the whole set is 3.6 MB, read whole it peaks near 5
    seen, cursor = [], 0
    while cursor is not None:
        page, cursor = await store.active_page(1, cursor, budget)
        seen.extend(t.task_id for t in page)
    assert seen == [f"big{n}" for n in range(60)]


async def test_in_process_tasks_belong_to_their_node(store: PgStore, pg_url: str) -> None:
    other = PgStore(pg_url, node_name="n2")
    await other.open()
    try:
        await ok(store, Register("mine", 1, "job", origin="inprocess"))
        await ok(other, Register("theirs", 1, "job", origin="inprocess"))
        await ok(store, Register("http", 1, "job"))
        assert [t.task_id for t in await store.active_by_origin("inprocess")] == ["mine"]
        assert [t.task_id for t in await other.active_by_origin("inprocess")] == ["theirs"]
        assert [t.task_id for t in await store.active_by_origin("http")] == ["http"]
        assert await store.gone_nodes_tasks() == []  # n2 is alive
    finally:
        await other.close()


# ---- every per-user and per-task statement is answered from an index ------------------------


async def _scans(url: str) -> dict[str, int]:
    """Sequential scans of the big tables so far, once the store's sessions have ended
    (a session's counts are flushed as it ends)."""
    deadline = asyncio.get_running_loop().time() + 10
    while (await rows(url, "SELECT count(*) FROM pg_stat_activity WHERE application_name"
                      " LIKE 'taskpush %' AND datname = current_database()"))[0][0]:
        assert asyncio.get_running_loop().time() < deadline, "the store's sessions live on"
        await asyncio.sleep(0.02)
    return {name: count for name, count in await rows(
        url, "SELECT relname, seq_scan FROM pg_stat_user_tables"
        " WHERE relname IN ('tasks', 'events', 'tombstones', 'feed')")}


async def test_per_user_and_per_task_statements_use_an_index(store: PgStore,
                                                             pg_url: str) -> None:
    """With sequential scans priced out (`enable_seqscan = off` for the database), a
    statement that has no index to use still scans, and PostgreSQL counts it: what users,
    producers, the sweeps and the cluster feed do leaves the counts of the big tables as
    they were. (A backend's counts are flushed when it ends: the store is closed first.)"""
    for n in range(3):
        await finished(store, f"f{n}", user_id=n + 1)
        await ok(store, Register(f"a{n}", n + 1, "job", origin="inprocess"))
    await ok(store, Delete("f0"))
    database = pg_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'ALTER DATABASE "{database}" SET enable_seqscan = off')
    finally:
        await conn.close()
    await store.close()
    before = await _scans(pg_url)
    store = PgStore(pg_url, node_name="n1")
    await store.open()
    try:
        # users and producers
        await ok(store, Change("a1", "progress", progress=5, idem_key="k1"))
        await store.submit(Change("a1", "progress", progress=5, idem_key="k1"))
        await ok(store, Register(None, 2, "gen", max_active=10))
        await ok(store, Register("a9", 2, "job", max_active=10))
        await ok(store, Change("a9", "completed"))
        await ok(store, Delete("a9", owner=2))
        await store.get_task("a1")
        await store.list_tasks(2, status=None, limit=10, before=None)
        await store.list_tasks(2, status="progress", limit=10, before=5)
        await store.changed_since(2, 1, 10)
        await store.snapshot(2, 1)
        await store.history("a1")
        # sweeps and the cluster
        await store.active_before("9999-12-31T00:00:00.000Z")
        await store.finished_before("9999-12-31T00:00:00.000Z")
        await store.active_by_origin("inprocess")
        await store.active_by_origin("http")
        await store.gone_nodes_tasks()
        await store.catch_up(store.last_seq + 5)
        store.last_seq = 0
        await store.catch_up(5)
    finally:
        await store.close()
    assert await _scans(pg_url) == before


# ---- helpers ------------------------------------------------------------------------------


async def sessions(pg_server: Any, database: str, where: str, what: str = "count(*)"
                   ) -> int:
    """How many sessions of the database match `where` (`what`: or what to do with them);
    psql runs on a thread, so the store goes on meanwhile."""
    return int(await asyncio.to_thread(
        pg_server.sql, f"SELECT {what} FROM pg_stat_activity WHERE"  # noqa: S608
        f" datname = '{database}' AND {where}"))


TERMINATE = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
             " WHERE datname = '{database}' AND application_name = '{application}'")
HOLDING = "application_name = 'psql' AND query LIKE '%pg_sleep%' AND state = 'active'"


