"""The import path of the original design's in-process producer API: the names live in
`server.service.notify`, and this module hands out the same objects."""

from .service.notify import (
    TaskNotificationService,
    TaskProgressContext,
    task_notification_service,
    task_notifier,
)

__all__ = ["TaskNotificationService", "TaskProgressContext", "task_notification_service",
           "task_notifier"]
