"""server/storage/writer.py's promises, on both engines: a caller is answered only after its
commit was published (pushed) in seq order, also when publishing has to wait; a storage
failure that will not end by itself (a full disk, a read-only database) is answered 503 at
once, not retried until --db-timeout, while /healthz keeps answering; between tries of a
failure that may end (a lock held elsewhere), the loop serves everything else."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from server.core.errors import StorageUnavailable
from server.core.model import Change, Operation, Outcome, Register
from server.storage.postgres.store import FEED_PAGE, PgStore
from server.storage.writer import GroupWriter
from server.web import keys
from tests.cluster_support import deafen
from tests.conftest import PRODUCER, MakeClient, register

LONG_TIMEOUT = 30.0  # --db-timeout: a refusal must come long before it
HANG = 10.0  # a third of it: nothing retried until the deadline answers within this


# ---- the loop's turn between tries ------------------------------------------------------


class _FailingAtOnce:
    """A `writer.BatchCommitter` whose commit fails without ever awaiting (as an engine
    does that finds the lock held, or its file replaced, before touching the disk), with
    a failure worth retrying; it notes how far a ticker task had got at each try."""

    def __init__(self, ticks: list[int]) -> None:
        self.ticks = ticks
        self.seen: list[int] = []

    async def commit(self, ops: list[Operation], deadline: float) -> list[Outcome]:
        self.seen.append(self.ticks[0])
        exc = StorageUnavailable("storage unavailable: database is locked by another process")
        exc.retry_until_deadline = True
        raise exc

    def published(self, outcomes: list[Outcome], seconds: float) -> None:
        raise AssertionError("nothing commits")


async def test_the_loop_runs_between_tries_of_a_retried_batch() -> None:
    ticks = [0]
    committer = _FailingAtOnce(ticks)
    writer = GroupWriter(committer, timeout=0.3)
    writer.start()
    submitted = asyncio.create_task(writer.submit(Change("t", "running")))

    async def tick() -> None:
        while not submitted.done():
            ticks[0] += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    with pytest.raises(StorageUnavailable):
        await submitted
    await ticker
    await writer.close()
    assert len(committer.seen) >= 2  # tried again while the caller had time left
    # between any two tries, the ticker ran: the writer gave the loop its turn
    seen = committer.seen
    assert all(seen[i + 1] > seen[i] for i in range(len(seen) - 1)), seen


# ---- failures that do not end by themselves are answered at once -------------------------


async def test_a_full_disk_is_answered_503_at_once_with_healthz_answering(
        make_client: MakeClient) -> None:
    """SQLite's own SQLITE_FULL (`max_page_count` reached), --db-timeout 30 s: the write
    is refused at once (retrying cannot make room), and /healthz answers meanwhile."""
    client = await make_client(db_timeout=LONG_TIMEOUT)
    store = client.app[keys.STORE]
    await register(client, "t", 1)
    async with store._write_lock:  # alone on the writer connection
        (pages,) = store._wconn.execute("PRAGMA page_count").fetchone()
        store._wconn.execute(f"PRAGMA max_page_count = {pages}")
    started = time.monotonic()
    write = asyncio.create_task(client.post("/api/task/tasks", headers=PRODUCER, json={
        "task_id": "big", "user_id": 1, "task_type": "job", "metadata": {"x": "x" * 40_000}}))
    health = await asyncio.wait_for(client.get("/healthz"), HANG)
    assert health.status in (200, 503)
    resp = await asyncio.wait_for(write, HANG)
    assert resp.status == 503 and "disk is full" in (await resp.json())["message"]
    assert time.monotonic() - started < HANG
    assert (await client.get("/healthz")).status == 503


@pytest.mark.slow
async def test_a_read_only_postgresql_database_is_answered_503_at_once(
        pg_url: str, pg_server: Any) -> None:
    store = PgStore(pg_url, node_name="n1", timeout=LONG_TIMEOUT)
    await store.open()
    try:
        await store.submit(Register("ro", 1, "job"))
        database = pg_url.rsplit("/", 1)[1]
        pg_server.sql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        assert store._pool is not None
        await store._pool.expire_connections()  # new sessions read the setting
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="read-only"):
            await asyncio.wait_for(store.submit(Change("ro", "running")), HANG)
        assert time.monotonic() - started < HANG
        pg_server.sql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = off')
        await store._pool.expire_connections()
        assert (await store.submit(Change("ro", "running"))).ok
    finally:
        await store.close()


# ---- answered after the publish -----------------------------------------------------------


@pytest.mark.slow
async def test_a_caller_is_answered_after_its_commit_was_published_on_a_lagging_node(
        pg_url: str) -> None:
    """Node B commits more than a feed page while A reads nothing by itself; A's next
    commit must first deliver all of them (its publish waits for feed reads) and then its
    own change: only then is A's caller answered."""
    a = PgStore(pg_url, node_name="a")
    b = PgStore(pg_url, node_name="b")
    await a.open()
    await b.open()
    try:
        await deafen(a)
        published: list[int] = []
        a.on_publish = lambda outcomes, local: published.extend(
            o.seq for o in outcomes if o.seq is not None)
        outcomes = await b.submit_many([Register(f"b-{i}", 1, "job")
                                        for i in range(FEED_PAGE + 1)])
        assert all(o.ok for o in outcomes)
        mine = await a.submit(Register("a-1", 1, "job"))
        assert mine.seq in published  # published before the answer
        assert published == list(range(outcomes[0].seq, mine.seq + 1))
    finally:
        await a.close()
        await b.close()

