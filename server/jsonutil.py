"""JSON in one place: orjson where it can (several times faster than the stdlib on the
hot paths: every request body, every pushed update), the stdlib where orjson refuses
(integers beyond 64 bits from in-process producers)."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS

JSONDecodeError = orjson.JSONDecodeError  # a ValueError


def dumpb(value: Any) -> bytes:
    """Compact UTF-8 JSON. NaN and infinities become null (orjson's rule)."""
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()


def dumps(value: Any) -> str:
    return dumpb(value).decode()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A number too large for a double (`1e400`) would be read as infinity, which no JSON
    can carry and orjson writes as null: refused like NaN, not stored as null."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large a number")
    return value


def loads(data: bytes | str) -> Any:
    """Strict JSON: no NaN/Infinity (nor numbers beyond a double's range), UTF-8 only,
    nesting bounded (raises ValueError)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits, which are valid JSON: the stdlib decides
        # (and orjson's other refusals, such as 1e400, the stdlib refuses again)
        if isinstance(data, bytes):
            data = data.decode("utf-8")  # not the stdlib's UTF-16/32 detection
        try:
            value = json.loads(data, parse_constant=_no_constants, parse_float=_finite)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        _refuse_lone_surrogates(value)
        return value


def _refuse_lone_surrogates(value: Any) -> None:
    """The stdlib accepts "\\ud800", which no UTF-8 store can hold (SQLite would fail the
    whole transaction on it): refuse it here, as orjson does."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError is a ValueError
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
