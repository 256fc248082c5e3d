"""The OpenAPI 3 document of every HTTP route (served at /api/openapi.json).

The request bodies (Register, Event, BatchEvent, Batch) are the JSON Schema of the msgspec
Structs in server/contract.py, which validation decodes with, and every bound (task id and
text lengths, query parameter ranges, batch size) is read from contract.LIMITS: the
document cannot drift from what the server accepts. The answers and the prose are written
here from small builders: SPEC.md's contract is what they document, and a test checks that
every routed path appears here.
"""

from __future__ import annotations

import types as types_
import typing
from typing import Any

import msgspec

from ..config import Config
from ..core import contract
from ..core.contract import IntQuery
from ..core.model import STATUSES, TASK_FIELDS, TASK_TYPES

VERSION = "0.1.0"
JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


def _any(description: str) -> Schema:
    """Any JSON value (OpenAPI 3.0 spells 'anything' as an empty schema)."""
    return {"description": description, "nullable": True}


def envelope(data: Schema | None) -> Schema:
    """The success envelope around `data`."""
    return {
        "allOf": [ref("Envelope"), {"type": "object", "properties": {
            "data": data if data is not None else nullable({"type": "object"})}}],
    }


def ok(description: str, data: Schema | None, headers: dict[str, Any] | None = None
       ) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {JSON: {"schema": envelope(data)}}}
    if headers:
        response["headers"] = headers
    return response


ERRORS = {
    400: "Invalid request: bad JSON, unknown field, bad value or query parameter",
    401: "Missing or invalid credentials (token missing, invalid or expired; wrong key)",
    403: "Producer API disabled (server started without --api-key)",
    404: "No such task (another user's task answers exactly the same)",
    408: "The request body did not arrive in full within --body-timeout; the connection "
         "is closed",
    409: "Conflict: the task is already finished, still active, or registered differently",
    413: "Body, field or JSON value larger than the configured limit",
    422: "The Idempotency-Key was already used for this task with a different event "
         "(status, progress, message, step, result, error or error_type as validated); "
         "nothing was applied. Use a new key for a new event",
    429: "Too many: the user has too many active tasks (register), or holds "
         "--max-polls-per-user long polls open already (status with `wait`: retry after "
         "`Retry-After` seconds, or follow many tasks with one WebSocket or SSE stream)",
    503: "Storage unavailable: the write was not committed (another process holds the "
         "database lock past --db-timeout, the disk is full, the database file was deleted "
         "or replaced); `message` says why. Retry after `Retry-After` seconds",
}


def responses(success: dict[int, dict[str, Any]], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {str(code): body for code, body in success.items()}
    for code in errors:
        out[str(code)] = {"$ref": f"#/components/responses/E{code}"}
    return out


def op(summary: str, description: str, tag: str, resp: dict[str, Any], *,
       security: list[dict[str, list[str]]] | None = None,
       parameters: list[Schema] | None = None, body: Schema | None = None,
       operation_id: str) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "summary": summary,
                                 "description": description, "tags": [tag],
                                 "responses": resp}
    if security is not None:
        operation["security"] = security
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    return operation


def path_param(name: str, description: str, schema: Schema | None = None) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string", "minLength": 1,
                                 "maxLength": contract.LIMITS.task_id}}


def query(name: str, description: str, schema: Schema | IntQuery) -> Schema:
    if isinstance(schema, IntQuery):
        schema = schema.schema()
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


def _openapi30(schema: Any) -> Any:
    """msgspec's JSON Schema (2020-12) in OpenAPI 3.0's dialect: `anyOf [X, null]` is X
    with `nullable`, an enum of strings says its type, `default: null` goes."""
    if isinstance(schema, list):
        return [_openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _openapi30(value) for key, value in schema.items()}
    variants = out.get("anyOf")
    if variants and {"type": "null"} in variants:
        rest = [v for v in variants if v != {"type": "null"}]
        del out["anyOf"]
        out.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        out["nullable"] = True
    if "enum" in out and "type" not in out and all(isinstance(v, str) for v in out["enum"]):
        out["type"] = "string"
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def body_schemas(config: Config) -> dict[str, Schema]:
    """The request bodies, from the Structs validation decodes with."""
    bodies = contract.BODIES
    _, components = msgspec.json.schema_components(
        [bodies.Register, bodies.Event, bodies.Batch],
        ref_template="#/components/schemas/{name}")
    out: dict[str, Schema] = _openapi30(components)
    limit = config.max_json_bytes
    out["Register"]["properties"]["metadata"] = _any(
        f"Any JSON value, at most {limit} bytes serialized and "
        f"{contract.LIMITS.json_depth} levels deep")
    out["Register"]["properties"]["task_id"]["description"] += "; defaults to " \
        "'{task_type}_{n}'"
    for name in ("Event", "BatchEvent"):
        out[name]["properties"]["result"] = _any(
            f"Any JSON value, at most {limit} bytes serialized and "
            f"{contract.LIMITS.json_depth} levels deep")
    return out


