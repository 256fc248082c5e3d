"""REST endpoints for users (Bearer JWT): task status with ETag and long poll, the task
list, cancel and delete. Another user's task answers 404 exactly as a missing one does.
A producer (X-API-Key) may read any task's status the same way, so a worker learns of a
user's cancel while it runs, without waiting for its next report.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

from aiohttp import web

from ..core import contract, jsonutil
from ..core.auth import AuthError, Identity, api_key_matches
from ..core.errors import BodyTimeout, Forbidden, NotFound, Unauthorized, envelope
from ..core.model import Task, public
from ..core.validate import json_object, query_int, status_param
from ..push.polls import wait_for_change
from . import keys


def ok(data: Any = None, status: int = 200, headers: dict[str, str] | None = None
       ) -> web.Response:
    return web.json_response(envelope(data), status=status, headers=headers,
                             dumps=jsonutil.dumps)


def user_identity(request: web.Request) -> Identity:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token")
    try:
        return request.app[keys.VERIFIER].verify(token.strip())
    except AuthError as exc:
        raise Unauthorized(f"token {exc.reason}") from None


def require_producer(request: web.Request) -> None:
    expected = request.app[keys.CONFIG].api_key
    if expected is None:
        raise Forbidden("producer API disabled: start the server with --api-key")
    if not api_key_matches(expected.reveal(), request.headers.get("X-API-Key")):
        raise Unauthorized("missing or wrong X-API-Key")


async def read_body(request: web.Request) -> bytes:
    """The body (size capped by the app's client_max_size -> 413), which must arrive
    within --body-timeout: a body sent a byte at a time would hold the connection (and a
    request's worth of memory) for as long as its sender liked (408)."""
    timeout = request.app[keys.CONFIG].body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"request body not received within {timeout:g} seconds") from None


async def read_object(request: web.Request) -> dict[str, Any]:
    """The JSON object body (see read_body)."""
    return json_object(await read_body(request))


def _etag(task: Task) -> str:
    return f'"{task.seq}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: `*`, or any tag of the comma-separated list equal to ours under
    weak comparison (`W/"7"` matches `"7"`): a proxy that weakens ETags must not turn a
    long poll into tight polling."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in if_none_match.split(","))


async def _own_task(request: web.Request, identity: Identity, task_id: str) -> Task:
    task = await request.app[keys.STORE].get_task(task_id)
    if task is None or task.user_id != identity.user_id:
        raise NotFound(f"task {task_id} not found")
    return task


def _hung_up(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _any_task(request: web.Request, task_id: str) -> Task:
    task = await request.app[keys.STORE].get_task(task_id)
    if task is None:
        raise NotFound(f"task {task_id} not found")
    return task


async def task_status_any(request: web.Request) -> web.Response:
    """The status route: a producer's read when the request carries X-API-Key and no
    Authorization header, else a user's."""
    if "X-API-Key" in request.headers and "Authorization" not in request.headers:
        return await producer_task_status(request)
    return await task_status(request)


async def producer_task_status(request: web.Request) -> web.Response:
    """Any task's status for a producer (the key reports any task's events already), with
    the same ETag and long poll as a user's: a worker watches the tasks it runs and stops
    as soon as one is cancelled. Not a user's request: it holds no user's long-poll share."""
    require_producer(request)
    task_id = request.match_info["task_id"]
    return await _status_answer(request, task_id, lambda: _any_task(request, task_id),
                                contextlib.nullcontext)


async def task_status(request: web.Request) -> web.Response:
    identity = user_identity(request)
    task_id = request.match_info["task_id"]
    return await _status_answer(request, task_id,
                                lambda: _own_task(request, identity, task_id),
                                lambda: request.app[keys.POLLS].slot(identity.user_id))


async def _status_answer(request: web.Request, task_id: str,
                         read: Callable[[], Awaitable[Task]],
                         slot: Callable[[], AbstractContextManager[object]]) -> web.Response:
    """The task as `read` finds it, with its ETag: 304 when If-None-Match matches; with
    `wait`, held until the task changes or the wait ends (long poll), holding `slot()`
    meanwhile (a user's share of long polls; a producer's reads hold none)."""
    wait = query_int(request.query.get("wait"), contract.LIMITS.wait) or 0
    if_none_match = request.headers.get("If-None-Match")
    with request.app[keys.HUB].watching(task_id) as changed:
        task = await read()
        if wait > 0 and etag_matches(if_none_match, _etag(task)):
            with slot():
                if await wait_for_change(changed, wait, lambda: _hung_up(request)):
                    task = await read()
    etag = _etag(task)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, etag):
        return web.Response(status=304, headers=headers)
    return ok(public(task), headers=headers)


async def list_tasks(request: web.Request) -> web.Response:
    identity = user_identity(request)
    store = request.app[keys.STORE]
    query = request.query
    limits = contract.LIMITS
    since = query_int(query.get("since"), limits.cursor("since"))
    limit = query_int(query.get("limit"), limits.list_page) or limits.list_default
    if since is not None:
        if since > store.last_seq:  # a cluster node behind the one that answered last
            await store.catch_up(since)
        seq = store.last_seq
        tasks = await store.changed_since(identity.user_id, since, limit)
        data = {"tasks": [public(t) for t in tasks], "count": len(tasks), "seq": seq,
                "epoch": store.epoch, "resync": since < store.horizon or since > seq}
        return ok(data)
    status = status_param(query.get("status"))
    before = query_int(query.get("before"), limits.cursor("before"))
    seq = store.last_seq  # read first: a poller resuming from it misses nothing
    tasks = await store.list_tasks(identity.user_id, status=status, limit=limit, before=before)
    next_before = tasks[-1].created_seq if len(tasks) == limit else None
    return ok({"tasks": [public(t) for t in tasks], "count": len(tasks),
               "next_before": next_before, "seq": seq, "epoch": store.epoch})


async def delete_task(request: web.Request) -> web.Response:
    identity = user_identity(request)
    task_id = request.match_info["task_id"]
    await request.app[keys.TASKS].delete(task_id, owner=identity.user_id)
    return ok({"task_id": task_id, "deleted": True})


async def cancel_task(request: web.Request) -> web.Response:
    identity = user_identity(request)
    task_id = request.match_info["task_id"]
    task = await request.app[keys.TASKS].cancel(task_id, owner=identity.user_id)
    return ok(public(task))


async def history(request: web.Request) -> web.Response:
    """The recorded changes of one of the user's tasks, oldest first, by pages: `limit`
    (default and most contract's history_limit) after the seq `after`; `next_after`
    continues, null at the end (so a short history is one answer, as it always was)."""
    identity = user_identity(request)
    task_id = request.match_info["task_id"]
    query = request.query
    page = contract.LIMITS.history_page
    limit = query_int(query.get("limit"), page) or page.high
    after = query_int(query.get("after"), contract.LIMITS.cursor("after")) or 0
    await _own_task(request, identity, task_id)
    events, next_after = await request.app[keys.STORE].history_page(task_id, after, limit)
    return ok({"task_id": task_id, "events": events, "count": len(events),
               "next_after": next_after})


def add_routes(app: web.Application) -> None:
    # `[^/]+`: aiohttp's default `{name}` pattern excludes { and }, which task ids may hold
    app.router.add_get("/api/task/task/{task_id:[^/]+}/status", task_status_any)
    app.router.add_get("/api/task/task/{task_id:[^/]+}/history", history)
    app.router.add_delete("/api/task/task/{task_id:[^/]+}", delete_task)
    app.router.add_post("/api/task/task/{task_id:[^/]+}/cancel", cancel_task)
    app.router.add_get("/api/task/tasks", list_tasks)
