"""The OpenAPI 3 document of every HTTP route (served at /api/openapi.json).

The request bodies (Register, Event, BatchEvent, Batch) are the JSON Schema of the msgspec
Structs in server/core/contract.py, which validation decodes with, and every bound (task
id and text lengths, query parameter ranges, batch size) is read from contract.LIMITS: the
document cannot drift from what the server accepts. The answers and the prose are written
here from the small builders of openapi_schemas.py: SPEC.md's contract is what they
document, and a test checks that every routed path appears here.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..core import contract
from .openapi_schemas import (
    BEARER,
    ERRORS,
    JSON,
    NONE,
    PRODUCER,
    SEQ,
    STATUS_ENUM,
    TASK_ID,
    VERSION,
    ok,
    op,
    path_param,
    query,
    ref,
    responses,
    schemas,
)

WS_DESCRIPTION = """\
Upgrade to a WebSocket (`?token=JWT`, optional `&since=SEQ&epoch=E` to resume).

**On connect**, in order: `{"type":"connected","connection_id","message","timestamp",\
"epoch","seq"}` (in cluster mode also `"node"`: the node holding the socket); \
with a mismatching `epoch`, `{"type":"resync"}`; \
`{"type":"active_tasks","tasks":[Task...],"count"}`; with `since`, one `task_status` per \
task changed after SEQ (finished ones included, `task_deleted` for deleted ones), in seq \
order. Then live `{"type":"task_status", ...Task}` for every change of the user's tasks \
and of subscribed tasks, and `{"type":"task_deleted","task_id"}`.

**Client messages**: `{"type":"ping"}` -> `pong`; `{"type":"subscribe","task_id"}` -> \
`subscribed` + the task's `task_status` (own tasks; any task with an admin token; \
otherwise `error` code `forbidden`); `{"type":"unsubscribe","task_id"}` -> \
`unsubscribed`; `{"type":"refresh","token"}` -> `refreshed` with `expires_at`. \
`{"type":"token_expiring","expires_in"}` arrives about a minute before the token expires. \
Anything invalid -> `{"type":"error","code","message"}` and the socket stays open.

**Close codes**: 1001 server shutting down; 1008 message flood; 1009 frame too large; \
4401 token missing, invalid or expired; 4403 token for another user; 4408 client too slow \
(resume with `since`); 4409 replaced: too many connections for this user."""


SSE_DESCRIPTION = """The WebSocket's server messages as `text/event-stream`, for clients \
that cannot use WebSockets or only listen (`EventSource`, `curl -N`). Each message is one \
event: `event:` is its `type`, `data:` the same JSON. `task_status`, `task_deleted` and a \
fresh stream's `active_tasks` carry `id: <epoch>:<seq>`; a `Last-Event-ID` header (what \
`EventSource` sends when it reconnects) is handled exactly as `since`+`epoch` and wins over \
them. A comment line comes every `--sse-heartbeat` seconds (15). Where a socket would get a \
close code, the stream's last event is `close` `{"type":"close","code","reason"}` (1001 \
shutdown, 4401 token expired, 4409 too many connections for this user; a client too slow \
for 4408 is cut off), then it ends. Streams count in `--max-connections-per-user`."""


