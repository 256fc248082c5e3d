"""taskpush: durable real-time task status push server.

The in-process producer API is importable from here:

    from server import task_notification_service, task_notifier, TaskProgressContext
"""

from .notify import (
           TaskNotificationService,
           TaskProgressContext,
           task_notification_service,
           task_notifier,
)

__all__ = ["TaskNotificationService", "TaskProgressContext", "task_notification_service",
           "task_notifier"]
__version__ = "0.1.0"
