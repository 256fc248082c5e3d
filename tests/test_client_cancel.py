"""A user's cancel reaches the running task at once: the client watches the tasks its
process runs (the producer key's long poll of their status), so the very next `progress()`
after a cancel raises TaskCancelled, and running code can check without reporting. Against
a real taskpush server subprocess; the user cancels over REST."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import taskpush_client as tp

from tests.conftest import API_KEY
from tests.fake_front import Front
from tests.procs import ServerProcess
from tests.workers_support import history, rest


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tp.Client]:
    made = tp.Client(server.url, API_KEY, max_delay=0.05, backoff=0.02)
    yield made
    made.close()


def test_the_next_progress_after_a_cancel_raises(server: ServerProcess, client: tp.Client
                                                 ) -> None:
    """A decorated job reports, the user cancels while it works on its next step (no report
    in between); the job's next `progress()` raises, and the task ends cancelled."""
    svc = tp.TaskNotificationService(client)
    between = threading.Event()
    seen: dict[str, Any] = {}

    @tp.task_notifier(task_id="c1", user_id=1, task_type="t", service=svc)
    def job() -> str:
        tp.progress(10, "step 1")
        assert client.flush(10)  # step 1 reported and answered: no report is pending
        seen["before"] = tp.is_cancelled()
        between.set()
        seen["learnt"] = client.wait_cancelled("c1", 20)  # the step's work
        seen["checked"] = tp.is_cancelled()
        tp.progress(20, "step 2")  # raises
        return "not reached"

    def run() -> None:
        try:
            job()
        except Exception as exc:
            seen["raised"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    assert between.wait(20)
    rest(server, "POST", "/api/task/task/c1/cancel")
    worker.join(30)
    assert not worker.is_alive()
    assert seen["before"] is False and seen["learnt"] is True and seen["checked"] is True
    assert isinstance(seen["raised"], tp.TaskCancelled)
    assert client.flush(10)
    statuses = [e["status"] for e in history(server, "c1")]
    assert statuses[-1] == "cancelled" and "completed" not in statuses
    assert [e["progress"] for e in history(server, "c1") if e["status"] == "progress"
            ] == [10]  # step 2 was never reported


def test_check_cancelled_without_reporting(server: ServerProcess, client: tp.Client) -> None:
    """The integrations' way (set_current): `check_cancelled()` raises once the user
    cancelled, with no report made; outside a task it does nothing."""
    svc = tp.TaskNotificationService(client)
    tp.check_cancelled()
    assert tp.is_cancelled() is False
    svc.register_task("c2", 1, "t")
    svc.notify_started("c2").wait()
    token = tp.api.set_current("c2", svc)
    try:
        tp.check_cancelled()
        before = client.stats["requests"]
        rest(server, "POST", "/api/task/task/c2/cancel")
        assert client.wait_cancelled("c2", 20)
        assert client.stats["requests"] == before  # learnt without a report
        with pytest.raises(tp.TaskCancelled):
            tp.check_cancelled()
        with pytest.raises(tp.TaskCancelled):
            tp.progress(50)
    finally:
        tp.api.reset_current(token)
    assert svc.notify_cancelled("c2").wait() is not None  # a final report never raises
    assert client._watched == {}


async def test_an_async_job_learns_of_the_cancel_at_once(server: ServerProcess,
                                                         client: tp.Client) -> None:
    svc = tp.TaskNotificationService(client)
    between = asyncio.Event()

    @tp.task_notifier(task_id="c3", user_id=1, task_type="t", service=svc)
    async def job() -> None:
        await tp.progress(10)
        assert await asyncio.to_thread(client.flush, 10)  # no report is pending
        between.set()
        assert await asyncio.to_thread(client.wait_cancelled, "c3", 20)
        await tp.progress(20)  # raises

    running = asyncio.ensure_future(job())
    await asyncio.wait_for(between.wait(), 20)
    await asyncio.to_thread(rest, server, "POST", "/api/task/task/c3/cancel")
    with pytest.raises(tp.TaskCancelled):
        await asyncio.wait_for(running, 30)
    await asyncio.to_thread(client.flush, 10)
    assert rest(server, "GET", "/api/task/task/c3/status")["status"] == "cancelled"


def test_a_taskpush_refusing_the_status_read_still_cancels_by_the_next_report(
        server: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    """A server that refuses the producer key's status read (401, as one older than it
    does): one warning, the watcher asks no more, and the cancel still arrives as the
    answer to the task's next report, after which progress() raises."""
    front = Front(server.url, get_status=401)
    client = tp.Client(front.url, API_KEY, max_delay=0.0, backoff=0.02)
    svc = tp.TaskNotificationService(client)
    warned = _LogSeen("refused the producer key")
    logging.getLogger("taskpush_client").addHandler(warned)
    try:
        svc.register_task("c4", 1, "t")
        svc.notify_started("c4").wait()
        with caplog.at_level(logging.WARNING, "taskpush_client"):
            token = tp.api.set_current("c4", svc)
            try:
                assert warned.seen.wait(20)
                rest(server, "POST", "/api/task/task/c4/cancel")
                with pytest.raises(tp.TaskCancelled):
                    for i in range(10_000):
                        svc.notify_progress("c4", progress=i / 100)
                        client.flush(10)
            finally:
                tp.api.reset_current(token)
            token = tp.api.set_current("c5", svc)  # not asked: the watcher is off
            tp.api.reset_current(token)
            assert client.flush(10)
    finally:
        logging.getLogger("taskpush_client").removeHandler(warned)
        client.close(1)
        front.close()
    assert front.gets == 1
    assert "refused the producer key" in caplog.text and API_KEY not in caplog.text


class _LogSeen(logging.Handler):
    """Sets `seen` when a record containing `text` is logged (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()
