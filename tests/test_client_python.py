"""The client package (clients/python, `taskpush_client`) against a real taskpush server
subprocess: call shapes sync and async, coalescing, retries and idempotency, cancel, config.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import taskpush_client as tp

from tests.conftest import API_KEY, SECRET
from tests.procs import ServerProcess
from tests.workers_support import Browser, assert_browser_order, history, rest, taskpush_server

pytestmark = pytest.mark.slow  # a real server process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[tp.Client]:
    made = tp.Client(server.url, API_KEY, max_delay=0.05, backoff=0.02)
    yield made
    made.close()


def test_sync_calls_reach_the_browser_in_order(server: ServerProcess, client: tp.Client
                                               ) -> None:
    svc = tp.TaskNotificationService(client)
    with Browser(server) as browser:
        svc.register_task(task_id="s1", user_id=1, task_type="resume_parsing")
        assert svc.notify_started("s1").wait()["ok"]
        svc.notify_progress("s1", progress=50, message="half", step="Step 1/2")
        svc.notify_completed("s1", result={"pages": 3}).wait()
        seen = browser.until("s1")
    assert [m["status"] for m in seen] == ["pending", "running", "progress", "completed"]
    assert seen[2]["progress"] == 50 and seen[2]["step"] == "Step 1/2"
    assert seen[-1]["result"] == {"pages": 3}
    assert_browser_order(seen)


def test_decorator_and_context_on_sync_code(server: ServerProcess, client: tp.Client) -> None:
    svc = tp.TaskNotificationService(client)

    @tp.task_notifier(task_id="d1", user_id=1, task_type="t", service=svc)
    def job() -> list[str]:
        tp.progress(40, "thinking")
        return ["q1"]

    @tp.task_notifier(task_id="d2", user_id=1, task_type="t", service=svc)
    def broken() -> None:
        raise ValueError("bad input")

    assert job() == ["q1"]
    with pytest.raises(ValueError):
        broken()
    with tp.TaskProgressContext("c1", total_steps=2, user_id=1, task_type="t",
                                service=svc) as progress:
        progress.increment("one")
        progress.increment("two")
        progress.set_result({"n": 2})
    client.flush(10)
    d1 = history(server, "d1")
    assert [e["status"] for e in d1] == ["pending", "running", "progress", "completed"]
    d2 = rest(server, "GET", "/api/task/task/d2/status")
    assert (d2["status"], d2["error_type"], d2["error"]) == ("failed", "ValueError", "bad input")
    c1 = rest(server, "GET", "/api/task/task/c1/status")
    assert (c1["status"], c1["result"], c1["progress"]) == ("completed", {"n": 2}, 100)


async def test_decorator_and_context_on_async_code(server: ServerProcess, client: tp.Client
                                                   ) -> None:
    svc = tp.TaskNotificationService(client)

    @tp.task_notifier(task_id="a1", user_id=1, task_type="t", service=svc)
    async def job() -> dict[str, int]:
        await tp.progress(25, "a quarter")
        return {"done": 1}

    assert await job() == {"done": 1}
    async with tp.TaskProgressContext("a2", total_steps=4, user_id=1, task_type="t",
                                      service=svc) as progress:
        await progress.increment("one")
    svc.register_task("a3", 1, "t")
    assert (await svc.notify_started("a3"))["ok"]
    assert (await svc.notify_failed("a3", "boom", "RuntimeError"))["ok"]
    await asyncio.to_thread(client.flush, 10)
    assert [e["status"] for e in history(server, "a1")] == ["pending", "running", "progress",
                                                             "completed"]
    assert rest(server, "GET", "/api/task/task/a1/status")["result"] == {"done": 1}
    assert rest(server, "GET", "/api/task/task/a2/status")["status"] == "completed"
    assert rest(server, "GET", "/api/task/task/a3/status")["error_type"] == "RuntimeError"


def test_a_thousand_progress_calls_cost_few_requests(server: ServerProcess, client: tp.Client
                                                     ) -> None:
    """Coalescing: 1,000 progress calls, spread over time, become a handful of batch
    requests; the last value wins, and the completed state is never merged away."""
    svc = tp.TaskNotificationService(client)
    svc.register_task("many", 1, "t")
    svc.notify_started("many").wait()
    before = client.stats["requests"]
    tick = threading.Event()
    for i in range(1, 1001):
        svc.notify_progress("many", progress=i / 10, message=f"item {i}")
        if i % 100 == 0:
            tick.wait(0.02)  # spread the calls over several flush windows
    svc.notify_completed("many", result={"items": 1000}).wait()
    requests = client.stats["requests"] - before
    assert requests < 50, requests
    events = history(server, "many")
    assert events[-1]["status"] == "completed"
    progress = [e for e in events if e["status"] == "progress"]
    assert 1 <= len(progress) < 50
    assert progress[-1]["progress"] == 100 and progress[-1]["message"] == "item 1000"


def test_user_cancel_raises_task_cancelled(server: ServerProcess, client: tp.Client) -> None:
    svc = tp.TaskNotificationService(client)
    svc.register_task("x1", 1, "t")
    svc.notify_started("x1").wait()
    rest(server, "POST", "/api/task/task/x1/cancel")
    with pytest.raises(tp.TaskCancelled):
        for i in range(10_000):  # a worker's loop: a later call raises
            svc.notify_progress("x1", progress=i / 100).wait()
            threading.Event().wait(0.01)
    assert client.is_cancelled("x1")
    assert svc.notify_cancelled("x1").wait() is not None  # a final report does not raise
    assert history(server, "x1")[-1]["status"] == "cancelled"


def test_unanswered_reports_are_retried_until_taskpush_is_up(tmp_path: Path) -> None:
    """Connection refused is retried (with the same idempotency keys) until the server
    starts; the caller is never blocked past `wait` nor sees an exception."""
    server = ServerProcess(tmp_path, ["--jwt-secret", SECRET, "--api-key", API_KEY])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    late = tp.Client(f"http://127.0.0.1:{port}", API_KEY, max_delay=0.05, wait=0.2,
                     backoff=0.05, max_backoff=0.2)
    try:
        svc = tp.TaskNotificationService(late)
        svc.register_task("late", 1, "t")
        assert svc.notify_started("late").wait() is None  # no answer yet: not an error
        svc.notify_progress("late", progress=70)
        done = svc.notify_completed("late", result=[1, 2])
        server.start(port=port)
        assert late.flush(20)
        assert done.wait(0)["ok"]
        events = [(e["status"], e["progress"]) for e in history(server, "late")]
        assert events == [("pending", 0), ("running", 0), ("progress", 70), ("completed", 100)]
        assert late.stats["requests"] > 2  # refused attempts were retried
    finally:
        late.close(1)
        server.cleanup()


def test_a_lost_answer_is_retried_without_recording_twice(server: ServerProcess) -> None:
    """A proxy forwards the request and cuts the connection before the answer: the client
    retries with the same idempotency key, the server records the event once."""
    proxy = _CuttingProxy(server.port, cuts=1)
    proxied = tp.Client(proxy.url, API_KEY, max_delay=0.0, backoff=0.02)
    try:
        svc = tp.TaskNotificationService(proxied)
        svc.register_task("once", 1, "t").wait()
        proxy.armed.set()
        assert svc.notify_started("once").wait()["ok"]
        assert proxy.cut == 1
    finally:
        proxied.close(5)
        proxy.close()
    assert [e["status"] for e in history(server, "once")] == ["pending", "running"]


@contextlib.contextmanager
def queued_together(client: tp.Client) -> Iterator[None]:
    """Hold the sender's lock while queueing, so what is queued inside is there when the
    sender next takes (as when a busy worker queues while a request is in flight)."""
    with client._lock:
        yield


def test_large_results_arrive_in_batches_the_server_accepts(server: ServerProcess,
                                                             client: tp.Client) -> None:
    """40 `completed` events with 50 KB results (2 MB together, twice the server's
    --max-body-bytes) queued at once: sent as batches of at most 512 KiB, all arrive."""
    tasks = [f"big{n}" for n in range(40)]
    for task in tasks:
        client.register(task, 1, "t")
    assert client.flush(10)
    before = client.stats["requests"]
    with queued_together(client):
        reports = [client.event(task, "completed", result={"blob": "r" * 50_000})
                   for task in tasks]
    assert client.flush(30)
    assert all(report.wait(0)["ok"] for report in reports)
    assert client.stats["requests"] - before == 4 and client.stats["dropped"] == 0
    for task in tasks:
        status = rest(server, "GET", f"/api/task/task/{task}/status")
        assert status["status"] == "completed" and len(status["result"]["blob"]) == 50_000


def test_a_batch_too_large_for_the_server_is_split_not_dropped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A server with --max-body-bytes 64 KiB refuses the client's 270 KB batch whole
    (413): the client halves it until each part is accepted, in order; the one event too
    large even alone is dropped with a warning naming its task, and only it."""
    small = taskpush_server(tmp_path, "--max-body-bytes", "65536")
    client = tp.Client(small.url, API_KEY, max_delay=0.05, backoff=0.02)
    tasks = [f"s{n}" for n in range(10)]
    try:
        for task in [*tasks, "huge"]:
            client.register(task, 1, "t")
        assert client.flush(10)
        before = client.stats["requests"]
        with caplog.at_level(logging.WARNING, "taskpush_client"), queued_together(client):
            for task in tasks:
                client.event(task, "running")
            for task in tasks[:5]:
                client.event(task, "completed", result="c" * 20_000)
            huge = client.event("huge", "completed", result="h" * 70_000)
            for task in tasks[5:]:
                client.event(task, "completed", result="c" * 20_000)
        assert client.flush(30)
        assert huge.wait(0) is None
        assert client.stats["dropped"] == 1
        assert client.stats["requests"] - before > 3  # refused whole, then split
        for task in tasks:
            assert [e["status"] for e in history(small, task)] == ["pending", "running",
                                                                   "completed"]
        assert [e["status"] for e in history(small, "huge")] == ["pending"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "huge" in warnings[0] and "413" in warnings[0]
    finally:
        client.close(1)
        small.cleanup()


def test_an_event_that_is_not_json_does_not_take_its_batch_down(
        server: ServerProcess, client: tp.Client, caplog: pytest.LogCaptureFixture) -> None:
    """NaN progress, a lone surrogate, a Python object in a result: each such event is
    dropped alone with a warning naming its task; so is a result beyond the server's
    --max-json-bytes (refused by the server within the batch); the rest arrives."""
    for task in ("j1", "j2", "j3", "j4", "j5", "j6"):
        client.register(task, 1, "t")
    assert client.flush(10)
    with caplog.at_level(logging.WARNING, "taskpush_client"), queued_together(client):
        client.event("j1", "running")
        client.event("j2", "progress", progress=float("nan"))
        client.event("j3", "running", message="\ud800")
        client.event("j4", "completed", result={"when": object()})
        client.event("j1", "completed", result=[1])
        client.event("j6", "completed", result="x" * 70_000)  # > 64 KiB, < 1 MiB
        client.event("j5", "completed")
    assert client.flush(10)
    assert [e["status"] for e in history(server, "j1")] == ["pending", "running", "completed"]
    assert [e["status"] for e in history(server, "j5")] == ["pending", "completed"]
    for task in ("j2", "j3", "j4"):
        assert [e["status"] for e in history(server, task)] == ["pending"]
        assert f"task {task} not sent: not JSON" in caplog.text
    assert client.stats["dropped"] == 3
    assert [e["status"] for e in history(server, "j6")] == ["pending"]
    assert "completed event of task j6 refused: 413" in caplog.text


@pytest.mark.parametrize("status", [503, 429, 502, 408])
def test_overloaded_answers_are_retried(server: ServerProcess, status: int) -> None:
    """A front that answers `status` twice (as a proxy or an overloaded taskpush would),
    then passes requests through: the report arrives once."""
    front = _FlakyFront(server.url, status, failures=2)
    flaky = tp.Client(front.url, API_KEY, max_delay=0.0, backoff=0.02)
    task = f"busy{status}"
    try:
        svc = tp.TaskNotificationService(flaky)
        assert svc.register_task(task, 1, "t").wait()["status"] == "pending"
        assert svc.notify_started(task).wait()["ok"]
    finally:
        flaky.close(5)
        front.close()
    assert front.refused == 2 and front.passed == 2
    assert [e["status"] for e in history(server, task)] == ["pending", "running"]


def test_client_errors_are_not_retried_nor_raised(server: ServerProcess,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    wrong = tp.Client(server.url, "wrong-key", max_delay=0.0, backoff=0.02)
    try:
        with caplog.at_level(logging.WARNING, "taskpush_client"):
            assert wrong.register("nope", 1, "t").wait() is None
            assert wrong.event("nope", "running").wait() is None
        assert wrong.stats["requests"] == 2  # 401 each: not retried
        assert "401" in caplog.text and "wrong-key" not in caplog.text
        assert "wrong-key" not in repr(wrong)
    finally:
        wrong.close(1)


def test_configuration_from_the_environment(server: ServerProcess,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TASKPUSH_URL", server.url)
    monkeypatch.setenv("TASKPUSH_API_KEY", API_KEY)
    from_env = tp.Client(max_delay=0.0)
    assert from_env.register("env1", 1, "t").wait()["status"] == "pending"
    from_env.close()
    monkeypatch.delenv("TASKPUSH_URL")
    monkeypatch.delenv("TASKPUSH_API_KEY")
    with caplog.at_level(logging.WARNING, "taskpush_client"):
        nothing = tp.Client()
        assert nothing.register("env2", 1, "t").wait() is None  # dropped, not raised
    assert "TASKPUSH_URL" in caplog.text


class _FlakyFront:
    """An HTTP server on loopback: the first `failures` requests get `status` (with
    Retry-After: 0), the rest are passed to `target`."""

    def __init__(self, target: str, status: int, failures: int) -> None:
        front = self
        self.refused = self.passed = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if front.refused < failures:
                    front.refused += 1
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                front.passed += 1
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("content-type", "x-api-key")}
                request = urllib.request.Request(target + self.path, data=body,  # noqa: S310
                                                 headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
                    answer = resp.read()
                    self.send_response(resp.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class _CuttingProxy:
    """A TCP proxy on loopback: once armed, for the first `cuts` connections it forwards
    the request and closes as soon as the server starts answering (committed, answer
    lost)."""

    def __init__(self, target_port: int, cuts: int) -> None:
        self.target_port, self.cuts, self.cut = target_port, cuts, 0
        self.armed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _handle(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump(src: socket.socket, dst: socket.socket, cut: bool) -> None:
            try:
                while data := src.recv(65536):
                    if cut and self.armed.is_set() and self.cut < self.cuts:
                        self.cut += 1
                        return  # the finally below closes both sides
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (conn, upstream):
                    _close(sock)

        threading.Thread(target=pump, args=(conn, upstream, False), daemon=True).start()
        pump(upstream, conn, True)

    def close(self) -> None:
        self.listener.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # shutdown wakes the other pump's recv and the peer
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()

