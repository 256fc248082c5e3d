"""Cluster mode as processes: real `run.py` nodes on one real PostgreSQL database.

- kill -9 of one node under load (producers on both nodes, each change with an
  Idempotency-Key and retried on the other node; sockets on both): nothing acknowledged is
  lost or recorded twice, and the dead node's client resumes on the other with `since`;
- SIGTERM of a node closes its sockets 1001 and ends its in-process tasks, pushed to the
  other node's sockets, while that node keeps serving;
- a node killed and restarted marks its previous in-process tasks failed/interrupted;
- a node killed and never restarted: another node does it after --node-timeout;
- PostgreSQL restarted under load: sockets stay open, producers see 503 and retry, and
  afterwards every acknowledged change reaches the sockets on both nodes;
- a slow consumer on node B is closed 4408 and resumes on node A with nothing missing;
- node B's listening connection killed (pg_terminate_backend) again and again under load:
  B's socket still gets every change, in order;
- the psql queries of README and docs/cluster.md run on a cluster's database.

Skipped on a developer machine without PostgreSQL, a failure in CI (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster_support import (
    API_KEY,
    PRODUCER,
    TIMEOUT,
    TOKEN_FLAGS,
    RawSocket,
    Watcher,
    Writer,
    assert_recorded_once,
    bearer,
    event,
    eventually,
    post,
    register,
    status_of,
    user_token,
)
from tests.engines import Engine
from tests.procs import ServerProcess, Servers

ACTIVE = {"pending", "running", "progress"}
QUIET = ("--access-log", "false", "--log-level", "warning")


@pytest.fixture
def pg(pg_server: Any) -> Engine:
    return Engine("postgresql", pg_server)


async def start(*nodes: ServerProcess) -> None:
    """One after the other: the first creates the schema, the settings and the demo secret."""
    for node in nodes:
        await asyncio.to_thread(node.start)


def recorded(pg: Engine, db: str) -> list[tuple[str, str]]:
    return [(task_id, message) for task_id, message in
            pg.query(db, "SELECT task_id, message FROM events WHERE message LIKE '%#%'")]


async def demo_login(session: aiohttp.ClientSession, node: ServerProcess, user_id: int) -> str:
    return (await post(session, f"{node.url}/api/demo/login", {"user_id": user_id}, {}))["token"]


async def start_demo_task(session: aiohttp.ClientSession, node: ServerProcess, token: str
                          ) -> str:
    """A long simulated in-process task, running on `node`."""
    task = await post(session, f"{node.url}/api/demo/tasks", {"kind": "success"},
                      bearer(token), expect=201)
    return str(task["task_id"])


async def test_kill9_of_a_node_under_load_loses_nothing_and_clients_resume_elsewhere(
        servers: Servers, pg: Engine) -> None:
    db = pg.database()
    a, b = servers.cluster(db, *TOKEN_FLAGS, *QUIET)
    await start(a, b)
    token = user_token(1)
    tasks = [f"load_{k}" for k in range(6)]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for k, task_id in enumerate(tasks):
            await register(session, (a, b)[k % 2].url, task_id)
        on_a, on_b = Watcher(session, 1, token), Watcher(session, 1, token)
        await on_a.connect(a.ws_url)
        await on_b.connect(b.ws_url)
        # each writer starts on its own node and fails over (same key) to the other one
        writers = [Writer(session, [a, b], t, first=k) for k, t in enumerate(tasks)]
        running = [asyncio.create_task(w.run()) for w in writers]

        def acked() -> int:
            return sum(len(w.acked) for w in writers)

        await eventually(lambda: acked() >= 300, 60, "300 changes acknowledged")
        a.signal(9)
        assert await asyncio.to_thread(a.wait, 10.0) == -9
        await asyncio.wait_for(on_a.ended.wait(), 10)  # its socket died with it
        # the writers that were on A go on through B; the dead node's client resumes there
        await on_a.connect(b.ws_url)
        after_kill = acked()
        await eventually(lambda: acked() >= after_kill + 200, 60, "200 more after the kill")
        for w in writers:
            w.stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 60)
        assert sum(w.failovers for w in writers[::2]) >= 1  # A's writers did fail over

        for watcher in (on_a, on_b):
            await watcher.wait_for(
                lambda w: all(w.has(x.task_id, "completed", x.seq) for x in writers), 30,
                "every task's final state on both sockets")
            watcher.assert_increasing()
            for x in writers:
                assert watcher.latest[x.task_id]["result"] == {"sent": len(x.acked) - 1}
        assert on_b.connects == 1  # B's socket never noticed
        for x in writers:  # one answer, whichever node is asked
            assert (await status_of(session, b.url, x.task_id, token))["seq"] == x.seq
        await on_a.close()
        await on_b.close()
    assert_recorded_once(recorded(pg, db), writers)
    assert b.stop() == 0


async def test_sigterm_of_a_node_ends_its_work_while_the_other_serves(
        servers: Servers, pg: Engine) -> None:
    db = pg.database()
    a, b = servers.cluster(db, "--api-key", API_KEY, "--demo-task-seconds", "60", *QUIET)
    await start(a, b)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        token = await demo_login(session, a, 1)  # the demo secret is the cluster's
        on_a, on_b = Watcher(session, 1, token), Watcher(session, 1, token)
        await on_a.connect(a.ws_url)
        await on_b.connect(b.ws_url)
        job = await start_demo_task(session, a, token)  # in-process, on A
        await register(session, b.url, "http_job")
        before = await event(session, b.url, "http_job", status="progress", progress=40)
        await on_b.wait_for(lambda w: w.has(job, {"running", "progress"}), 20,
                            "B's socket sees A's in-process task run")

        a.signal(15)
        await asyncio.wait_for(on_a.ended.wait(), 15)
        assert on_a.close_codes == [1001]
        assert await asyncio.to_thread(a.wait, 15.0) == 0
        await on_b.wait_for(lambda w: w.has(job, "failed"), 20,
                            "A's in-process task ended, pushed through B")
        assert on_b.latest[job]["error_type"] == "interrupted"
        assert pg.task_row(db, job) == ("failed", "interrupted")
        assert pg.task_row(db, "http_job") == ("progress", None)  # a producer's task stays

        # B goes on: writes, pushes, reads, new sockets
        done = await event(session, b.url, "http_job", status="completed", result={"ok": 1})
        assert done["seq"] > before["seq"]
        await on_b.wait_for(lambda w: w.has("http_job", "completed", done["seq"]), 10,
                            "B pushes B's change")
        assert (await status_of(session, b.url, "http_job", token))["status"] == "completed"
        late = Watcher(session, 1, token)
        late.resume_from(str(on_b.epoch), 0)  # since=0: the finished tasks too
        await late.connect(b.ws_url)
        await late.wait_for(lambda w: w.has(job, "failed") and w.has("http_job", "completed"),
                            10, "a new socket on B")
        assert on_b.connects == 1 and not on_b.ended.is_set()
        for watcher in (on_a, on_b, late):
            watcher.assert_increasing()
            await watcher.close()
    assert b.stop() == 0


async def test_a_restarted_node_marks_its_previous_inprocess_tasks_interrupted(
        servers: Servers, pg: Engine) -> None:
    db = pg.database()
    # --node-timeout far beyond the test: only the restart itself can end the task
    a, b = servers.cluster(db, "--api-key", API_KEY, "--demo-task-seconds", "60",
                           "--node-timeout", "600", *QUIET)
    await start(a, b)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        token = await demo_login(session, a, 1)
        on_b = Watcher(session, 1, token)
        await on_b.connect(b.ws_url)
        job = await start_demo_task(session, a, token)
        await on_b.wait_for(lambda w: w.has(job, {"running", "progress"}), 20, "job running")
        a.kill()
        # nothing ran at kill -9: the task still looks active
        assert (await status_of(session, b.url, job, token))["status"] in ACTIVE
        await asyncio.to_thread(a.start)  # the same --node-name, another port
        await on_b.wait_for(lambda w: w.has(job, "failed"), 20,
                            "the restarted node ended its dead run's task")
        assert on_b.latest[job]["error_type"] == "interrupted"
        assert (await status_of(session, a.url, job, token))["error_type"] == "interrupted"
        on_b.assert_increasing()
        await on_b.close()
    assert a.stop() == 0 and b.stop() == 0


async def test_a_node_gone_for_node_timeout_has_its_tasks_ended_by_another(
        servers: Servers, pg: Engine) -> None:
    db = pg.database()
    a, b = servers.cluster(db, "--api-key", API_KEY, "--demo-task-seconds", "120",
                           "--node-timeout", "3", *QUIET)
    await start(a, b)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        token = await demo_login(session, a, 1)
        on_b = Watcher(session, 1, token)
        await on_b.connect(b.ws_url)
        on_a_job = await start_demo_task(session, a, token)
        on_b_job = await start_demo_task(session, b, token)
        await on_b.wait_for(lambda w: w.has(on_a_job, {"running", "progress"})
                            and w.has(on_b_job, {"running", "progress"}), 20, "jobs running")
        a.kill()  # and never restarted
        await on_b.wait_for(lambda w: w.has(on_a_job, "failed"), 40,
                            "B ended the gone node's in-process task")
        assert on_b.latest[on_a_job]["error_type"] == "interrupted"
        assert pg.task_row(db, on_a_job) == ("failed", "interrupted")
        # B's own task is B's: it goes on
        assert (await status_of(session, b.url, on_b_job, token))["status"] in ACTIVE
        on_b.assert_increasing()
        await on_b.close()
    assert b.stop() == 0


@pytest.fixture
def own_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own, since the test restarts it."""
    from tests.pg import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI (.ci/run installs it): {exc}")
        pytest.skip(f"PostgreSQL is not available on this machine: {exc}")
    try:
        yield server
    finally:
        server.cleanup()


