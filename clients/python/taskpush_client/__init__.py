"""taskpush-client: report tasks running in worker processes to a taskpush server.

Sync and async, the original design's call shapes, coalesced progress, retries with
idempotency keys, and integrations for Celery (`taskpush_client.celery`), RQ
(`taskpush_client.rq`) and arq (`taskpush_client.arq`). See docs/workers.md.
"""

from __future__ import annotations

from .api import (
    TaskNotificationService,
    TaskProgressContext,
    check_cancelled,
    configure,
    current_task_id,
    get_client,
    is_cancelled,
    jsonable,
    progress,
    task_notification_service,
    task_notifier,
)
from .client import Client, Report
from .errors import TaskCancelled

__all__ = [
    "Client",
    "Report",
    "TaskCancelled",
    "TaskNotificationService",
    "TaskProgressContext",
    "check_cancelled",
    "configure",
    "current_task_id",
    "get_client",
    "is_cancelled",
    "jsonable",
    "progress",
    "task_notification_service",
    "task_notifier",
]
__version__ = "0.1.0"
