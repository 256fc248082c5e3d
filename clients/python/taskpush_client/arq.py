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

enqueue -> pending; the job
starts -> running (arq's `job_try` > 1 shows as a retry in `step`); returns -> completed
with the JSON result; raises -> failed with type and message; `arq.worker.Retry` ->
running with the retry in `step`; TaskCancelled, an abort (`Job.abort()`) or a timeout's
cancellation -> cancelled. State changes carry idempotency keys derived from the job id
(`keys.event_key`: printable ASCII for any id). The user travels in the job's
keyword argument `taskpush_user_id`, which the wrapper removes before calling the
function.
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
    await _svc().register_task(job_id, user_id, task_type or function)
    return await redis.enqueue_job(function, *args, _job_id=job_id,
                                   **{USER_KWARG: user_id}, **kwargs)


def tracked(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap an arq job function so that its lifecycle is reported (when it was sent with
    a user; otherwise it runs as it is)."""

    @functools.wraps(fn)
    async def wrapper(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        user = kwargs.pop(USER_KWARG, None)
        if user is None:
            return await fn(ctx, *args, **kwargs)
        svc = _svc()
        task_id = ctx["job_id"]
        retry = max(int(ctx.get("job_try", 1)) - 1, 0)
        svc.register_task(task_id, user, fn.__name__)  # no-op when enqueue registered it
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
