"""Celery: every task sent with a user reports its lifecycle to taskpush, with no code in
the task.

    from taskpush_client.celery import install, for_user
    install(app)                                          # once, where the app is made
    generate.apply_async(args, headers=for_user(user.id))  # at the call site

    @app.task
    def generate(n):
        for i in range(n):
            progress(100 * i / n, f"question {i}")        # taskpush_client.progress
        return {"questions": n}

The user travels in the message header `taskpush_user_id`, so a retry or a redelivery
carries it and a task's arguments stay the app's own; a task sent without it is not
reported. Signals: published (before_task_publish) -> pending; task_prerun -> running
(retries in `step`); task_success -> completed with the return value when it is JSON;
task_failure -> failed with the exception's type and message, or cancelled on
TaskCancelled; task_retry -> running with the retry in `step`; task_revoked -> cancelled.
State changes carry idempotency keys derived from the task id and the retry count
(`keys.event_key`: printable ASCII for any task id), so a redelivered task (acks_late after
a worker died) repeats none of them. Sending never waits for taskpush: the registration is
queued (delivered in the background) and the worker registers the task again when it
starts it.

Groups and chords: `send_tracked(group_or_chord, user_id)` reports each member as its own
task and one parent task whose progress is the share of finished members (counted from the
result backend, which it needs).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.result import AsyncResult
from celery.states import FAILURE, READY_STATES

from .api import TaskNotificationService, reset_current, set_current
from .client import Client
from .keys import event_key, task_digest

log = logging.getLogger("taskpush_client.celery")

USER_HEADER = "taskpush_user_id"
PARENT_HEADER = "taskpush_parent"
PARENT_TYPE_HEADER = "taskpush_parent_type"
MEMBERS_HEADER = "taskpush_members"

_state: dict[str, Any] = {"service": TaskNotificationService(), "app": None}
_tokens: dict[str, Any] = {}


def for_user(user_id: int | str, **headers: Any) -> dict[str, Any]:
    """The `headers=` of `apply_async` that make a task reported to `user_id`."""
    return {USER_HEADER: user_id, **headers}


def install(app: Any = None, *, client: Client | None = None) -> None:
    """Connect the signal handlers (once; calling it again only changes the client)."""
    _state["service"] = TaskNotificationService(client)
    _state["app"] = app
    for signal, handler in ((signals.before_task_publish, _published),
                            (signals.task_prerun, _prerun),
                            (signals.task_postrun, _postrun),
                            (signals.task_success, _success),
                            (signals.task_failure, _failure),
                            (signals.task_retry, _retry),
                            (signals.task_revoked, _revoked)):
        signal.connect(handler, weak=False, dispatch_uid=f"taskpush_{handler.__name__}")


def _svc() -> TaskNotificationService:
    return _state["service"]  # type: ignore[no-any-return]


def _header(request: Any, name: str) -> Any:
    """A custom header of a task's request, wherever this Celery version keeps it."""
    if request is None:
        return None
    value = getattr(request, name, None)
    if value is None:
        for holder in (getattr(request, "headers", None),
                       getattr(request, "request_dict", None)):
            if isinstance(holder, dict) and holder.get(name) is not None:
                return holder[name]
    return value


def _guard(fn: Any) -> Any:
    """A report must never break a task or the publisher (TaskCancelled included: a
    signal handler is not the task's code)."""
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.warning("taskpush report in %s failed", fn.__name__, exc_info=True)
    guarded.__name__ = fn.__name__
    return guarded


@_guard
def _published(sender: str | None = None, headers: dict[str, Any] | None = None,
               **_: Any) -> None:
    headers = headers or {}
    user = headers.get(USER_HEADER)
    if user is None or headers.get("retries"):
        return  # untracked, or a retry being sent (task_retry reports it)
    # queued, not waited for: a web request sending a task never waits on taskpush
    _svc().register_task(headers["id"], user, sender or headers.get("task", "task"))


