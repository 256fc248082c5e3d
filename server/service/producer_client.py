"""A producer client for workers in other processes, over the HTTP producer API.

For new code use the client distribution instead: `pip install ./clients/python` and
`import taskpush_client` (sync and async, Celery/RQ/arq integrations, coalesced progress,
and no server package in the worker's environment; docs/workers.md). This module stays so
that code written against it keeps working; it needs the server's dependencies.

It has the call shapes of the in-process API, so moving a job out of the server changes one
import:

    from server.producer_client import task_notification_service, task_notifier, \\
        TaskProgressContext
    task_notification_service.configure("http://127.0.0.1:8000", api_key="...")
    # (or set TASKPUSH_URL and TASKPUSH_API_KEY)

Transient failures (connection errors, timeouts, 429, 502-504) are retried with backoff;
every event carries an Idempotency-Key that stays the same across its retries, so a retry
never records an event twice. When the user cancelled the task, the next progress report
raises `TaskCancelled` (an asyncio.CancelledError) inside the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any
from urllib.parse import quote

import aiohttp

from ..core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    TaskPushError,
    TooLarge,
    TooMany,
)
from ..core.model import TERMINAL
from ..core.model import TaskJSON as Task
from . import notify

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
_ERRORS: dict[int, type[TaskPushError]] = {400: BadRequest, 401: Forbidden, 403: Forbidden,
                                           404: NotFound, 409: Conflict, 413: TooLarge,
                                           429: TooMany}


class TaskCancelled(asyncio.CancelledError):
    """The user cancelled this task; the worker should stop."""


class HttpBackend:
    def __init__(self, base_url: str, api_key: str, *, retries: int = 5,
                 backoff: float = 0.2, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"X-API-Key": api_key}
        self.retries = retries
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
                    ) -> tuple[int, dict[str, Any]]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        all_headers = {**self._headers, **(headers or {})}
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                async with self._session.post(self.base_url + path, json=body,
                                              headers=all_headers) as resp:
                    if resp.status not in RETRY_STATUSES or attempt == self.retries:
                        return resp.status, await resp.json(content_type=None)
            except (aiohttp.ClientConnectionError, TimeoutError):
                if attempt == self.retries:
                    raise
            log.info("taskpush %s: transient failure, retry %d in %.1fs", path, attempt + 1,
                     delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    @staticmethod
    def _raise(status: int, body: dict[str, Any]) -> None:
        error = _ERRORS.get(status, TaskPushError)
        raise error(str(body.get("message", f"HTTP {status}")))

    async def register(self, task_id: str, user_id: int, task_type: str, metadata: Any
                       ) -> Task:
        body = {"task_id": task_id, "user_id": user_id, "task_type": task_type}
        if metadata is not None:
            body["metadata"] = metadata
        status, answer = await self._post("/api/task/tasks", body)
        if status not in (200, 201):
            self._raise(status, answer)
        return answer["data"]

    async def change(self, task_id: str, fields: dict[str, Any]) -> Task | None:
        key = uuid.uuid4().hex  # one key for this event, kept across its retries
        path = f"/api/task/task/{quote(task_id, safe='')}/events"  # ids may hold / ? # %
        status, answer = await self._post(path, fields, {"Idempotency-Key": key})
        if status == 200:
            return answer["data"]
        if status == 409:
            if answer.get("cancel_requested") and fields.get("status") not in TERMINAL:
                raise TaskCancelled(f"task {task_id} was cancelled by the user")
            log.info("change to %s ignored: %s", task_id, answer.get("message"))
            return None
        self._raise(status, answer)
        return None

    async def get(self, task_id: str) -> Task | None:
        return None  # producers have no read endpoint; notify_* reports a missing task

    def attach(self, task_id: str) -> None:
        """Nothing to attach: cancellation reaches a remote worker through TaskCancelled."""


class RemoteTaskNotificationService(notify.TaskNotificationService):
    """The in-process service's API over HTTP; configure() it or set TASKPUSH_URL and
    TASKPUSH_API_KEY."""

    def configure(self, base_url: str, api_key: str, **options: Any) -> None:
        self._backend = HttpBackend(base_url, api_key, **options)

    @property
    def backend(self) -> notify.Backend:
        if self._backend is None:
            url, key = os.environ.get("TASKPUSH_URL"), os.environ.get("TASKPUSH_API_KEY")
            if not url or not key:
                raise RuntimeError("producer client not configured: call "
                                   "task_notification_service.configure(url, api_key) or set "
                                   "TASKPUSH_URL and TASKPUSH_API_KEY")
            self.configure(url, key)
        assert self._backend is not None
        return self._backend

    async def close(self) -> None:
        if isinstance(self._backend, HttpBackend):
            await self._backend.close()


task_notification_service = RemoteTaskNotificationService()


def task_notifier(task_id: str, user_id: int, task_type: str, metadata: Any = None) -> Any:
    """The in-process decorator, reporting to the configured server."""
    return notify.task_notifier(task_id, user_id, task_type, metadata,
                                service=task_notification_service)


class TaskProgressContext(notify.TaskProgressContext):
    """The in-process progress context, reporting to the configured server."""

    def __init__(self, task_id: str, total_steps: int = 100, **kwargs: Any) -> None:
        kwargs.setdefault("service", task_notification_service)
        super().__init__(task_id, total_steps, **kwargs)
