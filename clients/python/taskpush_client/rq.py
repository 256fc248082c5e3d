"""RQ: jobs sent with `enqueue(queue, fn, ..., user_id=...)` report their lifecycle.

    from taskpush_client.rq import enqueue
    job = enqueue(queue, parse_resume, resume_id, user_id=user.id)   # instead of queue.enqueue

    def parse_resume(resume_id):          # a plain RQ job function, unchanged
        progress(50, "reading pages")      # taskpush_client.progress

RQ has no publish hook and its job callbacks run only after the job (in the work horse,
which then exits), so the job runs inside `run`, a wrapper the helper enqueues in its place:
enqueue -> pending (queued, never waited for: enqueueing does not wait on taskpush; the
wrapper registers the task again before it starts, from the user and type in the job's
meta); the wrapper starts -> running (a retry in `step`); returns ->
completed with the JSON result; raises -> failed, or `running` with the retry in `step`
when RQ will retry it (`Retry(max=...)` and retries left), or cancelled on TaskCancelled.
A work horse killed mid-job (kill -9, out of memory) never reports its end: run the
worker as `rq worker -w taskpush_client.rq.Worker` and the worker reports it (`running`
with the retry in `step` when RQ retries the job, else `failed` with `WorkHorseTerminated`).
A forked work horse exits right after its job, so the wrapper waits up to the client's
`wait` for the final report; with taskpush down longer than that it is lost (a
`SimpleWorker` keeps retrying it in the background). Stopping a job with RQ's
`send_stop_job_command` kills the horse: report it with `cancel(job_id)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from rq import get_current_job
from rq.worker import Worker as _RQWorker

from .api import TaskNotificationService, reset_current, set_current
from .client import Client
from .errors import TaskCancelled
from .keys import event_key, task_digest

_service: dict[str, TaskNotificationService] = {"default": TaskNotificationService()}
USER_META = "taskpush_user_id"
TYPE_META = "taskpush_task_type"


def use_client(client: Client | None) -> None:
    """Report through `client` instead of the process's default client."""
    _service["default"] = TaskNotificationService(client)


def _svc() -> TaskNotificationService:
    return _service["default"]


def enqueue(queue: Any, fn: Callable[..., Any], *args: Any, user_id: int | str,
            task_type: str | None = None, job_options: dict[str, Any] | None = None,
            **kwargs: Any) -> Any:
    """`queue.enqueue(fn, *args, **kwargs)` reported to `user_id` (the job id is the task
    id). RQ's own options (`retry`, `job_timeout`, `job_id`, ...) go in `job_options`."""
    options = dict(job_options or {})
    job_id = options.pop("job_id", None) or uuid.uuid4().hex
    name = task_type or _name(fn)
    _svc().register_task(job_id, user_id, name)  # queued: the caller never waits on taskpush
    meta = {**options.pop("meta", {}), USER_META: user_id, TYPE_META: name}
    return queue.enqueue(run, fn, args, kwargs, job_id=job_id, meta=meta, **options)


def cancel(job_id: str, message: str = "stopped") -> None:
    """Report a job stopped from outside (e.g. `send_stop_job_command`) as cancelled."""
    _svc().notify_cancelled(job_id, message=message, key=event_key(job_id, "cancelled")).wait()


def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The wrapper RQ runs: reports around the job function."""
    job = get_current_job()
    svc = _svc()
    if job is None:
        return fn(*args, **kwargs)
    task_id = job.id
    attempt = _attempt(job)
    step = f"retry {attempt}" if attempt else None
    user = job.meta.get(USER_META)
    if user is not None:  # enqueue's registration may not have reached taskpush
        svc.register_task(task_id, user, job.meta.get(TYPE_META) or _name(fn))
    token = set_current(task_id, svc)
    try:
        try:
            svc.notify_started(task_id, step=step, key=event_key(task_id, "running", attempt)
                               ).wait()
            result = fn(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, Exception) and not isinstance(exc, TaskCancelled) \
                    and _will_retry(job):
                svc.notify_started(task_id, message=f"retrying: {exc}"[:500],
                                   step=f"retry {attempt + 1}",
                                   key=event_key(task_id, "retry", attempt + 1)).wait()
            else:
                svc.finish(task_id, exc, key_prefix=task_digest(task_id)).wait()
            raise
        svc.finish(task_id, None, result, key_prefix=task_digest(task_id)).wait()
        return result
    finally:
        reset_current(token)
        svc.client.flush(svc.client.wait)  # a forked horse exits right after this


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", "rq_job")


def _attempt(job: Any) -> int:
    """How many times this job was retried before (RQ counts retries left down)."""
    retry = job.meta.get("taskpush_retries_max")
    if retry is None:
        retry = job.retries_left or 0
        job.meta["taskpush_retries_max"] = retry
        job.save_meta()
    return int(retry) - int(job.retries_left or 0)


def _will_retry(job: Any) -> bool:
    """Whether RQ requeues this job after the exception (a method in older RQ versions,
    a property in newer ones)."""
    should = job.should_retry
    return bool(should() if callable(should) else should)


class Worker(_RQWorker):
    """`rq worker -w taskpush_client.rq.Worker`: also reports jobs whose work horse died."""

    def handle_work_horse_killed(self, job: Any, retpid: int, ret_val: int, rusage: Any
                                 ) -> None:
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        try:
            _report_lost(job, ret_val)
        except Exception:  # a report must never take the worker down
            import logging

            logging.getLogger("taskpush_client.rq").warning("report failed", exc_info=True)


def _report_lost(job: Any, ret_val: int) -> None:
    meta = job.get_meta(refresh=True)
    if meta.get(USER_META) is None:
        return
    svc = _svc()
    attempt = int(meta.get("taskpush_retries_max", job.retries_left or 0)) - int(
        job.retries_left or 0)
    if _will_retry(job):  # RQ requeues it right after this hook
        svc.notify_started(job.id, message="work horse lost; retrying",
                           step=f"retry {attempt + 1}",
                           key=event_key(job.id, "retry", attempt + 1)).wait()
    else:
        svc.notify_failed(job.id, error=f"work horse terminated (wait status {ret_val})",
                          error_type="WorkHorseTerminated",
                          key=event_key(job.id, "failed")).wait()
