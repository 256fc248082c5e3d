"""Celery with `taskpush_client.celery.install(app)`: a real Redis, a real Celery worker
(prefork, acks_late), a real taskpush server, and a WebSocket client that sees what the
user's browser sees.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import taskpush_client
from taskpush_client.celery import for_user, install, send_tracked

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

pytestmark = pytest.mark.slow  # Redis and Celery worker processes

FINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def app(redis: Redis, server: ServerProcess, workdir: Path) -> Iterator[Any]:
    """The test process publishes through the same app the worker runs."""
    os.environ["TP_REDIS_SOCKET"] = str(redis.socket)
    module = importlib.import_module("tests.worker_apps.celery_app")
    client = taskpush_client.configure(server.url, API_KEY, max_delay=0.05, backoff=0.05)
    worker = Worker(workdir, "celery", [
        sys.executable, "-m", "celery", "-A", "tests.worker_apps.celery_app", "worker",
        "-P", "prefork", "-c", "2", "-l", "INFO", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-n", "tp@localhost"],
        worker_env(server, TP_REDIS_SOCKET=str(redis.socket))).start()
    yield module
    worker.stop()
    client.close(2)
    gc.collect()  # AsyncResults unsubscribe from the result backend while Redis is still up
    os.environ.pop("TP_REDIS_SOCKET", None)


def statuses(seen: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for message in seen:
        if not out or out[-1] != message["status"]:
            out.append(message["status"])
    return out


def test_published_started_progress_completed(app: Any, server: ServerProcess) -> None:
    with Browser(server) as browser:
        result = app.ok.apply_async((5,), headers=for_user(1))
        seen = browser.until(result.id)
    assert statuses(seen) == ["pending", "running", "progress", "completed"]
    assert seen[-1]["result"] == {"items": 5} and seen[-1]["progress"] == 100
    assert seen[0]["task_type"] == "tests.worker_apps.celery_app.ok"
    assert_browser_order(seen)
    assert result.get(timeout=10) == {"items": 5}


def test_a_task_sent_without_a_user_is_not_reported(app: Any, server: ServerProcess) -> None:
    result = app.ok.apply_async((1,))
    assert result.get(timeout=20) == {"items": 1}
    with pytest.raises(Exception, match="404"):
        rest(server, "GET", f"/api/task/task/{result.id}/status")


def test_raised_is_failed_with_the_exception(app: Any, server: ServerProcess) -> None:
    with Browser(server) as browser:
        result = app.boom.apply_async(headers=for_user(1))
        seen = browser.until(result.id)
    assert statuses(seen) == ["pending", "running", "progress", "failed"]
    assert seen[-1]["error_type"] == "ValueError"
    assert seen[-1]["error"] == "the input was bad"
    assert_browser_order(seen)


def test_retried_is_running_again_with_the_retry_in_step(app: Any, server: ServerProcess,
                                                         tmp_path: Path) -> None:
    with Browser(server) as browser:
        result = app.flaky.apply_async((str(tmp_path / "marker"),), headers=for_user(1))
        seen = browser.until(result.id)
    assert seen[-1]["status"] == "completed" and seen[-1]["result"] == "second time lucky"
    assert "retry 1" in [m["step"] for m in seen if m["status"] == "running"]
    assert_browser_order(seen)


def test_rest_cancel_stops_the_running_task(app: Any, server: ServerProcess,
                                            tmp_path: Path) -> None:
    with Browser(server) as browser:
        result = app.until_file.apply_async((str(tmp_path / "never"),), headers=for_user(1))
        browser.until(result.id, lambda m: m["status"] == "progress")
        rest(server, "POST", f"/api/task/task/{result.id}/cancel")
        seen = browser.until(result.id)
        result.get(timeout=20, propagate=False)  # the loop ended: progress() raised
    assert seen[-1]["status"] == "cancelled"
    assert result.state == "FAILURE" and type(result.result).__name__ == "TaskCancelled"
    assert_browser_order(seen)
    assert history(server, result.id)[-1]["status"] == "cancelled"


def test_revoked_is_cancelled(app: Any, server: ServerProcess, tmp_path: Path) -> None:
    with Browser(server) as browser:
        result = app.until_file.apply_async((str(tmp_path / "never"),), headers=for_user(1))
        browser.until(result.id, lambda m: m["status"] == "progress")
        result.revoke(terminate=True, signal="SIGKILL")
        seen = browser.until(result.id)
    assert seen[-1]["status"] == "cancelled"
    assert_browser_order(seen)


def test_kill_9_mid_task_and_redelivery_end_in_one_final_state(
        app: Any, server: ServerProcess, tmp_path: Path) -> None:
    """The pool process running the task dies with SIGKILL; acks_late + reject on worker
    lost puts the message back, another pool process runs it again. The user sees one
    running/progress story and exactly one final state."""
    go, pidfile = tmp_path / "go", tmp_path / "pid"
    with Browser(server) as browser:
        result = app.until_file.apply_async((str(go), str(pidfile)), headers=for_user(1))
        browser.until(result.id, lambda m: m["status"] == "progress")
        first = int(pidfile.read_text())
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text() not in ("", str(first))):
            assert time.monotonic() < deadline, "the task was not redelivered"
            time.sleep(0.05)
        go.write_text("go")
        seen = browser.until(result.id)
        assert result.get(timeout=20) == "done"
    assert seen[-1]["status"] == "completed" and seen[-1]["result"] == "done"
    assert_browser_order(seen)
    events = history(server, result.id)
    assert [e["status"] for e in events].count("completed") == 1
    assert sum(e["status"] in FINAL for e in events) == 1
    assert [e["status"] for e in events].count("running") == 1  # the rerun's start is a replay


def test_taskpush_down_while_a_task_runs(app: Any, server: ServerProcess,
                                         tmp_path: Path) -> None:
    """The task is not failed by it; its final state arrives once taskpush is back."""
    go = tmp_path / "go"
    with Browser(server) as browser:
        result = app.until_file.apply_async((str(go),), headers=for_user(1))
        browser.until(result.id, lambda m: m["status"] == "progress")
        server.stop()
        go.write_text("go")
        assert result.get(timeout=30) == "done"  # finished while taskpush was down
        server.start(port=server.port)
        seen = browser.until(result.id)
    assert seen[-1]["status"] == "completed" and seen[-1]["result"] == "done"
    assert_browser_order(seen)


def test_group_members_and_a_parent_with_the_share_finished(app: Any, server: ServerProcess
                                                            ) -> None:
    from celery import group

    with Browser(server) as browser:
        result, parent = send_tracked(group(app.member.s(i) for i in (1, 2, 3)), 1)
        seen = browser.until(parent)
        assert [r.get(timeout=20) for r in result.results] == [1, 4, 9]
        for member in result.results:
            done = browser.until(member.id)[-1]
            assert (done["status"], done["result"]) == ("completed", member.result)
    assert seen[-1]["status"] == "completed"
    assert seen[-1]["result"] == {"members": 3, "failed": 0}
    shares = [m["progress"] for m in seen if m["status"] == "progress"]
    assert shares and shares == sorted(shares) and shares[-1] == 100
    assert_browser_order(seen)


def test_chord_header_and_body_under_one_parent(app: Any, server: ServerProcess) -> None:
    from celery import chord

    with Browser(server) as browser:
        result, parent = send_tracked(chord([app.member.s(i) for i in (1, 2)], app.total.s()),
                                      1, task_type="chord")
        assert result.get(timeout=20) == 5
        seen = browser.until(parent)
    assert seen[-1]["status"] == "completed"
    assert seen[-1]["result"] == {"members": 3, "failed": 0}


# Task ids at the bounds the server accepts (200 printable characters, any script): every
# state change's idempotency key must be one the server takes too.
BOUND_IDS = ("é" * 200, "任务 " * 66 + "末端", "x" * 200)


@pytest.mark.slow  # a real Redis and worker
def test_task_ids_at_the_contract_bounds_report_every_state(app: Any, server: ServerProcess
                                                            ) -> None:
    assert all(len(task_id) <= 200 and task_id.isprintable() for task_id in BOUND_IDS)
    with Browser(server) as browser:
        done = [app.ok.apply_async((2,), task_id=task_id, headers=for_user(1))
                for task_id in BOUND_IDS]
        failed = app.boom.apply_async(task_id="ü" * 199 + "!", headers=for_user(1))
        seen = [browser.until(result.id) for result in done]
        bad = browser.until(failed.id)
    for messages in seen:
        assert statuses(messages) == ["pending", "running", "progress", "completed"]
        assert messages[-1]["result"] == {"items": 2}
        assert_browser_order(messages)
    assert statuses(bad) == ["pending", "running", "progress", "failed"]
    assert bad[-1]["error_type"] == "ValueError"


@pytest.mark.slow  # a real Redis and worker
def test_sending_never_waits_for_taskpush(app: Any, server: ServerProcess) -> None:
    """taskpush hangs (a proxy holds every request): `apply_async` and `send_tracked`
    return before any answer exists; the worker registers what it runs, and the queued
    registrations arrive once taskpush answers (a task nobody runs yet shows `pending`)."""
    from celery import group

    with HeldProxy(server) as proxy, Browser(server) as browser:
        sender = taskpush_client.Client(proxy.url, API_KEY, wait=60, backoff=0.05)
        install(app.app, client=sender)
        try:
            ran = app.ok.apply_async((2,), headers=for_user(1))
            assert not proxy.forwarded.is_set(), "apply_async waited for taskpush"
            waiting = app.ok.apply_async((2,), queue="tp_nobody", headers=for_user(1))
            members, parent = send_tracked(group(app.member.s(i) for i in (1, 2)), 1)
            assert not proxy.forwarded.is_set(), "send_tracked waited for taskpush"
            seen = browser.until(ran.id)  # the worker registered it itself
            parents = browser.until(parent)
            proxy.release()
            assert sender.flush(30)
        finally:
            install(app.app)  # back to the default client
            sender.close(5)
    assert statuses(seen) == ["pending", "running", "progress", "completed"]
    assert parents[-1]["result"] == {"members": 2, "failed": 0}
    assert rest(server, "GET", f"/api/task/task/{waiting.id}/status")["status"] == "pending"
    assert [r.get(timeout=20) for r in members.results] == [1, 4]
