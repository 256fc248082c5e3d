"""The original design's call shapes over a `Client`, for sync and async code alike.

    task_notification_service.register_task(task_id=..., user_id=..., task_type=...)
    task_notification_service.notify_progress(task_id, progress=50, message="...")  # sync
    await task_notification_service.notify_progress(task_id, progress=50)          # async

    @task_notifier(task_id=..., user_id=..., task_type=...)
    def job(): ...          # or: async def job(): ...

    with TaskProgressContext(task_id, total_steps=10) as p:       # or: async with
        p.increment("step text")                                 # or: await p.increment(...)

Each call queues a report and returns a `Report`: sync code may ignore it or `.wait()`,
async code `await`s it. `progress(percent, message, step)` reports for the task this code
runs for (set by the decorator, the context and the Celery/RQ/arq integrations).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from .client import Client, Report
from .errors import TaskCancelled

log = logging.getLogger("taskpush_client")

F = TypeVar("F", bound=Callable[..., Any])

_current: contextvars.ContextVar[tuple[str, TaskNotificationService] | None] = \
    contextvars.ContextVar("taskpush_current_task", default=None)

_default_lock = threading.Lock()
_default: Client | None = None
_default_options: dict[str, Any] = {}


def configure(url: str | None = None, api_key: str | None = None, **options: Any) -> Client:
    """Set the process's default client (else it is made from TASKPUSH_URL and
    TASKPUSH_API_KEY on first use). Options: see `Client`."""
    global _default
    with _default_lock:
        _default_options.clear()
        _default_options.update(options, url=url, api_key=api_key)
        previous, _default = _default, Client(url, api_key, **options)
        made = _default
    if previous is not None:
        previous.close(timeout=previous.wait)  # deliver what it had queued, stop its thread
    return made


def get_client() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client(**_default_options)
        return _default


def _forget_default_in_child() -> None:
    global _default, _default_lock
    _default_lock = threading.Lock()
    if _default is not None:
        _default._reset()


os.register_at_fork(after_in_child=_forget_default_in_child)


def jsonable(value: Any) -> Any:
    """A task's return value as a JSON `result`: itself when it is JSON, else None (the
    value may be anything a task queue can pickle)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return value


class TaskNotificationService:
    """The original design's service; every call goes to `client` (default: the process's
    default client)."""

    def __init__(self, client: Client | None = None) -> None:
        self._client = client

    @property
    def client(self) -> Client:
        return self._client or get_client()

    def register_task(self, task_id: str, user_id: int | str, task_type: str,
                      metadata: Any = None) -> Report:
        return self.client.register(task_id, user_id, task_type, metadata)

    def notify_started(self, task_id: str, message: str | None = None, *,
                       step: str | None = None, key: str | None = None) -> Report:
        return self.client.event(task_id, "running", message=message or "started", step=step,
                                 key=key)

    def notify_progress(self, task_id: str, progress: float, message: str | None = None,
                        step: str | None = None) -> Report:
        return self.client.event(task_id, "progress", progress=progress, message=message,
                                 step=step)

    def notify_completed(self, task_id: str, result: Any = None, message: str | None = None,
                         *, key: str | None = None) -> Report:
        return self.client.event(task_id, "completed", result=jsonable(result),
                                 message=message or "completed", key=key)

    def notify_failed(self, task_id: str, error: str, error_type: str | None = None, *,
                      key: str | None = None) -> Report:
        return self.client.event(task_id, "failed", error=str(error)[:4000],
                                 error_type=error_type or "error", message="failed", key=key)

    def notify_cancelled(self, task_id: str, message: str | None = None, *,
                         key: str | None = None) -> Report:
        return self.client.event(task_id, "cancelled", message=message or "cancelled", key=key)

    def finish(self, task_id: str, exc: BaseException | None, result: Any = None, *,
               key_prefix: str | None = None) -> Report:
        """Report how a task ended: completed with `result`, cancelled on TaskCancelled,
        failed with the exception's type and message otherwise."""
        if exc is None:
            key = f"{key_prefix}:completed" if key_prefix else None
            return self.notify_completed(task_id, result=result, key=key)
        if isinstance(exc, TaskCancelled) or type(exc).__name__ == "CancelledError":
            key = f"{key_prefix}:cancelled" if key_prefix else None
            return self.notify_cancelled(task_id, key=key)
        key = f"{key_prefix}:failed" if key_prefix else None
        return self.notify_failed(task_id, error=str(exc) or type(exc).__name__,
                                  error_type=type(exc).__name__, key=key)


task_notification_service = TaskNotificationService()


