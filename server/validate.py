"""Validation of untrusted request bodies and query values into model operations.

Pure functions: bytes or dicts in, `Register`/`Change` out, or a BadRequest/TooLarge
saying exactly which field is wrong. Nothing here trusts a type, a size or a number.
"""

from __future__ import annotations

import math
from typing import Any

from . import jsonutil
from .auth import parse_user_id
from .errors import BadRequest, TooLarge
from .model import STATUSES, Change, Register

MAX_TASK_ID = 200
MAX_TASK_TYPE = 100
TEXT_LIMITS = {"message": 2000, "step": 500, "error": 4000, "error_type": 100}
EVENT_FIELDS = frozenset({"status", "progress", "message", "step", "result", "error",
                          "error_type"})
REGISTER_FIELDS = frozenset({"task_id", "user_id", "task_type", "metadata"})
MAX_BATCH_EVENTS = 1000
MAX_JSON_DEPTH = 100  # levels of nesting in result and metadata


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting (RecursionError is refused)."""
    if not body:
        raise BadRequest("request body must be JSON")
    try:
        return jsonutil.loads(body)
    except ValueError:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body is not UTF-8") from None
        raise BadRequest("request body is not valid JSON") from None


def json_object(body: bytes) -> dict[str, Any]:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _unknown(data: dict[str, Any], allowed: frozenset[str], where: str = "") -> None:
    if data.keys() <= allowed:
        return
    extra = sorted(k for k in data if k not in allowed)
    if extra:
        shown = ", ".join(repr(k[:40]) for k in extra[:5])
        raise BadRequest(f"{where}unknown field(s): {shown}")


def task_id(value: Any, where: str = "task_id") -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where} must be a non-empty string")
    if len(value) > MAX_TASK_ID or not value.isprintable():
        raise BadRequest(f"{where} must be printable and at most {MAX_TASK_ID} characters")
    if value in (".", ".."):
        raise BadRequest(f"{where} cannot be '.' or '..' (not addressable in a URL path)")
    return value


def idempotency_key(value: str) -> str:
    """The Idempotency-Key header of a producer event: retries with it change nothing."""
    if not value or len(value) > 200 or not value.isascii() or not value.isprintable():
        raise BadRequest("Idempotency-Key must be 1-200 printable ASCII characters")
    return value


def _text(data: dict[str, Any], name: str, where: str = "") -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{where}{name} must be a string")
    if len(value) > TEXT_LIMITS[name]:
        raise TooLarge(f"{where}{name} is longer than {TEXT_LIMITS[name]} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from Python code: not storable text
        raise BadRequest(f"{where}{name} is not valid Unicode text") from None
    return value


def _json_value_problem(value: Any, limit: int) -> str | None:
    """What makes a Python value unfit to store as JSON, walked iteratively (a deep value
    must not blow this stack either): nesting beyond `limit`, or a non-finite float (an
    in-process producer's NaN or infinity, which orjson would quietly write as null)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            if isinstance(item, float) and not math.isfinite(item):
                return "holds a number that is not finite (NaN, Infinity or beyond 1.8e308)"
            continue
        if depth > limit:
            return f"is nested deeper than {limit} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


def bounded_json(value: Any, name: str, limit: int) -> Any:
    # Nesting the parser barely accepted could not be serialized again deeper in the
    # stack (answer, push): refuse it here, with room to spare.
    problem = _json_value_problem(value, MAX_JSON_DEPTH)
    if problem is not None:
        raise BadRequest(f"{name} {problem}")
    try:
        size = len(jsonutil.dumpb(value))
    except (ValueError, TypeError, RecursionError):
        raise BadRequest(f"{name} is not serializable JSON") from None
    if size > limit:
        raise TooLarge(f"{name} is {size} bytes; the limit is {limit}")
    return value


def progress(value: Any, where: str = "") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{where}progress must be a number from 0 to 100")
    if isinstance(value, int) and not 0 <= value <= 100:
        raise BadRequest(f"{where}progress must be a number from 0 to 100")
    if isinstance(value, float) and (not math.isfinite(value) or not 0 <= value <= 100):
        raise BadRequest(f"{where}progress must be a number from 0 to 100")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def register_body(data: dict[str, Any], json_limit: int, origin: str = "http") -> Register:
    """The one place a `Register` is built from fields: the HTTP producer API and the
    in-process one (`origin="inprocess"`) both call it; TaskService only adds its limit."""
    _unknown(data, REGISTER_FIELDS)
    user_id = parse_user_id(data.get("user_id"))
    if user_id is None:
        raise BadRequest("user_id must be a non-negative integer (or a string of digits)")
    task_type = data.get("task_type")
    if not isinstance(task_type, str) or not task_type:
        raise BadRequest("task_type must be a non-empty string")
    if len(task_type) > MAX_TASK_TYPE or not task_type.isprintable():
        raise BadRequest(f"task_type must be printable and at most {MAX_TASK_TYPE} characters")
    raw_id = data.get("task_id")
    given_id = None if raw_id is None else task_id(raw_id)
    metadata = bounded_json(data.get("metadata"), "metadata", json_limit)
    return Register(given_id, user_id, task_type, metadata, origin=origin)


def event_body(task: str, data: dict[str, Any], json_limit: int, where: str = "") -> Change:
    """One event for `task`: the fields of SPEC's events endpoint."""
    _unknown(data, EVENT_FIELDS, where)
    status = data.get("status")
    if status not in STATUSES:
        raise BadRequest(f"{where}status must be one of {', '.join(STATUSES)}")
    kwargs: dict[str, Any] = {
        "progress": progress(data.get("progress"), where),
        **{name: _text(data, name, where) for name in TEXT_LIMITS},
    }
    if "result" in data:
        kwargs["result"] = bounded_json(data["result"], f"{where}result", json_limit)
    return Change(task, status, **kwargs)


def batch_body(data: dict[str, Any]) -> list[Any]:
    _unknown(data, frozenset({"events"}))
    events = data.get("events")
    if not isinstance(events, list):
        raise BadRequest("events must be a list")
    if len(events) > MAX_BATCH_EVENTS:
        raise TooLarge(f"at most {MAX_BATCH_EVENTS} events per request, got {len(events)}")
    return events


def int_param(raw: str | None, name: str, *, low: int, high: int, default: int | None = None
              ) -> int | None:
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value


def status_param(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    if raw not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    return raw
