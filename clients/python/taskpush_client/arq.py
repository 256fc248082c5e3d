"""arq: jobs sent with `enqueue(redis, "name", ..., user_id=...)` and run by a `tracked`
function report their lifecycle.

    from taskpush_client.arq import enqueue, tracked

    @tracked
    async def generate(ctx, n):           # ctx and arguments as arq passes them
        await progress(50, "half way")     # taskpush_client.progress (await optional)
        return {"questions": n}

    class WorkerSettings:
        functions = [generate]

    await enqueue(redis, "generate", 10, user_id=user.id)   # instead of redis.enqueue_job

enqueue -> pending (queued, never awaited: enqueueing does not wait on taskpush; the
wrapper registers the task again, with the same type, when the job starts); the job
starts -> running (arq's `job_try` > 1 shows as a retry in `step`); returns -> completed
with the JSON result; raises -> failed with type and message; `arq.worker.Retry` ->
running with the retry in `step`; TaskCancelled, an abort (`Job.abort()`) or a timeout's
cancellation -> cancelled. State changes carry idempotency keys derived from the job id
(`keys.event_key`: printable ASCII for any id). The user travels in the job's
keyword arguments `taskpush_user_id` and `taskpush_task_type`, which the wrapper removes
before calling the function.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .api import TaskNotificationService, reset_current, set_current
from .client import Client
from .keys import event_key, task_digest

USER_KWARG = "taskpush_user_id"
TYPE_KWARG = "taskpush_task_type"
_service: dict[str, TaskNotificationService] = {"default": TaskNotificationService()}


def use_client(client: Client | None) -> None:
    _service["default"] = TaskNotificationService(client)


def _svc() -> TaskNotificationService:
    return _service["default"]


async def enqueue(redis: Any, function: str, *args: Any, user_id: int | str,
                  task_type: str | None = None, **kwargs: Any) -> Any:
    """`redis.enqueue_job(function, *args, **kwargs)` reported to `user_id` (the job id,
    `_job_id` or a fresh one, is the task id)."""
    job_id = kwargs.pop("_job_id", None) or uuid.uuid4().hex
    name = task_type or function
    _svc().register_task(job_id, user_id, name)  # queued: never waits on taskpush
    return await redis.enqueue_job(function, *args, _job_id=job_id,
                                   **{USER_KWARG: user_id, TYPE_KWARG: name}, **kwargs)


def tracked(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap an arq job function so that its lifecycle is reported (when it was sent with
    a user; otherwise it runs as it is)."""

    @functools.wraps(fn)
    async def wrapper(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        user = kwargs.pop(USER_KWARG, None)
        task_type = kwargs.pop(TYPE_KWARG, None) or fn.__name__
        if user is None:
            return await fn(ctx, *args, **kwargs)
        svc = _svc()
        task_id = ctx["job_id"]
        retry = max(int(ctx.get("job_try", 1)) - 1, 0)
        svc.register_task(task_id, user, task_type)  # no-op when enqueue's registration came
        token = set_current(task_id, svc)
        try:
            await svc.notify_started(task_id, step=f"retry {retry}" if retry else None,
                                     key=event_key(task_id, "running", retry))
            result = await fn(ctx, *args, **kwargs)
        except BaseException as exc:
            if type(exc).__name__ == "Retry" and type(exc).__module__.startswith("arq"):
                await svc.notify_started(task_id, message="retrying", step=f"retry {retry + 1}",
                                         key=event_key(task_id, "retry", retry + 1))
            else:
                await _shielded(svc.finish(task_id, exc, key_prefix=task_digest(task_id)))
            raise
        finally:
            reset_current(token)
        await svc.finish(task_id, None, result, key_prefix=task_digest(task_id))
        return result

    return wrapper


async def _shielded(report: Any) -> None:
    """Wait for a final report even while the job is being cancelled."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(asyncio.ensure_future(_await(report)))


async def _await(report: Any) -> Any:
    return await report