async def test_postgres_restart_under_load_every_acknowledged_change_reaches_both_nodes(
        servers: Servers, own_pg: Any) -> None:
    pg = Engine("postgresql", own_pg)
    db = pg.database()
    a, b = servers.cluster(db, *TOKEN_FLAGS, *QUIET, "--db-timeout", "2")
    await start(a, b)
    token = user_token(1)
    tasks = [f"pgr_{k}" for k in range(4)]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for task_id in tasks:
            await register(session, a.url, task_id)
        on_a, on_b = Watcher(session, 1, token), Watcher(session, 1, token)
        await on_a.connect(a.ws_url)
        await on_b.connect(b.ws_url)
        # each writer keeps to its node and retries a 503 there with the same key
        writers = [Writer(session, [(a, b)[k % 2]], t) for k, t in enumerate(tasks)]
        running = [asyncio.create_task(w.run()) for w in writers]

        def acked() -> int:
            return sum(len(w.acked) for w in writers)

        await eventually(lambda: acked() >= 100, 60, "100 changes acknowledged")
        await asyncio.to_thread(own_pg.restart, "fast")  # every connection terminated
        after = acked()
        await eventually(lambda: acked() >= after + 100, 90, "100 more after the restart")
        for w in writers:
            w.stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 90)

        for watcher in (on_a, on_b):
            await watcher.wait_for(
                lambda w: all(w.has(x.task_id, "completed", x.seq) for x in writers), 60,
                "every task's final state on both nodes' sockets")
            watcher.assert_increasing()
            assert watcher.connects == 1 and not watcher.ended.is_set()  # stayed open
        for node in (a, b):
            await eventually(lambda node=node: _healthy(session, node), 30,
                             f"{node.name} healthy again")
        await on_a.close()
        await on_b.close()
    assert_recorded_once(recorded(pg, db), writers)
    assert a.stop() == 0 and b.stop() == 0


