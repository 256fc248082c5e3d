"""The Celery app the worker-integration tests run in a real worker process.

The broker and the result backend are the test's Redis (unix socket from TP_REDIS_SOCKET);
acks_late with reject-on-worker-lost, so a pool process killed mid-task has its task
redelivered. `install(app)` is the only taskpush line.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery
from taskpush_client import progress
from taskpush_client.celery import install

REDIS = f"redis+socket://{os.environ.get('TP_REDIS_SOCKET', '/nonexistent')}"

app = Celery("tp_tests", broker=REDIS, backend=REDIS)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_hijack_root_logger=False,
)
install(app)


@app.task
def ok(steps: int) -> dict[str, Any]:
    for i in range(1, steps + 1):
        progress(100 * i / steps, f"item {i}", f"Step {i}/{steps}")
        time.sleep(0.02)
    return {"items": steps}


@app.task
def boom() -> None:
    progress(10, "about to fail")
    raise ValueError("the input was bad")


@app.task
def until_file(path: str, pidfile: str = "") -> str:
    """Reports progress until `path` exists (the test's signal); writes its pid first."""
    if pidfile:
        Path(pidfile).write_text(str(os.getpid()))
    i = 0
    while not Path(path).exists():
        i += 1
        progress(min(i, 99), f"waiting {i}")
        time.sleep(0.05)
    return "done"


@app.task(bind=True, max_retries=3)
def flaky(self: Any, marker: str) -> str:
    """Fails once (retried with a countdown), then succeeds."""
    if not Path(marker).exists():
        Path(marker).write_text("tried")
        raise self.retry(exc=ConnectionError("upstream down"), countdown=0.2)
    return "second time lucky"


@app.task
def member(n: int) -> int:
    time.sleep(0.05 * n)
    return n * n


@app.task
def total(values: list[int]) -> int:
    return sum(values)
