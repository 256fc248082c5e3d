"""Producer endpoints (X-API-Key): register a task, post one event, post a batch.

Every write is committed before it is answered (the store's group commit); a batch is
applied event by event, each exactly as the single form would be, and answered in order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from ..core.model import Kind, Operation, public
from ..core.validate import (
    Refused,
    decode_batch,
    decode_event,
    decode_register,
    idempotency_key,
    task_id,
)
from . import keys
from .rest import ok, read_body, require_producer


async def register(request: web.Request) -> web.Response:
    require_producer(request)
    config = request.app[keys.CONFIG]
    op = decode_register(await read_body(request), config.max_json_bytes)
    outcome = await request.app[keys.TASKS].register(op)
    assert outcome.task is not None
    return ok(public(outcome.task), status=201 if outcome.kind is Kind.CREATED else 200)


async def post_event(request: web.Request) -> web.Response:
    require_producer(request)
    config = request.app[keys.CONFIG]
    task = task_id(request.match_info["task_id"])
    change = decode_event(task, await read_body(request), config.max_json_bytes)
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        change = dataclasses.replace(change, idem_key=idempotency_key(key))
    return ok(public(await request.app[keys.TASKS].change(change)))


async def post_batch(request: web.Request) -> web.Response:
    require_producer(request)
    config = request.app[keys.CONFIG]
    items = decode_batch(await read_body(request), config.max_json_bytes)
    results: list[dict[str, Any] | None] = [None] * len(items)
    ops: list[Operation] = []
    positions: list[int] = []
    for index, item in enumerate(items):
        if isinstance(item, Refused):
            results[index] = _refused(item.task_id, item.error)
            continue
        ops.append(item)
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