async def _healthy(session: aiohttp.ClientSession, node: ServerProcess) -> bool:
    async with session.get(node.url + "/healthz") as resp:
        return resp.status == 200


async def test_a_slow_consumer_on_one_node_is_closed_4408_and_resumes_on_the_other(
        servers: Servers, pg: Engine) -> None:
    db = pg.database()
    a = servers(*TOKEN_FLAGS, *QUIET, db=db, name="node_a")
    b = servers(*TOKEN_FLAGS, *QUIET, "--send-queue", "50", "--send-timeout", "2", db=db,
                name="node_b")
    await start(a, b)
    token = user_token(1)
    ids = [f"slow_{k:03d}" for k in range(120)]
    text = "x" * 2000
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for task_id in ids:
            await register(session, a.url, task_id)
        stuck = await asyncio.to_thread(
            RawSocket, b.port, f"/api/task/ws/task/1?token={token}")
        try:
            await eventually(lambda: _connections(session, b, 1), 10, "B holds the socket")
            # every change through A, more distinct tasks at once than B may queue
            for rnd in range(1, 6):
                await post(session, f"{a.url}/api/task/events",
                           {"events": [{"task_id": t, "status": "progress", "progress": rnd,
                                        "message": text} for t in ids]}, PRODUCER)
            # read again as soon as B gives up on it, so its close frame can get through
            await eventually(lambda: _slow_closed(session, b), 20,
                             "B cut the slow consumer off")
            seen, code = await asyncio.to_thread(stuck.read_until_close, 10.0)
        finally:
            stuck.close()
        assert code == 4408
        connected = seen[0]
        assert connected["type"] == "connected"
        pushed = [m for m in seen if m["type"] == "task_status"]
        since = max([m["seq"] for m in pushed], default=connected["seq"])

        resumed = Watcher(session, 1, token)
        resumed.resume_from(connected["epoch"], since)
        await resumed.connect(a.ws_url)  # with since: on the other node
        final = {t: (await status_of(session, a.url, t, token))["seq"] for t in ids}
        have = {m["task_id"]: m["seq"] for m in pushed}
        await resumed.wait_for(
            lambda w: all(w.has(t, "progress", final[t]) or have.get(t) == final[t]
                          for t in ids), 20, "every task's latest state after the resume")
        resumed.assert_increasing()
        assert all(s > since for s in resumed.seqs)
        await resumed.close()
    assert a.stop() == 0 and b.stop() == 0


