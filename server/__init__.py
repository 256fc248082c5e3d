"""taskpush: durable real-time task status push server.

The in-process producer API is importable from here:

    from server import task_notification_service, task_notifier, TaskProgressContext

Its calls raise `StorageUnavailable` when the database cannot take a write (retry later).
"""

from .core.errors import StorageUnavailable
from .service.notify import (
           TaskNotificationService,
           TaskProgressContext,
           task_notification_service,
           task_notifier,
)

__all__ = ["StorageUnavailable", "TaskNotificationService", "TaskProgressContext",
           "task_notification_service", "task_notifier"]
__version__ = "0.1.0"
