"""RQ and arq through `taskpush_client.rq` / `taskpush_client.arq`: a real Redis, a real
`rq worker` and a real arq worker, a real taskpush server, and a WebSocket client that sees
what the user's browser sees."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import taskpush_client

from tests.conftest import API_KEY
from tests.procs import ServerProcess
from tests.workers_support import (
    Browser,
    HeldProxy,
    Redis,
    Worker,
    assert_browser_order,
    history,
    rest,
    worker_env,
)

pytestmark = pytest.mark.slow  # Redis and RQ/arq worker processes


@pytest.fixture(scope="module")
def reporting(server: ServerProcess) -> Iterator[taskpush_client.Client]:
    client = taskpush_client.configure(server.url, API_KEY, max_delay=0.05, backoff=0.05)
    yield client
    client.close(2)


@pytest.fixture(scope="module")
def rq_queue(redis: Redis, server: ServerProcess, workdir: Path,
             reporting: taskpush_client.Client) -> Iterator[Any]:
    from redis import Redis as RedisClient
    from rq import Queue

    worker = Worker(workdir, "rq", [
        sys.executable, "-m", "rq.cli", "worker", "--url", f"unix://{redis.socket}",
        "--logging_level", "INFO", "-w", "taskpush_client.rq.Worker", "tp_rq"],
        worker_env(server)).start()
    connection = RedisClient(unix_socket_path=str(redis.socket))
    yield Queue("tp_rq", connection=connection)
    worker.stop()
    connection.close()


@pytest.fixture(scope="module")
def arq_worker(redis: Redis, server: ServerProcess, workdir: Path,
               reporting: taskpush_client.Client) -> Iterator[Worker]:
    worker = Worker(workdir, "arq", [
        sys.executable, "-m", "arq", "tests.worker_apps.arq_app.WorkerSettings"],
        worker_env(server, TP_REDIS_SOCKET=str(redis.socket))).start()
    yield worker
    worker.stop()


def statuses(seen: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for message in seen:
        if not out or out[-1] != message["status"]:
            out.append(message["status"])
    return out


# ---- RQ --------------------------------------------------------------------------------

def test_rq_lifecycle_with_progress_and_result(rq_queue: Any, server: ServerProcess) -> None:
    from taskpush_client.rq import enqueue

    from tests.worker_apps import rq_jobs

    with Browser(server) as browser:
        job = enqueue(rq_queue, rq_jobs.ok, 4, user_id=1)
        seen = browser.until(job.id)
    assert statuses(seen) == ["pending", "running", "progress", "completed"]
    assert seen[-1]["result"] == {"items": 4} and seen[0]["task_type"] == "ok"
    assert_browser_order(seen)


def test_rq_failure_and_retry(rq_queue: Any, server: ServerProcess, tmp_path: Path) -> None:
    from rq import Retry
    from taskpush_client.rq import enqueue

    from tests.worker_apps import rq_jobs

    with Browser(server) as browser:
        failed = enqueue(rq_queue, rq_jobs.boom, user_id=1)
        retried = enqueue(rq_queue, rq_jobs.flaky, str(tmp_path / "marker"), user_id=1,
                          job_options={"retry": Retry(max=2)})
        bad = browser.until(failed.id)
        again = browser.until(retried.id)
    assert statuses(bad) == ["pending", "running", "progress", "failed"]
    assert (bad[-1]["error_type"], bad[-1]["error"]) == ("ValueError", "the input was bad")
    assert again[-1]["status"] == "completed" and again[-1]["result"] == "second time lucky"
    assert "retry 1" in [m["step"] for m in again if m["status"] == "running"]
    assert_browser_order(bad)
    assert_browser_order(again)


def test_rq_rest_cancel_stops_the_job(rq_queue: Any, server: ServerProcess,
                                      tmp_path: Path) -> None:
    from taskpush_client.rq import enqueue

    from tests.worker_apps import rq_jobs

    with Browser(server) as browser:
        job = enqueue(rq_queue, rq_jobs.until_file, str(tmp_path / "never"), user_id=1)
        browser.until(job.id, lambda m: m["status"] == "progress")
        rest(server, "POST", f"/api/task/task/{job.id}/cancel")
        seen = browser.until(job.id)
        deadline = 100
        while job.get_status(refresh=True) != "failed" and deadline:
            deadline -= 1
            browser._stop.wait(0.1)  # the job's loop must end by itself
    assert job.get_status() == "failed"
    assert "TaskCancelled" in (job.latest_result().exc_string or "")
    assert seen[-1]["status"] == "cancelled"
    assert history(server, job.id)[-1]["status"] == "cancelled"


def test_rq_work_horse_killed_and_retried_ends_in_one_final_state(
        rq_queue: Any, server: ServerProcess, tmp_path: Path) -> None:
    """kill -9 of the work horse mid-job: the worker (taskpush_client.rq.Worker) reports
    the retry, RQ runs the job again, and the user sees one final state."""
    import os
    import signal
    import time

    from rq import Retry
    from taskpush_client.rq import enqueue

    from tests.worker_apps import rq_jobs

    go, pidfile = tmp_path / "go", tmp_path / "pid"
    with Browser(server) as browser:
        job = enqueue(rq_queue, rq_jobs.until_file, str(go), str(pidfile), user_id=1,
                      job_options={"retry": Retry(max=1)})
        browser.until(job.id, lambda m: m["status"] == "progress")
        first = int(pidfile.read_text())
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text() not in ("", str(first))):
            assert time.monotonic() < deadline, "the job was not run again"
            time.sleep(0.05)
        go.write_text("go")
        seen = browser.until(job.id)
    assert seen[-1]["status"] == "completed" and seen[-1]["result"] == "done"
    assert "work horse lost; retrying" in [m["message"] for m in seen]
    assert_browser_order(seen)
    statuses_ = [e["status"] for e in history(server, job.id)]
    assert sum(s in ("completed", "failed", "cancelled") for s in statuses_) == 1


# ---- arq -------------------------------------------------------------------------------

async def _arq_pool(redis: Redis) -> Any:
    from arq import create_pool
    from arq.connections import RedisSettings

    return await create_pool(RedisSettings(unix_socket_path=str(redis.socket)))


async def test_arq_lifecycle_failure_and_retry(arq_worker: Worker, redis: Redis,
                                               server: ServerProcess) -> None:
    from taskpush_client.arq import enqueue

    pool = await _arq_pool(redis)
    try:
        with Browser(server) as browser:
            good = await enqueue(pool, "ok", 4, user_id=1)
            bad = await enqueue(pool, "boom", user_id=1)
            retried = await enqueue(pool, "flaky", "unused", user_id=1)
            assert await good.result(timeout=30) == {"items": 4}
            seen = browser.until(good.job_id)
            failed = browser.until(bad.job_id)
            again = browser.until(retried.job_id)
    finally:
        await pool.aclose()
    assert statuses(seen) == ["pending", "running", "progress", "completed"]
    assert seen[-1]["result"] == {"items": 4}
    assert (failed[-1]["status"], failed[-1]["error_type"]) == ("failed", "ValueError")
    assert again[-1]["status"] == "completed"
    assert "retry 1" in [m["step"] for m in again if m["status"] == "running"]
    for messages in (seen, failed, again):
        assert_browser_order(messages)


async def test_arq_rest_cancel_stops_the_job(arq_worker: Worker, redis: Redis,
                                            server: ServerProcess, tmp_path: Path) -> None:
    import asyncio

    from taskpush_client.arq import enqueue

    pool = await _arq_pool(redis)
    try:
        with Browser(server) as browser:
            job = await enqueue(pool, "until_file", str(tmp_path / "never"), user_id=1)
            await asyncio.to_thread(browser.until, job.job_id,
                                    lambda m: m["status"] == "progress")
            await asyncio.to_thread(rest, server, "POST", f"/api/task/task/{job.job_id}/cancel")
            info = await asyncio.wait_for(_finished(job), 30)  # the loop ended by itself
            seen = browser.until(job.job_id)
    finally:
        await pool.aclose()
    assert not info.success and type(info.result).__name__ == "TaskCancelled"
    assert seen[-1]["status"] == "cancelled"


async def _finished(job: Any) -> Any:
    import asyncio

    while (info := await job.result_info()) is None:
        await asyncio.sleep(0.05)
    return info


# ---- task ids at the contract's bounds -------------------------------------------------
# The server takes any printable task id of up to 200 characters; each state change's
# idempotency key must be one it takes too. RQ allows only [A-Za-z0-9_-] in a job id.

@pytest.mark.slow  # a real Redis and worker
def test_rq_job_ids_at_the_length_bound_report_every_state(rq_queue: Any,
                                                            server: ServerProcess) -> None:
    from rq import Retry
    from taskpush_client.rq import enqueue

    from tests.worker_apps import rq_jobs

    with Browser(server) as browser:
        done = enqueue(rq_queue, rq_jobs.ok, 2, user_id=1, job_options={"job_id": "a" * 200})
        failed = enqueue(rq_queue, rq_jobs.boom, user_id=1,
                         job_options={"job_id": "-_" * 100, "retry": Retry(max=1)})
        seen = browser.until(done.id)
        bad = browser.until(failed.id)
    assert statuses(seen) == ["pending", "running", "progress", "completed"]
    assert seen[-1]["result"] == {"items": 2}
    assert bad[-1]["status"] == "failed" and bad[-1]["error_type"] == "ValueError"
    assert "retry 1" in [m["step"] for m in bad if m["status"] == "running"]
    assert_browser_order(seen)
    assert_browser_order(bad)


@pytest.mark.slow  # a real Redis and worker
async def test_arq_job_ids_at_the_contract_bounds_report_every_state(
        arq_worker: Worker, redis: Redis, server: ServerProcess) -> None:
    import asyncio

    from taskpush_client.arq import enqueue

    ids = ("é" * 200, "任务 " * 66 + "末端", "z" * 200)
    pool = await _arq_pool(redis)
    try:
        with Browser(server) as browser:
            jobs = [await enqueue(pool, "ok", 2, user_id=1, _job_id=job_id) for job_id in ids]
            retried = await enqueue(pool, "flaky", "unused", user_id=1, _job_id="ß" * 200)
            seen = [await asyncio.to_thread(browser.until, job.job_id) for job in jobs]
            again = await asyncio.to_thread(browser.until, retried.job_id)
    finally:
        await pool.aclose()
    for messages in seen:
        assert statuses(messages) == ["pending", "running", "progress", "completed"]
        assert messages[-1]["result"] == {"items": 2}
        assert_browser_order(messages)
    assert again[-1]["status"] == "completed"
    assert "retry 1" in [m["step"] for m in again if m["status"] == "running"]


# ---- taskpush hanging while jobs are sent ----------------------------------------------

@pytest.mark.slow  # a real Redis and worker
def test_rq_enqueue_never_waits_for_taskpush(rq_queue: Any, server: ServerProcess) -> None:
    """taskpush hangs (a proxy holds every request): `enqueue` returns before any answer
    exists; the job's wrapper registers the task itself, and the queued registration
    arrives once taskpush answers (a job nobody runs yet shows `pending`)."""
    from rq import Queue
    from taskpush_client.rq import enqueue, use_client

    from tests.worker_apps import rq_jobs

    nobody = Queue("tp_nobody", connection=rq_queue.connection)
    with HeldProxy(server) as proxy, Browser(server) as browser:
        sender = taskpush_client.Client(proxy.url, API_KEY, wait=60, backoff=0.05)
        use_client(sender)
        try:
            job = enqueue(rq_queue, rq_jobs.ok, 2, user_id=1, task_type="resume_parsing")
            assert not proxy.forwarded.is_set(), "enqueue waited for taskpush"
            waiting = enqueue(nobody, rq_jobs.ok, 2, user_id=1)
            seen = browser.until(job.id)  # registered by the job's wrapper
            proxy.release()
            assert sender.flush(30)
        finally:
            use_client(None)
            sender.close(5)
    assert statuses(seen) == ["pending", "running", "progress", "completed"]
    assert seen[0]["task_type"] == "resume_parsing"  # the same registration as enqueue's
    assert rest(server, "GET", f"/api/task/task/{waiting.id}/status")["status"] == "pending"
    assert history(server, job.id)[-1]["status"] == "completed"


@pytest.mark.slow  # a real Redis and worker
async def test_arq_enqueue_never_waits_for_taskpush(arq_worker: Worker, redis: Redis,
                                                    server: ServerProcess) -> None:
    import asyncio

    from taskpush_client.arq import enqueue, use_client

    pool = await _arq_pool(redis)
    try:
        with HeldProxy(server) as proxy, Browser(server) as browser:
            sender = taskpush_client.Client(proxy.url, API_KEY, wait=60, backoff=0.05)
            use_client(sender)
            try:
                job = await enqueue(pool, "ok", 2, user_id=1, task_type="interview_generation")
                assert not proxy.forwarded.is_set(), "enqueue waited for taskpush"
                waiting = await enqueue(pool, "ok", 2, user_id=1, _queue_name="tp_nobody")
                seen = await asyncio.to_thread(browser.until, job.job_id)
                proxy.release()
                assert await asyncio.to_thread(sender.flush, 30)
            finally:
                use_client(None)
                await asyncio.to_thread(sender.close, 5)
    finally:
        await pool.aclose()
    assert statuses(seen) == ["pending", "running", "progress", "completed"]
    assert seen[0]["task_type"] == "interview_generation"  # the same registration
    status = await asyncio.to_thread(rest, server, "GET", f"/api/task/task/{waiting.job_id}/status")
    assert status["status"] == "pending"
