"""JSON in one place: orjson writes (several times faster than the stdlib on the hot paths:
every pushed update), the stdlib where orjson refuses (integers beyond 64 bits from
in-process producers); msgspec reads (as fast as orjson, and exact on big integers)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson

_OPTIONS = orjson.OPT_NON_STR_KEYS
_DECODER = msgspec.json.Decoder()


def dumpb(value: Any) -> bytes:
    """Compact UTF-8 JSON. NaN and infinities become null (orjson's rule)."""
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()


def dumps(value: Any) -> str:
    return dumpb(value).decode()


def loads(data: bytes | str) -> Any:
    """Strict JSON (raises ValueError): UTF-8 only, no NaN/Infinity nor numbers beyond a
    double's range (`1e400` would be read as infinity, which orjson writes as null), no
    lone surrogates (no UTF-8 store can hold them), nesting bounded, integers of any size
    kept exact. msgspec's decoder does all of it in one pass; orjson (3.13 here) reads
    integers beyond 64 bits as lossy floats, so it only writes."""
    try:
        return _DECODER.decode(data)
    except msgspec.MsgspecError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
