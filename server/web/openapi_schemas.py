"""The schemas of the OpenAPI document (web/openapi.py): small builders of answers,
operations and parameters, the request bodies read from the msgspec Structs of
core/contract.py (every bound from contract.LIMITS), and the components (`schemas`).
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
