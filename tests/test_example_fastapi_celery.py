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
from tests.procs import ServerProcess
from tests.workers_support import (
    Browser,
    Redis,
    Worker,
    assert_browser_order,
    redis_server,
    taskpush_server,
    worker_env,
)

pytestmark = pytest.mark.slow  # Redis and a Celery worker


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    yield from redis_server(tmp_path)


@pytest.fixture
def stack(tmp_path: Path, redis: Redis) -> Iterator[tuple[ServerProcess, Any]]:
    server = taskpush_server(tmp_path)
    broker = f"redis+socket://{redis.socket}"
    old = {k: os.environ.get(k) for k in ("BROKER_URL", "TASKPUSH_JWT_SECRET")}
    os.environ.update(BROKER_URL=broker, TASKPUSH_JWT_SECRET=SECRET)
    sys.modules.pop("examples.fastapi_celery.tasks", None)
    sys.modules.pop("examples.fastapi_celery.main", None)
    main = importlib.import_module("examples.fastapi_celery.main")
    client = taskpush_client.configure(server.url, API_KEY, max_delay=0.05)
    worker = Worker(tmp_path, "example", [
        sys.executable, "-m", "celery", "-A", "examples.fastapi_celery.tasks", "worker",
        "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        worker_env(server, BROKER_URL=broker, EXAMPLE_STEP_SECONDS="0.01")).start()
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
