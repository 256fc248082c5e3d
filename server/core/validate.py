"""Validation of untrusted request bodies and query values into model operations.

Pure functions: bytes or dicts in, `Register`/`Change` out, or a BadRequest/TooLarge
saying exactly which field is wrong. Nothing here trusts a type, a size or a number.

Every limit and body shape comes from server/core/contract.py. HTTP bodies take the fast path
(`decode_*`): msgspec decodes and checks them against the contract's Structs in one pass.
Whatever it refuses, or a rule a Struct cannot say (printable, '.', nesting depth, size),
is judged again by the field-by-field functions below (`register_body`, `event_body`,
`batch_items`), whose message is the answer: the error envelopes stay exactly as they
were, and in-process producers (dicts, not bytes) use those functions directly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import msgspec

from . import contract, jsonutil
from .auth import parse_user_id
from .errors import BadRequest, TaskPushError, TooLarge
from .model import STATUSES, Change, Register

TEXT_LIMITS = contract.LIMITS.text  # the default limits (kept for readers and tests)
EVENT_FIELDS = frozenset({"status", "progress", "message", "step", "result", "error",
                          "error_type"})
REGISTER_FIELDS = frozenset({"task_id", "user_id", "task_type", "metadata"})


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
    problem = contract.task_id_problem(value)
    if problem is not None:
        raise BadRequest(f"{where} {problem}")
    return value


def idempotency_key(value: str) -> str:
    """The Idempotency-Key header of a producer event: retries with it change nothing."""
    limit = contract.LIMITS.idempotency_key
    if not value or len(value) > limit or not value.isascii() or not value.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1-{limit} printable ASCII characters")
    return value


def _text(data: dict[str, Any], name: str, where: str = "") -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{where}{name} must be a string")
    limit = contract.LIMITS.text[name]
    if len(value) > limit:
        raise TooLarge(f"{where}{name} is longer than {limit} characters")
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
    problem = _json_value_problem(value, contract.LIMITS.json_depth)
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
    limit = contract.LIMITS.task_type
    if len(task_type) > limit or not task_type.isprintable():
        raise BadRequest(f"task_type must be printable and at most {limit} characters")
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
        **{name: _text(data, name, where) for name in contract.LIMITS.text},
    }
    if "result" in data:
        kwargs["result"] = bounded_json(data["result"], f"{where}result", json_limit)
    return Change(task, status, **kwargs)


def batch_body(data: dict[str, Any]) -> list[Any]:
    _unknown(data, frozenset({"events"}))
    events = data.get("events")
    if not isinstance(events, list):
        raise BadRequest("events must be a list")
    limit = contract.LIMITS.batch_events
    if len(events) > limit:
        raise TooLarge(f"at most {limit} events per request, got {len(events)}")
    return events


@dataclass(frozen=True, slots=True)
class Refused:
    """One event of a batch refused on its own (the others still apply)."""

    task_id: str | None
    error: TaskPushError


def batch_items(data: dict[str, Any], json_limit: int) -> list[Change | Refused]:
    """A batch body, event by event, each exactly as the single form would judge it."""
    out: list[Change | Refused] = []
    for index, item in enumerate(batch_body(data)):
        where = f"events[{index}]."
        try:
            if not isinstance(item, dict):
                raise BadRequest(f"events[{index}] must be an object")
            fields = dict(item)
            target = task_id(fields.pop("task_id", None), f"{where}task_id")
            key = fields.pop("idempotency_key", None)
            change = event_body(target, fields, json_limit, where)
            if key is not None:  # the batch form of the single event's Idempotency-Key
                if not isinstance(key, str):
                    raise BadRequest(f"{where}idempotency_key must be a string")
                change = dataclasses.replace(change, idem_key=idempotency_key(key))
        except TaskPushError as exc:
            raw_id = item.get("task_id") if isinstance(item, dict) else None
            out.append(Refused(raw_id if isinstance(raw_id, str) else None, exc))
            continue
        out.append(change)
    return out


class _Doubt(Exception):
    """The fast path cannot vouch for a body: the field-by-field path judges it."""


def _fast_change(task: str, raw: Any, json_limit: int, idem_key: str | None = None
                 ) -> Change:
    """A Change from an Event/BatchEvent Struct msgspec accepted (types and bounds hold)."""
    progress = raw.progress
    if progress is not None and progress.is_integer():
        progress = int(progress)  # as the field-by-field path answers 40.0
    if raw.result is msgspec.UNSET:
        return Change(task, raw.status, progress, raw.message, raw.step, error=raw.error,
                      error_type=raw.error_type, idem_key=idem_key)
    problem = _json_value_problem(raw.result, contract.LIMITS.json_depth)
    if problem is not None or len(jsonutil.dumpb(raw.result)) > json_limit:
        raise _Doubt
    return Change(task, raw.status, progress, raw.message, raw.step, raw.result, raw.error,
                  raw.error_type, idem_key=idem_key)


def decode_register(body: bytes, json_limit: int) -> Register:
    """POST /api/task/tasks: the body bytes to a Register (or the exact refusal)."""
    try:
        raw = contract.BODIES.decode_register.decode(body)
        given_id, task_type, user_id = raw.task_id, raw.task_type, raw.user_id
        if isinstance(user_id, str):
            # msgspec matches the schema's `$` the Python way: "7\n" would pass it
            if not (user_id.isascii() and user_id.isdigit()):
                raise _Doubt
            user_id = int(user_id)
            if user_id > contract.MAX_USER_ID:
                raise _Doubt
        if not task_type.isprintable() or (
                given_id is not None and contract.task_id_problem(given_id) is not None):
            raise _Doubt
        metadata = raw.metadata
        if metadata is not None:
            problem = _json_value_problem(metadata, contract.LIMITS.json_depth)
            if problem is not None or len(jsonutil.dumpb(metadata)) > json_limit:
                raise _Doubt
    except (msgspec.MsgspecError, _Doubt, ValueError, TypeError, RecursionError):
        return register_body(json_object(body), json_limit)
    return Register(given_id, user_id, task_type, metadata, origin="http")


def decode_event(task: str, body: bytes, json_limit: int) -> Change:
    """POST .../events: the body bytes to a Change of `task` (or the exact refusal)."""
    try:
        return _fast_change(task, contract.BODIES.decode_event.decode(body), json_limit)
    except (msgspec.MsgspecError, _Doubt, ValueError, TypeError, RecursionError):
        return event_body(task, json_object(body), json_limit)


def decode_batch(body: bytes, json_limit: int) -> list[Change | Refused]:
    """POST /api/task/events: the body bytes to one Change or Refused per event. One event
    in doubt sends the whole body down the field-by-field path (refusals are rare)."""
    try:
        batch = contract.BODIES.decode_batch.decode(body)
        out: list[Change | Refused] = []
        for raw in batch.events:
            if contract.task_id_problem(raw.task_id) is not None:
                raise _Doubt
            key = raw.idempotency_key
            if key is not None and not (key.isascii() and key.isprintable()):
                raise _Doubt
            out.append(_fast_change(raw.task_id, raw, json_limit, key))
        return out
    except (msgspec.MsgspecError, _Doubt, ValueError, TypeError, RecursionError):
        return batch_items(json_object(body), json_limit)


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


def query_int(raw: str | None, param: contract.IntQuery) -> int | None:
    """A declared integer query parameter (contract.IntQuery)."""
    return int_param(raw, param.name, low=param.low, high=param.high, default=param.default)
