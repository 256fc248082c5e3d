"""The in-process producer API, with the call shapes of the original design.

    task_notification_service.register_task(task_id=..., user_id=..., task_type=...)
    await task_notification_service.notify_progress(task_id, progress=50, message="...")

    @task_notifier(task_id=..., user_id=..., task_type=...)
    async def job(): ...

    async with TaskProgressContext(task_id, total_steps=10) as p:
        await p.increment("step text")

`task_notification_service` is a module-level object that the running app binds to its
TaskService at startup, so producer code needs no handle on the app. Every call takes the
same path as the HTTP API (validated, committed, then pushed).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, ParamSpec, Protocol, TypeVar

from ..core.errors import BadRequest, NotFound, StorageUnavailable, TaskFinal
from ..core.model import TaskJSON as Task
from ..core.model import public
from ..core.validate import event_body, register_body
from .tasks import TaskService

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

JSON_LIMIT = 65536


def _jsonable(value: Any) -> Any:
    """Results of arbitrary Python jobs: keep JSON values, stringify the rest."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


class Backend(Protocol):
    """Where a TaskNotificationService sends its calls: this process's TaskService, or a
    taskpush server over HTTP (server.producer_client)."""

    async def register(self, task_id: str, user_id: int, task_type: str, metadata: Any
                       ) -> Task: ...

    async def change(self, task_id: str, fields: dict[str, Any]) -> Task | None: ...

    async def get(self, task_id: str) -> Task | None: ...

    def attach(self, task_id: str) -> None: ...


class InProcessBackend:
    """Calls go straight to the app's TaskService (validated like HTTP bodies)."""

    def __init__(self, tasks: TaskService, json_limit: int = JSON_LIMIT) -> None:
        self.tasks = tasks
        self.json_limit = json_limit

    async def register(self, task_id: str, user_id: int, task_type: str, metadata: Any
                       ) -> Task:
        data = {"task_id": task_id, "user_id": user_id, "task_type": task_type,
                "metadata": metadata}
        op = register_body(data, self.json_limit, origin="inprocess")
        outcome = await self.tasks.register(op)
        assert outcome.task is not None
        return public(outcome.task)

    async def change(self, task_id: str, fields: dict[str, Any]) -> Task | None:
        change = event_body(task_id, fields, self.json_limit)
        try:
            return public(await self.tasks.change(change))
        except TaskFinal as exc:
            log.info("change to %s ignored: %s", task_id, exc.message)
            return None

    async def get(self, task_id: str) -> Task | None:
        task = await self.tasks.store.get_task(task_id)
        return None if task is None else public(task)

    def attach(self, task_id: str) -> None:
        """The coroutine reporting on a task is the one a user's cancel interrupts."""
        current = asyncio.current_task()
        if current is not None:
            self.tasks.attach_runner(task_id, current)


class TaskNotificationService:
    def __init__(self, backend: Backend | None = None) -> None:
        self._backend = backend
        self._pending: dict[str, asyncio.Future[Task]] = {}

    def bind(self, tasks: TaskService, json_limit: int = JSON_LIMIT) -> None:
        """Called by the app at startup: calls go to its TaskService from now on."""
        self._backend = InProcessBackend(tasks, json_limit)

    def unbind(self, tasks: TaskService) -> None:
        backend = self._backend
        if isinstance(backend, InProcessBackend) and backend.tasks is tasks:
            self._backend = None
            self._pending.clear()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("no taskpush app is running in this process (create_app + start)")
        return self._backend

    def register_task(
        self, task_id: str, user_id: int, task_type: str, metadata: Any = None
    ) -> asyncio.Future[Task]:
        """Register a task (status pending). Synchronous like the original design: the
        write is scheduled at once, and the next notify for this task waits for it. The
        returned future may also be awaited to get the task."""
        backend = self.backend
        future = asyncio.ensure_future(backend.register(task_id, user_id, task_type, metadata))
        future.add_done_callback(_consume_exception)
        self._pending[task_id] = future
        future.add_done_callback(lambda f: self._pending.pop(task_id, None)
                                 if self._pending.get(task_id) is f else None)
        backend.attach(task_id)
        return future

    async def _notify(self, task_id: str, **fields: Any) -> Task | None:
        """Apply one change. A refusal because the task already finished (e.g. the user
        cancelled it) is logged and answered with None, not raised into the job."""
        pending = self._pending.get(task_id)
        if pending is not None:
            await asyncio.shield(pending)
        data = {k: v for k, v in fields.items() if v is not None or k == "result"}
        backend = self.backend
        backend.attach(task_id)
        return await backend.change(task_id, data)

    async def notify_started(self, task_id: str, message: str | None = None) -> Task | None:
        return await self._notify(task_id, status="running", message=message or "started")

    async def notify_progress(
        self, task_id: str, progress: float, message: str | None = None, step: str | None = None
    ) -> Task | None:
        return await self._notify(task_id, status="progress", progress=progress,
                                  message=message, step=step)

    async def notify_completed(
        self, task_id: str, result: Any = None, message: str | None = None
    ) -> Task | None:
        return await self._notify(task_id, status="completed", result=_jsonable(result),
                                  message=message or "completed")

    async def notify_failed(
        self, task_id: str, error: str, error_type: str | None = None
    ) -> Task | None:
        return await self._notify(task_id, status="failed", error=str(error)[:4000],
                                  error_type=error_type or "error", message="failed")

    async def notify_cancelled(self, task_id: str, message: str | None = None) -> Task | None:
        return await self._notify(task_id, status="cancelled", message=message or "cancelled")

    async def get_task(self, task_id: str) -> Task | None:
        return await self.backend.get(task_id)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("in-process register failed: %s", future.exception())