BEARER = [{"bearerAuth": []}]
PRODUCER = [{"apiKey": []}]
NONE: list[dict[str, list[str]]] = []
TASK_ID = path_param("task_id", "The task id")
STATUS_ENUM = {"type": "string", "enum": list(STATUSES)}
SEQ = {"type": "integer", "format": "int64", "minimum": 0}


def _field_schema(hint: Any) -> Schema:
    """A Task field's JSON Schema from its declared type."""
    if hint is Any:
        return {"nullable": True}
    types = typing.get_args(hint) if isinstance(hint, types_.UnionType) else (hint,)
    schema: Schema = {}
    for kind in types:
        if kind is type(None):
            schema["nullable"] = True
        else:
            schema.update(_JSON_TYPES[kind])
    return schema


_JSON_TYPES: dict[Any, Schema] = {
    str: {"type": "string"}, int: {"type": "integer", "format": "int64"},
    float: {"type": "number"}, bool: {"type": "boolean"},
}


def task_schema() -> Schema:
    """The Task: model.Task's public fields in their declared order, each typed from its
    declaration (required unless it may be null), with the bounds and prose written here."""
    details: dict[str, Schema] = {
        "task_id": {"maxLength": contract.LIMITS.task_id},
        "user_id": {"minimum": 0},
        "task_type": {"maxLength": contract.LIMITS.task_type},
        "status": STATUS_ENUM,
        "progress": {"minimum": 0, "maximum": 100},
        "result": _any("Any JSON value the producer reported on completion"),
        "error_type": {"description": "e.g. 'stale' (no change for --stale-after seconds), "
                                      "'interrupted' (in-process job ended by a restart)"},
        "metadata": _any("Any JSON value given at registration"),
        "created_at": {"format": "date-time"},
        "updated_at": {"format": "date-time"},
        "seq": {**SEQ, "description": "Global event number of the task's latest change"},
        "cancel_requested": {"description": "The user cancelled this task"},
    }
    properties: dict[str, Schema] = {}
    for name in TASK_FIELDS:
        properties[name] = {**_field_schema(TASK_TYPES[name]), **details.get(name, {})}
    return {
        "type": "object",
        "required": [name for name in TASK_FIELDS if not properties[name].get("nullable")],
        "properties": properties,
    }


def schemas(config: Config) -> dict[str, Schema]:
    task = task_schema()
    return {
        "Task": task,
        "Envelope": {
            "type": "object", "required": ["code", "message", "data"],
            "properties": {"code": {"type": "integer", "enum": [0]},
                           "message": {"type": "string", "example": "success"},
                           "data": _any("The answer")},
        },
        "Error": {
            "type": "object", "required": ["code", "message", "data"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status", "example": 404},
                "message": {"type": "string", "description": "Why, for humans"},
                "data": {"nullable": True, "enum": [None]},
                "cancel_requested": {"type": "boolean", "description":
                                     "On a producer's 409: the user cancelled the task"},
            },
        },
        **body_schemas(config),
        "BatchResult": {
            "type": "object", "required": ["results"],
            "properties": {"results": {"type": "array", "items": {
                "type": "object", "required": ["task_id", "ok"],
                "properties": {
                    "task_id": nullable({"type": "string"}),
                    "ok": {"type": "boolean"},
                    "seq": {**SEQ, "description": "When ok: the event's seq (a replayed "
                            "`idempotency_key`: the seq of the event it first made)"},
                    "code": {"type": "integer", "description": "When refused: HTTP status "
                             "(422: `idempotency_key` already used with a different event)"},
                    "message": {"type": "string", "description": "When refused: why"},
                    "cancel_requested": {"type": "boolean", "description":
                                         "When refused with 409: the user cancelled the task"},
                }}}},
        },
        "TaskList": {
            "type": "object", "required": ["tasks", "count"],
            "properties": {
                "tasks": {"type": "array", "items": ref("Task")},
                "count": {"type": "integer"},
                "next_before": nullable({**SEQ, "description":
                                         "Pass as `before` for the next page; null at the end"}),
                "seq": {**SEQ, "description": "The latest seq when the list was read "
                        "(resume from it with `since`)"},
                "epoch": {"type": "string", "description": "The database's id"},
                "resync": {"type": "boolean", "description":
                           "With `since`: the seq cannot be replayed; drop the cache"},
            },
        },
        "History": {
            "type": "object",
            "properties": {
                "task_id": {"type": "string"}, "count": {"type": "integer"},
                "next_after": nullable({**SEQ, "description":
                                        "Pass as `after` for the next page; null at the end"}),
                "events": {"type": "array", "items": {"type": "object", "properties": {
                    "seq": SEQ, "status": STATUS_ENUM, "progress": {"type": "number"},
                    "message": nullable({"type": "string"}),
                    "step": nullable({"type": "string"}),
                    "error": nullable({"type": "string"}),
                    "error_type": nullable({"type": "string"}),
                    "timestamp": {"type": "string", "format": "date-time"}}}},
            },
        },
    }


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
