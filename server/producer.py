"""Producer endpoints (X-API-Key): register a task, post one event, post a batch.

Every write is committed before it is answered (the store's group commit); a batch is
applied event by event, each exactly as the single form would be, and answered in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from . import keys
from .auth import api_key_matches
from .errors import BadRequest, Forbidden, TaskPushError, Unauthorized
from .model import Change, Kind, Operation, public
from .rest import ok, read_object
from .validate import batch_body, event_body, idempotency_key, register_body, task_id


def require_producer(request: web.Request) -> None:
    expected = request.app[keys.CONFIG].api_key
    if expected is None:
        raise Forbidden("producer API disabled: start the server with --api-key")
    if not api_key_matches(expected.reveal(), request.headers.get("X-API-Key")):
        raise Unauthorized("missing or wrong X-API-Key")


async def register(request: web.Request) -> web.Response:
    require_producer(request)
    config = request.app[keys.CONFIG]
    op = register_body(await read_object(request), config.max_json_bytes)
    outcome = await request.app[keys.TASKS].register(op)
    assert outcome.task is not None
    return ok(public(outcome.task), status=201 if outcome.kind is Kind.CREATED else 200)


async def post_event(request: web.Request) -> web.Response:
    require_producer(request)
    config = request.app[keys.CONFIG]
    task = task_id(request.match_info["task_id"])
    change = event_body(task, await read_object(request), config.max_json_bytes)
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        change = dataclasses.replace(change, idem_key=idempotency_key(key))
    return ok(public(await request.app[keys.TASKS].change(change)))


async def post_batch(request: web.Request) -> web.Response:
    require_producer(request)
    config = request.app[keys.CONFIG]
    events = batch_body(await read_object(request))
    results: list[dict[str, Any] | None] = [None] * len(events)
    ops: list[Operation] = []
    positions: list[int] = []
    for index, item in enumerate(events):
        where = f"events[{index}]."
        try:
            if not isinstance(item, dict):
                raise BadRequest(f"events[{index}] must be an object")
            fields = dict(item)
            target = task_id(fields.pop("task_id", None), f"{where}task_id")
            key = fields.pop("idempotency_key", None)
            change: Change = event_body(target, fields, config.max_json_bytes, where)
            if key is not None:  # the batch form of the single event's Idempotency-Key
                if not isinstance(key, str):
                    raise BadRequest(f"{where}idempotency_key must be a string")
                change = dataclasses.replace(change, idem_key=idempotency_key(key))
        except TaskPushError as exc:
            raw_id = item.get("task_id") if isinstance(item, dict) else None
            results[index] = _refused(raw_id if isinstance(raw_id, str) else None, exc)
            continue
        ops.append(change)
        positions.append(index)
    outcomes = await request.app[keys.TASKS].apply_many(ops) if ops else []
    for index, outcome in zip(positions, outcomes, strict=True):
        op_task = outcome.op.task_id
        if outcome.error is not None:
            results[index] = _refused(op_task, outcome.error)
        else:
            results[index] = {"task_id": op_task, "ok": True, "seq": outcome.seq}
    return ok({"results": results})


def _refused(task: str | None, exc: Exception) -> dict[str, Any]:
    status = getattr(exc, "status", 400)
    message = getattr(exc, "message", str(exc))
    extra = getattr(exc, "extra", {})
    refused = {"task_id": task, "ok": False, "code": status, "message": message}
    if extra.get("cancel_requested"):
        refused["cancel_requested"] = True  # as the single form's 409 envelope says
    return refused


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/task/tasks", register)
    app.router.add_post("/api/task/task/{task_id:[^/]+}/events", post_event)
    app.router.add_post("/api/task/events", post_batch)