task_notification_service = TaskNotificationService()


async def _finish(
    service: TaskNotificationService, task_id: str, exc: BaseException | None, result: Any
) -> None:
    """Report how a job ended; never masks the job's own exception."""
    try:
        if exc is None:
            await service.notify_completed(task_id, result=result)
        elif isinstance(exc, asyncio.CancelledError):
            await service.notify_cancelled(task_id)
        else:
            await service.notify_failed(task_id, error=str(exc) or type(exc).__name__,
                                        error_type=type(exc).__name__)
    except (NotFound, BadRequest, RuntimeError) as report_error:
        log.warning("could not report the end of task %s: %s", task_id, report_error)
    except StorageUnavailable as report_error:
        if exc is None:
            raise  # the job's success was not recorded: its caller must know
        log.warning("could not report the end of task %s: %s", task_id, report_error)


def task_notifier(
    task_id: str,
    user_id: int,
    task_type: str,
    metadata: Any = None,
    *,
    service: TaskNotificationService | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate a coroutine function: registered and started when called, completed with
    its return value, failed with its exception, cancelled when cancelled."""

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            svc = service or task_notification_service
            await svc.register_task(task_id=task_id, user_id=user_id, task_type=task_type,
                                    metadata=metadata)
            await svc.notify_started(task_id)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                await _finish(svc, task_id, exc, None)
                raise
            await _finish(svc, task_id, None, result)
            return result

        return wrapper

    return decorate


class TaskProgressContext:
    """Step-counting progress: each `increment()` reports (done/total)*100 with the step
    text; leaving the block completes the task, or fails/cancels it on an exception."""

    def __init__(
        self,
        task_id: str,
        total_steps: int = 100,
        *,
        user_id: int | None = None,
        task_type: str | None = None,
        metadata: Any = None,
        service: TaskNotificationService | None = None,
    ) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError("total_steps must be a positive integer")
        self.task_id = task_id
        self.total_steps = total_steps
        self.current_step = 0
        self.result: Any = None
        self._register = (user_id, task_type, metadata)
        self._service = service

    @property
    def service(self) -> TaskNotificationService:
        return self._service or task_notification_service

    async def __aenter__(self) -> TaskProgressContext:
        user_id, task_type, metadata = self._register
        if user_id is not None:
            await self.service.register_task(self.task_id, user_id, task_type or "task",
                                             metadata)
        try:
            await self.service.notify_started(self.task_id)
        except NotFound:
            raise NotFound(f"task {self.task_id} is not registered; call register_task first "
                           "or pass user_id= and task_type=") from None
        return self

    async def increment(self, message: str | None = None, steps: int = 1) -> Task | None:
        self.current_step = min(self.total_steps, self.current_step + steps)
        percent = round(self.current_step * 100 / self.total_steps, 2)
        return await self.service.notify_progress(
            self.task_id, progress=percent, message=message,
            step=f"Step {self.current_step}/{self.total_steps}",
        )

    def set_result(self, result: Any) -> None:
        self.result = result

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await _finish(self.service, self.task_id, exc, self.result)