def paths(config: Config) -> dict[str, dict[str, Any]]:
    task = ref("Task")
    etag = {"ETag": {"description": "The task's seq, quoted", "schema": {"type": "string"}}}
    out: dict[str, dict[str, Any]] = {
        "/api/task/ws/task/{user_id}": {"get": op(
            "WebSocket: live task status", WS_DESCRIPTION, "websocket",
            responses({101: {"description": "Switching protocols (then the messages above; "
                                            "auth failures close with 4401/4403)"}}, 400),
            security=NONE, operation_id="websocket",
            parameters=[
                path_param("user_id", "The user the token is for", {"type": "string",
                                                                    "pattern": "^[0-9]+$"}),
                {**query("token", "User JWT", {"type": "string"}), "required": True},
                query("since", "Resume: replay changes after this seq",
                      contract.Limits.cursor("since")),
                query("epoch", "The epoch the client's seq belongs to", {"type": "string"}),
            ])},
        "/api/task/stream": {"get": op(
            "Server-Sent Events: live task status", SSE_DESCRIPTION, "websocket",
            responses({200: {"description": "The event stream", "content": {
                "text/event-stream": {"schema": {"type": "string"}}}}}, 400, 401),
            security=NONE, operation_id="eventStream",
            parameters=[
                {**query("token", "User JWT", {"type": "string"}), "required": True},
                query("since", "Resume: replay changes after this seq", SEQ),
                query("epoch", "The epoch the client's seq belongs to", {"type": "string"}),
                {**query("task_id", "Admins: also follow this task (repeatable)",
                         {"type": "string"}), "explode": True},
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "description": "`<epoch>:<seq>`: resume as since+epoch",
                 "schema": {"type": "string"}},
            ])},
        "/api/task/task/{task_id}/status": {"get": op(
            "Task status", "One of the user's tasks, with an ETag. `If-None-Match` matching the "
            "current ETag (weak comparison: `W/\"N\"`, a list, or `*`) answers 304; with "
            "`wait=S` as well, the request is held until the "
            "task changes or S seconds pass (long poll). A user holds at most "
            "--max-polls-per-user long polls at once: one more answers 429 with "
            "Retry-After. A producer (`X-API-Key` instead of a bearer token) may read any "
            "task the same way: a worker learns of a user's cancel while it runs.", "tasks",
            responses({200: ok("The task", task, etag),
                       304: {"description": "Not modified", "headers": etag}},
                      400, 401, 404, 429),
            security=BEARER + PRODUCER, operation_id="getTaskStatus",
            parameters=[TASK_ID,
                        query("wait", "Long-poll seconds (with If-None-Match)",
                              contract.LIMITS.wait),
                        {"name": "If-None-Match", "in": "header", "required": False,
                         "schema": {"type": "string"}}])},
        "/api/task/task/{task_id}/history": {"get": op(
            "Task history", "The recorded changes of one of the user's tasks, oldest first, "
            f"by pages of at most {contract.LIMITS.history_limit}: follow `next_after` "
            "until it is null.",
            "tasks", responses({200: ok("A page of the history", ref("History"))},
                               400, 401, 404),
            security=BEARER, operation_id="getTaskHistory",
            parameters=[TASK_ID,
                        query("limit", "Page size", contract.LIMITS.history_page),
                        query("after", "Cursor: `next_after` of the previous page",
                              contract.Limits.cursor("after"))])},
        "/api/task/task/{task_id}": {"delete": op(
            "Delete a finished task", "Removes a finished task and its history; pushed as "
            "`task_deleted`. An active task answers 409.", "tasks",
            responses({200: ok("Deleted", {"type": "object", "properties": {
                "task_id": {"type": "string"}, "deleted": {"type": "boolean"}}})},
                401, 404, 409, 503),
            security=BEARER, operation_id="deleteTask", parameters=[TASK_ID])},
        "/api/task/task/{task_id}/cancel": {"post": op(
            "Cancel an active task", "Marks it cancelled (pushed); an in-process job is "
            "interrupted and an HTTP producer's later events answer 409 with "
            "`cancel_requested: true`.", "tasks",
            responses({200: ok("The cancelled task", task)}, 401, 404, 409, 503),
            security=BEARER, operation_id="cancelTask", parameters=[TASK_ID])},
        "/api/task/tasks": {
            "get": op(
                "List the user's tasks", "Newest first by creation. With `since`, the tasks "
                "changed after that seq instead, in ascending seq order.", "tasks",
                responses({200: ok("A page of tasks", ref("TaskList"))}, 400, 401),
                security=BEARER, operation_id="listTasks",
                parameters=[query("status", "Only tasks in this status", STATUS_ENUM),
                            query("limit", "Page size", contract.LIMITS.list_page),
                            query("before", "Cursor: `next_before` of the previous page",
                                  contract.Limits.cursor("before")),
                            query("since", "Tasks changed after this seq",
                                  contract.Limits.cursor("since"))]),
            "post": op(
                "Register a task", "Creates a pending task. The same body again answers 200 "
                "with the same task; a different body for an existing id answers 409.",
                "producer",
                responses({201: ok("Created", task), 200: ok("Already registered", task)},
                          400, 401, 403, 408, 409, 413, 429, 503),
                security=PRODUCER, body=ref("Register"), operation_id="registerTask")},
        "/api/task/task/{task_id}/events": {"post": op(
            "Report a task event", "Committed to the database before it is answered or pushed. "
            "A finished task answers 409 and stays as it was. Send an `Idempotency-Key` "
            "to retry safely after a lost answer.", "producer",
            responses({200: ok("The task after the event", task)},
                      400, 401, 403, 404, 408, 409, 413, 422, 503),
            security=PRODUCER, body=ref("Event"), operation_id="postEvent",
            parameters=[TASK_ID, {
                "name": "Idempotency-Key", "in": "header", "required": False,
                "description": "A retry with the same key and the same event is answered "
                "with the task and changes nothing (also after the task finished); the "
                "same key with a different event answers 422 and changes nothing",
                "schema": {"type": "string", "minLength": 1,
                           "maxLength": contract.LIMITS.idempotency_key}}])},
        "/api/task/events": {"post": op(
            "Report a batch of events", f"At most {contract.LIMITS.batch_events} events, "
            "each applied or refused on its own, answered in request order; all applied ones "
            "are committed before the answer.", "producer",
            responses({200: ok("One result per event", ref("BatchResult"))},
                      400, 401, 403, 408, 413, 503),
            security=PRODUCER, body=ref("Batch"), operation_id="postEvents")},
        "/healthz": {"get": op(
            "Health", "200 when the database answers and takes writes, else 503 (with "
            "`message` saying why). Answers from a state the server keeps: never waits on a "
            "write.", "operations",
            responses({200: {"description": "Healthy", "content": {JSON: {"schema": {
                "type": "object", "properties": {
                    "status": {"type": "string"}, "database": {"type": "boolean"},
                    "epoch": {"type": "string"}, "seq": SEQ,
                    "connections": {"type": "integer"}}}}}},
                503: {"description": "Database unavailable"}}),
            security=NONE, operation_id="healthz")},
        "/metrics": {"get": op(
            "Prometheus metrics", "Prometheus text exposition format.", "operations",
            responses({200: {"description": "Metrics",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}}),
            security=NONE, operation_id="metrics")},
        "/api/openapi.json": {"get": op(
            "This document", "The OpenAPI 3 description of the HTTP API.", "operations",
            responses({200: {"description": "OpenAPI document",
                             "content": {JSON: {"schema": {"type": "object"}}}}}),
            security=NONE, operation_id="openapi")},
        "/docs": {"get": op(
            "API documentation", "A readable rendering of this document.", "pages",
            responses({200: _html("HTML page")}), security=NONE, operation_id="docs")},
        "/": {"get": op(
            "Demo page", "A page that logs in (demo mode) and shows live tasks.", "pages",
            responses({200: _html("HTML page")}), security=NONE, operation_id="index")},
    }
    if config.demo_mode:
        out["/api/demo/login"] = {"post": op(
            "Demo login", "Demo mode only: a token for any user id.", "demo",
            responses({200: ok("A token", {"type": "object", "properties": {
                "token": {"type": "string"}, "user_id": {"type": "integer"},
                "expires_at": {"type": "string", "format": "date-time"}}})}, 400),
            security=NONE, operation_id="demoLogin",
            body={"type": "object", "required": ["user_id"],
                  "properties": {"user_id": {"type": "integer", "minimum": 0}}})}
        out["/api/demo/tasks"] = {"post": op(
            "Start a demo task", "Demo mode only: a simulated in-process job for the user.",
            "demo", responses({201: ok("The new task", task)}, 400, 401),
            security=BEARER, operation_id="demoStartTask",
            body={"type": "object", "properties": {
                "kind": {"type": "string", "enum": ["success", "fail", "long"],
                         "default": "success"}}})}
    return out


def _html(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def openapi_document(config: Config) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "taskpush",
            "version": VERSION,
            "description": "Durable real-time task status: producers report task events "
            "over HTTP (or in-process); each change is committed to the database, then pushed to "
            "the owner's WebSockets. Every JSON answer is an envelope "
            '`{"code":0,"message":"success","data":...}`; failures carry the HTTP status '
            "as `code` and `data: null`.",
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": name} for name in
                 ("tasks", "producer", "websocket", "demo", "operations", "pages")],
        "security": BEARER,
        "paths": paths(config),
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                               "description": "User token; `sub` is the user id"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                           "description": "Producer key (--api-key)"},
            },
            "schemas": schemas(config),
            "responses": {f"E{code}": {"description": why,
                                       "content": {JSON: {"schema": ref("Error")}}}
                          for code, why in ERRORS.items()},
        },
    }
