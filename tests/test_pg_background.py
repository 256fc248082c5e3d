"""The PostgreSQL engine's timer (`PgStore._tick`), on a real server: a node that hears no
wake-up still delivers another node's change within about CATCH_UP_EVERY, and a live
node's heartbeat keeps its in-process tasks alive past --node-timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from server.core.model import Register
from server.storage.postgres.store import CATCH_UP_EVERY, PgStore

pytestmark = pytest.mark.slow


async def test_a_node_that_hears_no_wake_up_still_delivers_within_the_timer(
        pg_url: str) -> None:
    a = PgStore(pg_url, node_name="a")
    b = PgStore(pg_url, node_name="b")
    await a.open()
    await b.open()
    try:
        async with a.listener.lock:  # A's listening connection hears nothing from now on
            assert a.listener.conn is not None
            await a.listener.conn.remove_listener("taskpush", a.feed.notified)
        delivered = asyncio.Event()
        seqs: list[int] = []

        def published(outcomes: Any, local: bool) -> None:
            seqs.extend(o.seq for o in outcomes)
            delivered.set()

        a.on_publish = published
        made = await b.submit(Register("from-b", 1, "job"))
        # the timer fires every CATCH_UP_EVERY: one period, plus one for a loaded machine
        await asyncio.wait_for(delivered.wait(), 2 * CATCH_UP_EVERY + 1)
        assert seqs == [made.seq]
    finally:
        await a.close()
        await b.close()


async def test_a_live_nodes_in_process_task_outlives_the_node_timeout(pg_url: str) -> None:
    """A's heartbeat moves its `seen_at` on (every third of --node-timeout): once more than
    --node-timeout has passed on the database's clock since A started, B still counts A
    alive and leaves its in-process task alone."""
    node_timeout = 1.0
    a = PgStore(pg_url, node_name="a", node_timeout=node_timeout)
    b = PgStore(pg_url, node_name="b", node_timeout=node_timeout)
    await a.open()
    await b.open()
    watch = await asyncpg.connect(pg_url)
    try:
        await a.submit(Register("ip-a", 1, "job", origin="inprocess"))
        started = await watch.fetchval("SELECT now()")
        while not await watch.fetchval(  # the database clock, read afresh each time
                "SELECT clock_timestamp() > $1::timestamptz + make_interval(secs => $2::float8)",
                started, 2 * node_timeout):
            await asyncio.sleep(0.1)
        assert [t.task_id for t in await b.gone_nodes_tasks()] == []
        seen = await watch.fetchval("SELECT seen_at FROM nodes WHERE name = 'a'")
        assert seen > started
    finally:
        await watch.close()
        await a.close()
        await b.close()
