"""The one exception the client raises into a worker's code."""

from __future__ import annotations


class TaskCancelled(Exception):
    """The user cancelled this task (the server answered 409 with "cancel_requested"): stop
    working. An Exception, not a BaseException, so task queues (Celery, RQ, arq) treat it as
    a task's own error and keep the worker alive; the integrations report it as `cancelled`."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} was cancelled by the user")
        self.task_id = task_id
