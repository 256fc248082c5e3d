"""The import path of the HTTP producer client that existing worker code uses: the names
live in `server.service.producer_client`, and this module hands out the same objects."""

from .service.producer_client import (
    HttpBackend,
    RemoteTaskNotificationService,
    TaskCancelled,
    TaskProgressContext,
    task_notification_service,
    task_notifier,
)

__all__ = ["HttpBackend", "RemoteTaskNotificationService", "TaskCancelled",
           "TaskProgressContext", "task_notification_service", "task_notifier"]