@_guard
def _prerun(task_id: str, task: Any, **_: Any) -> None:
    request = task.request
    user = _header(request, USER_HEADER)
    if user is None:
        return
    svc = _svc()
    svc.register_task(task_id, user, task.name)  # no-op when already registered
    retries = request.retries or 0
    step = f"retry {retries}" if retries else None
    _tokens[task_id] = set_current(task_id, svc)
    parent = _header(request, PARENT_HEADER)
    if parent:
        members = _header(request, MEMBERS_HEADER) or []
        svc.register_task(parent, user, _header(request, PARENT_TYPE_HEADER) or "group",
                          {"members": len(members)})  # as send_tracked registered it
        svc.client.event(parent, "running", message="started", key=event_key(parent, "running"))
    svc.notify_started(task_id, step=step, key=event_key(task_id, "running", retries)).wait()


@_guard
def _postrun(task_id: str, task: Any, **_: Any) -> None:
    token = _tokens.pop(task_id, None)
    if token is not None:
        reset_current(token)
    parent = _header(task.request, PARENT_HEADER)
    members = _header(task.request, MEMBERS_HEADER)
    if parent and members:
        _report_parent(parent, list(members), task.app)


@_guard
def _success(sender: Any = None, result: Any = None, **_: Any) -> None:
    request = sender.request
    if _header(request, USER_HEADER) is None:
        return
    _svc().finish(request.id, None, result, key_prefix=task_digest(request.id)).wait()


@_guard
def _failure(sender: Any = None, task_id: str | None = None, exception: BaseException | None
             = None, **_: Any) -> None:
    request = getattr(sender, "request", None)
    if task_id is None or _header(request, USER_HEADER) is None:
        return
    _svc().finish(task_id, exception or RuntimeError("failed"),
                  key_prefix=task_digest(task_id)).wait()


@_guard
def _retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    if request is None or _header(request, USER_HEADER) is None:
        return
    attempt = (request.retries or 0) + 1
    _svc().notify_started(request.id, message=f"retrying: {reason}"[:500],
                          step=f"retry {attempt}",
                          key=event_key(request.id, "retry", attempt)).wait()


@_guard
def _revoked(request: Any = None, **_: Any) -> None:
    if request is None or _header(request, USER_HEADER) is None:
        return
    _svc().notify_cancelled(request.id, message="revoked",
                            key=event_key(request.id, "cancelled")).wait()


def send_tracked(sig: Any, user_id: int | str, *, task_type: str = "group",
                 parent_id: str | None = None, **options: Any) -> tuple[Any, str]:
    """Send a group or a chord so that each member is reported as its own task, and a
    parent task (`parent_id`, default `group_<id>`) shows the share of finished members.
    Returns (Celery's result, the parent task id). Like `apply_async`, it never waits for
    taskpush: the parent's registration is queued, and each member's worker registers it
    again (the same body) before reporting to it."""
    result = sig.freeze()
    members = _members(sig)
    parent = parent_id or f"group_{getattr(result, 'id', None) or members[0].id}"
    ids = [member.id for member in members]
    svc = _svc()
    svc.register_task(parent, user_id, task_type, {"members": len(ids)})
    for member in members:
        member.set(headers={**(member.options.get("headers") or {}), USER_HEADER: user_id,
                            PARENT_HEADER: parent, PARENT_TYPE_HEADER: task_type,
                            MEMBERS_HEADER: ids})
    return sig.apply_async(**options), parent


def _members(sig: Any) -> list[Any]:
    """The task signatures of a group or a chord (header then body)."""
    if hasattr(sig, "body") and hasattr(sig, "tasks"):  # chord
        return [*_members(sig.tasks), *_members(sig.body)]
    if hasattr(sig, "tasks"):  # group (or chain)
        found: list[Any] = []
        for task in sig.tasks:
            found.extend(_members(task))
        return found
    return [sig]


def _report_parent(parent: str, members: list[str], app: Any) -> None:
    states = [AsyncResult(member, app=app).state for member in members]
    finished = sum(state in READY_STATES for state in states)
    total = len(members)
    client = _svc().client
    client.event(parent, "progress", progress=round(100 * finished / total, 2),
                 step=f"{finished}/{total} finished",
                 key=event_key(parent, "progress", finished))
    if finished == total:
        failed = sum(state == FAILURE for state in states)
        client.event(parent, "completed", result={"members": total, "failed": failed},
                     message="all members finished",
                     key=event_key(parent, "completed")).wait()
