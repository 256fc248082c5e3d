"""Demo mode: a login that issues tokens for any user id, and simulated jobs.

The simulated jobs use the public in-process producer API (`TaskProgressContext`), so the
demo exercises exactly what users will write. Only routed when no secret/key is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from aiohttp import web

from ..core.auth import parse_user_id
from ..core.errors import BadRequest
from ..core.model import utc_iso
from ..service.notify import TaskProgressContext, task_notification_service
from . import keys
from .rest import ok, read_object, user_identity

DEMO_TOKEN_TTL = 24 * 3600

# kind -> (task_type, steps, duration factor, step at which it fails or None)
KINDS: dict[str, tuple[str, int, float, int | None]] = {
    "success": ("interview_generation", 10, 1.0, None),
    "fail": ("resume_parsing", 10, 0.6, 4),
    "long": ("report_export", 60, 6.0, None),
}

STEP_TEXT = [
    "Preparing data", "Calling the LLM", "Drafting questions", "Checking difficulty",
    "Removing duplicates", "Adding follow-ups", "Ranking", "Formatting", "Reviewing",
    "Saving",
]


class DemoFailure(Exception):
    """The failure the 'fail' demo job raises part way through."""


async def login(request: web.Request) -> web.Response:
    body = await read_object(request)
    user_id = parse_user_id(body.get("user_id"))
    if user_id is None:
        raise BadRequest("user_id must be a non-negative integer")
    verifier = request.app[keys.VERIFIER]
    token = verifier.issue(user_id, DEMO_TOKEN_TTL)
    return ok({"token": token, "user_id": user_id,
               "expires_at": utc_iso(time.time() + DEMO_TOKEN_TTL)})


async def run_job(task_id: str, kind: str, seconds: float) -> dict[str, Any]:
    """A simulated job, written as a user of taskpush would write one."""
    _, steps, factor, fail_at = KINDS[kind]
    delay = seconds * factor / steps
    async with TaskProgressContext(task_id, total_steps=steps) as progress:
        for index in range(steps):
            await asyncio.sleep(delay)
            if fail_at is not None and index + 1 == fail_at:
                raise DemoFailure(f"could not parse page {fail_at}: unreadable scan")
            text = STEP_TEXT[index % len(STEP_TEXT)]
            await progress.increment(f"{text}...")
        progress.set_result({"questions": [f"Question {n}" for n in range(1, 6)],
                             "kind": kind})
    return progress.result


async def start_task(request: web.Request) -> web.Response:
    identity = user_identity(request)
    body = await read_object(request) if request.can_read_body else {}
    kind = body.get("kind", "success")
    if not isinstance(kind, str) or kind not in KINDS:
        raise BadRequest(f"kind must be one of {', '.join(KINDS)}")
    task_type = KINDS[kind][0]
    task_id = f"{task_type}_{uuid.uuid4().hex[:8]}"
    task = await task_notification_service.register_task(
        task_id=task_id, user_id=identity.user_id, task_type=task_type,
        metadata={"demo": True, "kind": kind},
    )
    seconds = request.app[keys.CONFIG].demo_task_seconds
    runners = request.app[keys.DEMO_RUNNERS]
    runner = asyncio.create_task(_quiet(run_job(task_id, kind, seconds)))
    runners.add(runner)
    runner.add_done_callback(runners.discard)
    return ok(task, status=201)


async def _quiet(job: Any) -> None:
    """The job's failure is already recorded on the task; don't log it as unhandled."""
    with contextlib.suppress(DemoFailure):
        await job


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/demo/login", login)
    app.router.add_post("/api/demo/tasks", start_task)
