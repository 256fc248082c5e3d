"""examples/fastapi_celery: the FastAPI endpoint sends a Celery task for the logged-in user;
a real Celery worker runs it; the user's WebSocket sees it through to its questions."""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import taskpush_client

from tests.conftest import API_KEY, SECRET
from tests.procs import ServerProcess, free_port
from tests.workers_support import (
    Browser,
    Redis,
    Worker,
    assert_browser_order,
    history,
    redis_server,
    taskpush_server,
    worker_env,
)

pytestmark = pytest.mark.slow  # Redis and a Celery worker


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    yield from redis_server(tmp_path)


# The port the browser test serves the FastAPI app on (the origin taskpush allows by CORS).
APP_PORT = free_port()
APP_ORIGIN = f"http://127.0.0.1:{APP_PORT}"


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, redis: Redis
          ) -> Iterator[tuple[ServerProcess, Any]]:
    """taskpush, Redis, a Celery worker and the FastAPI app (in this process); the worker's
    seconds per step (EXAMPLE_STEP_SECONDS) come from the test's parameter (default 0.01)."""
    step_seconds = getattr(request, "param", "0.01")
    server = taskpush_server(tmp_path, "--cors-origins", APP_ORIGIN)
    broker = f"redis+socket://{redis.socket}"
    old = {k: os.environ.get(k) for k in ("BROKER_URL", "TASKPUSH_JWT_SECRET",
                                          "TASKPUSH_PUBLIC_URL")}
    os.environ.update(BROKER_URL=broker, TASKPUSH_JWT_SECRET=SECRET,
                      TASKPUSH_PUBLIC_URL=server.url)
    sys.modules.pop("examples.fastapi_celery.tasks", None)
    sys.modules.pop("examples.fastapi_celery.main", None)
    main = importlib.import_module("examples.fastapi_celery.main")
    client = taskpush_client.configure(server.url, API_KEY, max_delay=0.05)
    worker = Worker(tmp_path, "example", [
        sys.executable, "-m", "celery", "-A", "examples.fastapi_celery.tasks", "worker",
        "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        worker_env(server, BROKER_URL=broker, EXAMPLE_STEP_SECONDS=step_seconds)).start()
    try:
        yield server, main
    finally:
        worker.stop()
        client.close(2)
        gc.collect()
        server.cleanup()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Newer Starlette asks for `httpx2` in its TestClient; httpx still works.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_endpoint_sends_the_task_and_the_page_sees_it_finish(
        stack: tuple[ServerProcess, Any]) -> None:
    from fastapi.testclient import TestClient

    server, main = stack
    with TestClient(main.app) as http, Browser(server, user_id=7) as browser:
        assert http.post("/interviews", json={"interview_id": 1}).status_code == 401
        token = http.post("/login", json={"user_id": 7}).json()["token"]
        sent = http.post("/interviews", json={"interview_id": 42, "count": 3},
                         headers={"Authorization": f"Bearer {token}"})
        assert sent.status_code == 200, sent.text
        seen = browser.until(sent.json()["task_id"])
        page = http.get("/").text
    assert [m["status"] for m in seen][:2] == ["pending", "running"]
    assert "progress" in [m["status"] for m in seen]
    assert seen[-1]["status"] == "completed"
    assert seen[-1]["result"]["questions"][-1] == "Question 3 for interview 42"
    assert_browser_order(seen)
    assert "/static/taskpush.js" in page and "TaskNotificationClient" in page


@pytest.fixture
async def chromium_browser() -> Any:
    from tests.jsenv import chromium

    async for launched in chromium():
        yield launched


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
@pytest.mark.parametrize("stack", ["2"], indirect=True)  # 5 steps of 2 s: time to cancel
async def test_the_page_cancels_a_running_task(stack: tuple[ServerProcess, Any],
                                               chromium_browser: Any) -> None:
    """In Chromium: log in, generate, press the task's Cancel button. taskpush shows it
    cancelled at once, the worker's next progress() raises TaskCancelled (the task stops
    before its questions), and the button is gone."""
    import asyncio

    from aiohttp import web
    from fastapi.testclient import TestClient
    from playwright.async_api import expect

    server, main = stack
    errors: list[str] = []
    with TestClient(main.app) as http:
        async def serve_app(request: web.Request) -> web.Response:  # the app, over HTTP
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() in ("authorization", "content-type")}
            answer = await asyncio.to_thread(http.request, request.method, request.path_qs,
                                             content=await request.read(), headers=headers)
            return web.Response(status=answer.status_code, body=answer.content,
                                content_type=answer.headers["content-type"].split(";")[0])

        front = web.Application()
        front.router.add_route("*", "/{tail:.*}", serve_app)
        runner = web.AppRunner(front, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", APP_PORT).start()
        try:
            page = await chromium_browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: print("console:", msg.text))  # shown on failure
            await page.goto(f"{APP_ORIGIN}/")
            await page.fill("#user", "7")
            await page.click("#login")
            await expect(page.locator("#start")).to_be_enabled(timeout=30_000)
            await page.click("#start")
            box = page.locator(".task")
            await expect(box.locator("b")).to_have_text("progress", timeout=30_000)
            await box.locator("button.cancel").click()
            await expect(box.locator("b")).to_have_text("cancelled", timeout=30_000)
            await expect(box.locator("button.cancel")).to_have_count(0)
            task_id = (await box.get_attribute("id") or "").removeprefix("task-")
            await page.close()
        finally:
            await runner.cleanup()
    from examples.fastapi_celery.tasks import app as celery_app

    outcome = celery_app.AsyncResult(task_id)
    await asyncio.to_thread(outcome.get, timeout=30, propagate=False)
    assert type(outcome.result).__name__ == "TaskCancelled"  # stopped by its progress()
    events = await asyncio.to_thread(history, server, task_id, 7)
    assert events[-1]["status"] == "cancelled"
    assert "completed" not in [e["status"] for e in events]
    assert errors == []