async def _connections(session: aiohttp.ClientSession, node: ServerProcess, n: int) -> bool:
    async with session.get(node.url + "/healthz") as resp:
        return (await resp.json())["connections"] == n


async def _slow_closed(session: aiohttp.ClientSession, node: ServerProcess) -> bool:
    async with session.get(node.url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("taskpush_slow_consumers_closed_total "):
            return float(line.split()[1]) >= 1
    return False


def psql_queries(path: Path) -> list[str]:
    """The SQL of every `psql "$TASKPUSH_DB" -c "..."` line of a document."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        prefix = 'psql "$TASKPUSH_DB" -c "'
        if line.startswith(prefix) and line.endswith('"'):
            out.append(line[len(prefix):-1].replace('\\"', '"'))
    return out


async def test_the_documented_psql_queries_run_on_a_cluster_database(
        servers: Servers, pg: Engine) -> None:
    from tests.procs import ROOT

    db = pg.database()
    (a,) = servers.cluster(db, "--api-key", API_KEY, *QUIET, nodes=1)
    await start(a)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        token = await demo_login(session, a, 1)
        await start_demo_task(session, a, token)
        await register(session, a.url, "interview_123")
        await event(session, a.url, "interview_123", status="failed", error="boom",
                    error_type="timeout")
    queries = psql_queries(ROOT / "README.md") + psql_queries(ROOT / "docs" / "cluster.md")
    assert len(queries) >= 6
    results = [pg.query(db, sql) for sql in queries]
    readme_history, running, failures = results[:3]
    assert [row[2] for row in readme_history] == ["pending", "failed"]
    assert any(row[-1] == a.name for row in running)  # the in-process task's node
    assert failures == [("timeout", "1")]
    assert a.stop() == 0


async def test_a_nodes_listening_connection_killed_under_load_delivers_everything(
        servers: Servers, pg: Engine) -> None:
    """pg_terminate_backend of node B's LISTEN connection while A takes writes: B reconnects
    it and catches up by seq; its socket gets every change, in order, without a reconnect."""
    db = pg.database()
    a, b = servers.cluster(db, *TOKEN_FLAGS, *QUIET)
    await start(a, b)
    listen_of_b = f"taskpush {b.name} listen"

    def listener_pids() -> list[str]:
        sql = ("SELECT pid FROM pg_stat_activity WHERE application_name = "  # noqa: S608 (our name)
               f"'{listen_of_b}'")
        return [pid for (pid,) in pg.query(db, sql)]

    token = user_token(1)
    tasks = [f"lst_{k}" for k in range(3)]
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for task_id in tasks:
            await register(session, a.url, task_id)
        on_b = Watcher(session, 1, token)
        await on_b.connect(b.ws_url)
        (before,) = await eventually(listener_pids, 10, "B listens")
        writers = [Writer(session, [a], t) for t in tasks]
        running = [asyncio.create_task(w.run()) for w in writers]

        def acked() -> int:
            return sum(len(w.acked) for w in writers)

        await eventually(lambda: acked() >= 60, 30, "writes under way")
        for _ in range(3):  # again and again, while A keeps committing
            assert pg.query(db, f"SELECT pg_terminate_backend({before})") == [("t",)]
            (before,) = await eventually(
                lambda old=before: [p for p in listener_pids() if p != old], 20,
                "B listens again")
            mark = acked()
            await eventually(lambda m=mark: acked() >= m + 30, 30, "more writes")
        for w in writers:
            w.stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 30)
        await on_b.wait_for(lambda w: all(w.has(x.task_id, "completed", x.seq)
                                          for x in writers), 20, "every final state on B")
        on_b.assert_increasing()
        assert on_b.connects == 1 and not on_b.ended.is_set()
        await on_b.close()
    assert a.stop() == 0 and b.stop() == 0