def set_current(task_id: str | None, service: TaskNotificationService | None = None
                ) -> contextvars.Token[Any]:
    """Make `progress()` report for `task_id` in this thread/coroutine, and watch the task
    for the user's cancel until `reset_current` (integrations, decorator, context)."""
    value = None if task_id is None else (task_id, service or task_notification_service)
    _watch(value, True)
    return _current.set(value)


def reset_current(token: contextvars.Token[Any]) -> None:
    leaving = _current.get()
    _current.reset(token)
    _watch(leaving, False)


def _watch(value: tuple[str, TaskNotificationService] | None, on: bool) -> None:
    if value is None:
        return
    task_id, service = value
    try:
        client = service.client
        client.watch(task_id) if on else client.unwatch(task_id)
    except Exception:  # watching is a help; it must never stop a task
        log.exception("taskpush: watching task %s", task_id)


def current_task_id() -> str | None:
    current = _current.get()
    return None if current is None else current[0]


def is_cancelled() -> bool:
    """Whether the user cancelled the task this code runs for (no request: the client
    watches the tasks its process runs); False outside a tracked task."""
    current = _current.get()
    return current is not None and current[1].client.is_cancelled(current[0])


def check_cancelled() -> None:
    """Raise TaskCancelled if the user cancelled the task this code runs for: a check
    between steps that does not report anything."""
    current = _current.get()
    if current is not None and current[1].client.is_cancelled(current[0]):
        raise TaskCancelled(current[0])


def progress(percent: float, message: str | None = None, step: str | None = None) -> Report:
    """Report progress of the task this code runs for. Coalesced (one HTTP request per
    flush, however often it is called); raises TaskCancelled once the user cancelled."""
    current = _current.get()
    if current is None:
        log.debug("taskpush progress() outside a tracked task: ignored")
        return Report("", None, 0)
    task_id, service = current
    return service.notify_progress(task_id, progress=percent, message=message, step=step)


def task_notifier(task_id: str, user_id: int | str, task_type: str, metadata: Any = None, *,
                  service: TaskNotificationService | None = None) -> Callable[[F], F]:
    """Decorate a function or a coroutine function: registered and started when called,
    completed with its return value, failed with its exception, cancelled on
    TaskCancelled. Inside it, `progress()` reports for this task."""

    def decorate(fn: F) -> F:
        svc = service or task_notification_service
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                svc.register_task(task_id, user_id, task_type, metadata)
                await svc.notify_started(task_id)
                token = set_current(task_id, svc)
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    await svc.finish(task_id, exc)
                    raise
                finally:
                    reset_current(token)
                await svc.finish(task_id, None, result)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            svc.register_task(task_id, user_id, task_type, metadata)
            svc.notify_started(task_id).wait()
            token = set_current(task_id, svc)
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                svc.finish(task_id, exc).wait()
                raise
            finally:
                reset_current(token)
            svc.finish(task_id, None, result).wait()
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


class TaskProgressContext:
    """Step-counting progress: each `increment()` reports (done/total)*100 with the step
    text; leaving the block completes the task, or fails/cancels it on an exception. Use
    `with` in sync code, `async with` in async code (then `await p.increment(...)`)."""

    def __init__(self, task_id: str, total_steps: int = 100, *, user_id: int | str | None = None,
                 task_type: str | None = None, metadata: Any = None,
                 service: TaskNotificationService | None = None) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError("total_steps must be a positive integer")
        self.task_id = task_id
        self.total_steps = total_steps
        self.current_step = 0
        self.result: Any = None
        self._register = (user_id, task_type, metadata)
        self.service = service or task_notification_service
        self._token: contextvars.Token[Any] | None = None

    def _start(self) -> Report:
        user_id, task_type, metadata = self._register
        if user_id is not None:
            self.service.register_task(self.task_id, user_id, task_type or "task", metadata)
        self._token = set_current(self.task_id, self.service)
        return self.service.notify_started(self.task_id)

    def increment(self, message: str | None = None, steps: int = 1) -> Report:
        self.current_step = min(self.total_steps, self.current_step + steps)
        percent = round(self.current_step * 100 / self.total_steps, 2)
        return self.service.notify_progress(self.task_id, progress=percent, message=message,
                                            step=f"Step {self.current_step}/{self.total_steps}")

    def set_result(self, result: Any) -> None:
        self.result = result

    def _end(self, exc: BaseException | None) -> Report:
        if self._token is not None:
            reset_current(self._token)
            self._token = None
        return self.service.finish(self.task_id, exc, self.result)

    def __enter__(self) -> TaskProgressContext:
        self._start().wait()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._end(exc).wait()

    async def __aenter__(self) -> TaskProgressContext:
        await self._start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._end(exc)
