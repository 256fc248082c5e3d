"""Job functions the RQ tests run in a real `rq worker`: plain functions, no taskpush code
but `progress()`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from taskpush_client import progress


def ok(steps: int) -> dict[str, Any]:
    for i in range(1, steps + 1):
        progress(100 * i / steps, f"item {i}", f"Step {i}/{steps}")
        time.sleep(0.02)
    return {"items": steps}


def boom() -> None:
    progress(10, "about to fail")
    raise ValueError("the input was bad")


def until_file(path: str, pidfile: str = "") -> str:
    if pidfile:
        Path(pidfile).write_text(str(os.getpid()))
    i = 0
    while not Path(path).exists():
        i += 1
        progress(min(i, 99), f"waiting {i}")
        time.sleep(0.05)
    return "done"


def flaky(marker: str) -> str:
    if not Path(marker).exists():
        Path(marker).write_text("tried")
        raise ConnectionError("upstream down")
    return "second time lucky"
