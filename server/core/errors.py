"""Domain errors, raised deep and translated to HTTP or WebSocket answers only at the edge.

Each error carries the HTTP status it maps to and a machine-readable code (used in the
WebSocket `error` message and in batch results). `envelope()` shapes every JSON answer.
"""

from __future__ import annotations

from typing import Any


class TaskPushError(Exception):
    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadRequest(TaskPushError):
    status, code = 400, "bad_request"


class Unauthorized(TaskPushError):
    status, code = 401, "unauthorized"


class Forbidden(TaskPushError):
    status, code = 403, "forbidden"


class NotFound(TaskPushError):
    status, code = 404, "not_found"


class Conflict(TaskPushError):
    status, code = 409, "conflict"


class TaskFinal(Conflict):
    """A change to a task that is already completed, failed or cancelled."""

    code = "task_final"


class TaskActive(Conflict):
    """An operation that needs a finished task (delete) on an active one."""

    code = "task_active"


class KeyReused(TaskPushError):
    """An Idempotency-Key already applied to the task with a different event body: not a
    retry, and not applied (the IETF idempotency-key draft's 422 Unprocessable Content)."""

    status, code = 422, "idempotency_key_reused"


class BodyTimeout(TaskPushError):
    """The request body did not arrive within --body-timeout; the connection is closed."""

    status, code = 408, "body_timeout"


class TooLarge(TaskPushError):
    status, code = 413, "too_large"


class TooMany(TaskPushError):
    status, code = 429, "too_many"


class TooManyPolls(TooMany):
    """A user already holds --max-polls-per-user long polls open (HTTP: 429 with
    Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageUnavailable(TaskPushError):
    """The store cannot commit a write now: another process holds the database lock past
    --db-timeout, the disk is full, an I/O error, the database file was deleted or replaced.
    Nothing of the refused write was committed, so trying again later is safe (HTTP: 503
    with Retry-After). In-process producers see this type."""

    status, code = 503, "storage_unavailable"
    # a caller with time left may be tried again (a lock held elsewhere, a lost connection)
    retry_until_deadline = False

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def envelope(data: Any = None, *, code: int = 0, message: str = "success") -> dict[str, Any]:
    """The one JSON shape of every REST answer."""
    return {"code": code, "message": message, "data": data}


def error_envelope(status: int, message: str, **extra: Any) -> dict[str, Any]:
    body = envelope(None, code=status, message=message)
    body.update(extra)
    return body
