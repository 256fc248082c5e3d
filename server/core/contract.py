"""The HTTP contract declared once: every limit, every query parameter and every request
body of the producer API.

validate.py decodes and checks request bodies with the msgspec Structs built here (decode
and validate in one C pass), rest.py and ws.py read their query bounds here, and openapi.py
publishes the Structs' JSON Schema and the same bounds: changing a number in `Limits` changes
the server's answer and the published document together (tests/test_contract.py).

The module deliberately has no `from __future__ import annotations`: the Structs are built
inside `build()` from the limits given, and msgspec must see the annotations as objects.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from .model import STATUSES

INT64_MAX = 2**63 - 1
MAX_USER_ID = INT64_MAX
UNADDRESSABLE_TASK_IDS = (".", "..")  # a URL path cannot carry them as a segment


@dataclass(frozen=True)
class IntQuery:
    """An integer query parameter: `low..high`, `default` when absent or empty."""

    name: str
    low: int
    high: int
    default: int | None = None
    description: str = ""

    def saturate(self, digits: str) -> int:
        """Decimal digits (any number of them) as a value in low..high, one past `high`
        taken as `high`: for a point a client resumes from, where a seq beyond any seq
        there can be is still one beyond the latest (answered with resync), and must not
        reach a query as it is (PostgreSQL's bigint cannot hold it)."""
        significant = digits.lstrip("0")
        if len(significant) > len(str(self.high)):
            return self.high
        return max(self.low, min(int(significant or "0"), self.high))

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer", "minimum": self.low, "maximum": self.high}
        if self.high == INT64_MAX:
            out["format"] = "int64"
        if self.default is not None:
            out["default"] = self.default
        return out


def _default_text_limits() -> dict[str, int]:
    return {"message": 2000, "step": 500, "error": 4000, "error_type": 100}


@dataclass(frozen=True)
class Limits:
    task_id: int = 200
    task_type: int = 100
    idempotency_key: int = 200
    text: dict[str, int] = field(default_factory=_default_text_limits)
    batch_events: int = 1000
    json_depth: int = 100  # levels of nesting in result and metadata
    list_limit: int = 500  # tasks in one page of GET /api/task/tasks
    list_default: int = 50
    history_limit: int = 1000  # events in one answer of GET .../history
    max_wait: int = 30  # seconds of a long poll

    # the query parameters, from the numbers above
    @property
    def wait(self) -> IntQuery:
        return IntQuery("wait", 0, self.max_wait, 0)

    @property
    def list_page(self) -> IntQuery:
        return IntQuery("limit", 1, self.list_limit, self.list_default)

    @property
    def history_page(self) -> IntQuery:
        return IntQuery("limit", 1, self.history_limit, self.history_limit)

    @staticmethod
    def cursor(name: str) -> IntQuery:
        """A seq cursor (`since`, `before`, `after`)."""
        return IntQuery(name, 0, INT64_MAX)


@dataclass(frozen=True)
class Bodies:
    """The request body Structs for one set of limits."""

    Register: type[Struct]
    Event: type[Struct]
    BatchEvent: type[Struct]
    Batch: type[Struct]
    decode_register: msgspec.json.Decoder[Any]
    decode_event: msgspec.json.Decoder[Any]
    decode_batch: msgspec.json.Decoder[Any]


def build(limits: Limits) -> Bodies:
    """The body Structs whose Meta constraints are `limits` (JSON Schema comes with them)."""
    # (capitalised: a class body cannot read a function local named like one of its fields)
    Status = Literal[STATUSES]  # type: ignore[valid-type]
    TaskId = Annotated[str, Meta(min_length=1, max_length=limits.task_id,
                                  description="Printable; not '.' or '..'")]
    Progress = Annotated[float, Meta(ge=0, le=100)]
    text = {name: Annotated[str, Meta(max_length=limit,
                                      description=f"At most {limit} characters (413 beyond)")]
            for name, limit in limits.text.items()}
    Key = Annotated[str, Meta(min_length=1, max_length=limits.idempotency_key,
                              description="As the single form's Idempotency-Key header")]

    class Event(Struct, forbid_unknown_fields=True, kw_only=True):
        status: Status  # type: ignore[valid-type]
        progress: Progress | None = None  # type: ignore[valid-type]
        message: text["message"] | None = None  # type: ignore[valid-type]
        step: text["step"] | None = None  # type: ignore[valid-type]
        error: text["error"] | None = None  # type: ignore[valid-type]
        error_type: text["error_type"] | None = None  # type: ignore[valid-type]
        result: Any | UnsetType = UNSET

    class BatchEvent(Event, kw_only=True):
        task_id: TaskId  # type: ignore[valid-type]
        idempotency_key: Key | None = None  # type: ignore[valid-type]

    class Batch(Struct, forbid_unknown_fields=True):
        events: Annotated[list[BatchEvent], Meta(max_length=limits.batch_events)]

    UserId = (Annotated[int, Meta(ge=0, le=MAX_USER_ID)]
               | Annotated[str, Meta(pattern="^[0-9]{1,19}$",
                                     description="Digits; the value at most 2^63-1")])

    class Register(Struct, forbid_unknown_fields=True, kw_only=True):
        user_id: UserId  # type: ignore[valid-type]
        task_type: Annotated[str, Meta(min_length=1, max_length=limits.task_type)]
        task_id: TaskId | None = None  # type: ignore[valid-type]
        metadata: Any = None

    return Bodies(Register, Event, BatchEvent, Batch, msgspec.json.Decoder(Register),
                  msgspec.json.Decoder(Event), msgspec.json.Decoder(Batch))


LIMITS = Limits()
BODIES = build(LIMITS)


def declare(limits: Limits) -> None:
    """Replace the contract (tests: one limit changed, both validation and OpenAPI follow)."""
    global LIMITS, BODIES
    LIMITS, BODIES = limits, build(limits)


def with_limits(**changes: Any) -> Limits:
    return dataclasses.replace(LIMITS, **changes)


def task_id_problem(value: str) -> str | None:
    """THE task-id rule (HTTP bodies and paths, WebSocket subscribe): what is wrong with a
    non-empty string as a task id, or None."""
    if len(value) > LIMITS.task_id or not value.isprintable():
        return f"must be printable and at most {LIMITS.task_id} characters"
    if value in UNADDRESSABLE_TASK_IDS:
        return "cannot be '.' or '..' (not addressable in a URL path)"
    return None
