"""The task model: states, the operations producers and users ask for, and the pure rules
that turn a task's current state plus an operation into its next state (or refuse it).

No I/O here: every engine runs these rules inside its transactions (`apply_op` over the
engine's `TxnView`), and they are unit-tested without a database.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import math
import secrets
import time
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

import msgspec
from msgspec.structs import asdict

from .errors import Conflict, KeyReused, NotFound, TaskActive, TaskFinal, TooMany

STATUSES = ("pending", "running", "progress", "completed", "failed", "cancelled")
ACTIVE = frozenset({"pending", "running", "progress"})
TERMINAL = frozenset({"completed", "failed", "cancelled"})

_T = TypeVar("_T")
INTERNAL = "internal"  # a column clients never see
FIXED = "fixed"  # set at registration, never moved by a change
Internal = Annotated[_T, INTERNAL]
Fixed = Annotated[_T, FIXED]


class Task(msgspec.Struct):
    """A task: the one declaration of its fields. The public JSON (`public`, the pushed
    `task_status`, REST answers, the OpenAPI schema) is its fields in this order, minus
    the `Internal` ones; each engine's columns are all of them, and the UPDATE of a change
    sets those not `Fixed`. A field typed `Any` is stored as JSON text, `bool` as 0/1.

    A msgspec Struct rather than a dataclass: built from a row, or copied for a change, in
    C, and `public` is one C call (docs/performance.md)."""

    task_id: Fixed[str]
    user_id: Fixed[int]
    task_type: Fixed[str]
    status: str
    progress: float
    message: str | None
    step: str | None
    result: Any
    error: str | None
    error_type: str | None
    metadata: Fixed[Any]
    created_at: Fixed[str]
    updated_at: str
    seq: int
    cancel_requested: bool
    origin: Internal[Fixed[str]] = "http"  # 'http' | 'inprocess'
    created_seq: Internal[Fixed[int]] = 0  # seq of the registration: a stable paging cursor


def _marked(hint: Any, mark: str) -> bool:
    while typing.get_origin(hint) is Annotated:
        if mark in hint.__metadata__:
            return True
        hint = hint.__origin__
    return False


def _unmarked(hint: Any) -> Any:
    while typing.get_origin(hint) is Annotated:
        hint = hint.__origin__
    return hint


_HINTS = typing.get_type_hints(Task, include_extras=True)
TASK_TYPES: dict[str, Any] = {name: _unmarked(hint) for name, hint in _HINTS.items()}
TASK_COLUMNS = tuple(_HINTS)  # every field, in declaration order
# Public fields of a task, in the order they are documented (SPEC `<task>`).
TASK_FIELDS = tuple(name for name, hint in _HINTS.items() if not _marked(hint, INTERNAL))
INTERNAL_FIELDS = tuple(name for name in TASK_COLUMNS if name not in TASK_FIELDS)
CHANGING_FIELDS = tuple(name for name, hint in _HINTS.items() if not _marked(hint, FIXED))
TaskJSON = dict[str, Any]  # a task as clients see it (`public`)
_UNSET: Any = object()


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds and a Z; sorts lexicographically."""
    return utc_iso(time.time())


_second_text: tuple[int, str] = (-1, "")  # the last whole second formatted (once a second)


def utc_iso(seconds: float) -> str:
    global _second_text
    frac, whole_f = math.modf(seconds)  # rounded to microseconds as datetime does
    whole, micros = int(whole_f), round(frac * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    millis = micros // 1000
    if _second_text[0] != whole:
        text = _dt.datetime.fromtimestamp(whole, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_text = (whole, text)
    return f"{_second_text[1]}{millis:03d}Z"


@dataclass(frozen=True, slots=True)
class Register:
    """Create a task (status pending). Same body for an existing id: idempotent."""

    task_id: str | None
    user_id: int
    task_type: str
    metadata: Any = None
    origin: str = "http"
    max_active: int | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """A new state for an existing task. Fields left as None keep their current value."""

    task_id: str
    status: str
    progress: float | None = None
    message: str | None = None
    step: str | None = None
    result: Any = _UNSET
    error: str | None = None
    error_type: str | None = None
    owner: int | None = None  # when set, a task of another user is "not found"
    cancel_requested: bool = False
    expect_seq: int | None = None  # apply only if the task is still at this seq (sweeper)
    idem_key: str | None = None  # a retried request with the same key changes nothing


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove a finished task and its history, leaving a tombstone for resuming clients."""

    task_id: str
    owner: int | None = None
    allow_active: bool = False


Operation = Register | Change | Delete


class Kind(enum.StrEnum):
    """What an operation did, decided once by the store where it applies the operation;
    the hub (what to push), the metrics (what to count) and the producer API (201 or 200)
    all read this and never re-derive it."""

    CREATED = "created"  # a new task (a Register with no task of that id before)
    CHANGED = "changed"  # a new state of the task (a Change applied)
    DELETED = "deleted"  # the task is gone, a tombstone left (a Delete applied)
    UNCHANGED = "unchanged"  # already so: the same Register again, or a retried Change
    #                          with an idempotency key already applied; nothing committed
    REFUSED = "refused"  # not applied: `error` says why, or (error None) the Change's
    #                      `expect_seq` condition no longer held (the task moved meanwhile)


NEWS = frozenset({Kind.CREATED, Kind.CHANGED, Kind.DELETED})  # a commit clients must hear of


@dataclass(slots=True)
class Outcome:
    """What one operation did: its kind, the task after it, or the error that refused it."""

    op: Operation
    task: Task | None = None
    error: Exception | None = None
    kind: Kind = Kind.CHANGED
    seq: int | None = None

    def __post_init__(self) -> None:
        if self.error is not None:
            self.kind = Kind.REFUSED

    def refuse(self, error: Exception | None = None) -> None:
        """Not applied: because of `error`, or (None) because its condition did not hold."""
        self.kind, self.error = Kind.REFUSED, error

    @property
    def ok(self) -> bool:
        """The operation's effect holds (applied now, or already before)."""
        return self.kind is not Kind.REFUSED

    @property
    def news(self) -> bool:
        """Something was committed that subscribers and counters must see."""
        return self.kind in NEWS


class Published(Protocol):
    """A committed change as the push side reads it, whoever committed it: this node's
    `Outcome` (refused ones included, `news` False) or another node's `Publication`."""

    @property
    def seq(self) -> int | None: ...

    @property
    def kind(self) -> Kind: ...

    @property
    def task(self) -> Task | None: ...

    @property
    def news(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Publication:
    """A change another node committed (the cluster feed): its seq, what it did and the
    task after it (before it, for a delete). Always news."""

    seq: int
    kind: Kind
    task: Task

    @property
    def news(self) -> bool:
        return True


def same_registration(task: Task, op: Register) -> bool:
    return (
        task.user_id == op.user_id
        and task.task_type == op.task_type
        and task.metadata == op.metadata
    )


def event_digest(change: Change) -> str:
    """What a change asks for, as stored with its idempotency key: its event fields as
    validated (status, progress, message, step, result, error, error_type; a result given
    as null differs from none given), never the request's bytes, so the same event sent
    again with other whitespace, key order or `40.0` for `40` is the same event."""
    given = change.result is not _UNSET
    fields = [change.status, None if change.progress is None else float(change.progress),
              change.message, change.step, change.error, change.error_type, given,
              change.result if given else None]
    return hashlib.sha256(msgspec.json.encode(fields, order="sorted")).hexdigest()[:32]


def next_state(task: Task, change: Change, seq: int, now: str) -> Task:
    """The task after `change`, or TaskFinal if it already reached a terminal state."""
    if task.status in TERMINAL:
        extra = {"cancel_requested": True} if task.cancel_requested else {}
        raise TaskFinal(f"task {task.task_id} is already {task.status}", **extra)
    new = task.__copy__()
    new.status = change.status
    if change.progress is not None:
        new.progress = change.progress
    elif change.status == "completed":
        new.progress = 100
    for name in ("message", "step", "error", "error_type"):
        value = getattr(change, name)
        if value is not None:
            setattr(new, name, value)
    if change.result is not _UNSET:
        new.result = change.result
    if change.cancel_requested:
        new.cancel_requested = True
    new.updated_at = now
    new.seq = seq
    return new


def new_task(op: Register, task_id: str, seq: int, now: str) -> Task:
    return Task(task_id=task_id, user_id=op.user_id, task_type=op.task_type,
                status="pending", progress=0, message=None, step=None, result=None,
                error=None, error_type=None, metadata=op.metadata, created_at=now,
                updated_at=now, seq=seq, cancel_requested=False, origin=op.origin,
                created_seq=seq)


def public(task: Task) -> TaskJSON:
    """The task as clients see it (drops internal columns)."""
    out = asdict(task)
    for name in INTERNAL_FIELDS:
        del out[name]
    return out


class TxnView(Protocol):
    """One write transaction's state as the rules see it; each engine implements it over
    its own connection (reads see the batch so far, writes are the engine's to batch)."""

    def load(self, task_id: str) -> Task | None: ...

    def applied_with_key(self, task_id: str, key: str) -> tuple[int, str | None] | None:
        """The seq and `event_digest` of the change this idempotency key already made to
        the task, if any (digest None: recorded before digests were kept)."""
        ...

    def active_count(self, user_id: int) -> int:
        """The user's active tasks, this batch's changes so far included."""
        ...

    def changed(self, task: Task, now: str, key: str | None, digest: str | None = None
                ) -> None: ...

    def created(self, task: Task, now: str) -> None: ...

    def deleted(self, task: Task, seq: int, now: str) -> None: ...


def apply_op(view: TxnView, op: Operation, seq: int, now: str) -> tuple[Outcome, int]:
    """Apply one operation inside a transaction whose last allocated seq is `seq`: the
    owner check, idempotency keys, `expect_seq`, the active-task quota, task-id generation,
    then `next_state` / `new_task`. Returns the outcome and the last seq allocated; a
    refusal is in the outcome, never raised (the batch goes on)."""
    outcome = Outcome(op)
    try:
        if isinstance(op, Change):  # the hot path, inline
            task = view.load(op.task_id)
            if task is None or (op.owner is not None and task.user_id != op.owner):
                raise NotFound(f"task {op.task_id} not found")
            digest = None
            if op.idem_key is not None:
                digest = event_digest(op)
                done = view.applied_with_key(op.task_id, op.idem_key)
                if done is not None:
                    if done[1] is not None and done[1] != digest:
                        raise KeyReused(f"Idempotency-Key {op.idem_key!r} was already used"
                                        f" for task {op.task_id} with a different event")
                    outcome.task, outcome.seq, outcome.kind = task, done[0], Kind.UNCHANGED
                    return outcome, seq
            if op.expect_seq is not None and task.seq != op.expect_seq:
                outcome.refuse()  # the task moved since the caller looked: not applied
                outcome.task = task
                return outcome, seq
            new = next_state(task, op, seq + 1, now)
            seq += 1
            view.changed(new, now, op.idem_key, digest)
            outcome.task, outcome.seq, outcome.kind = new, seq, Kind.CHANGED
        elif isinstance(op, Register):
            seq = _register(view, op, seq, now, outcome)
        else:
            seq = _delete(view, op, seq, now, outcome)
    except (NotFound, Conflict, TooMany, KeyReused) as exc:  # nothing allocated: seq as it was
        outcome.refuse(exc)
    return outcome, seq


def _register(view: TxnView, op: Register, seq: int, now: str, outcome: Outcome) -> int:
    if op.task_id is not None:
        existing = view.load(op.task_id)
        if existing is not None:
            if not same_registration(existing, op):
                raise Conflict(f"task {op.task_id} already exists with a different body")
            outcome.task, outcome.seq = existing, existing.seq
            outcome.kind = Kind.UNCHANGED
            return seq
    if op.max_active is not None:
        count = view.active_count(op.user_id)
        if count >= op.max_active:
            raise TooMany(f"user {op.user_id} already has {count} active tasks")
    seq += 1
    task_id = op.task_id if op.task_id is not None else f"{op.task_type}_{seq}"
    if op.task_id is None and view.load(task_id) is not None:
        task_id = f"{op.task_type}_{seq}_{secrets.token_hex(4)}"
    task = new_task(op, task_id, seq, now)
    view.created(task, now)
    outcome.task, outcome.seq, outcome.kind = task, seq, Kind.CREATED
    return seq


def _delete(view: TxnView, op: Delete, seq: int, now: str, outcome: Outcome) -> int:
    task = view.load(op.task_id)
    if task is None or (op.owner is not None and task.user_id != op.owner):
        raise NotFound(f"task {op.task_id} not found")
    if task.status in ACTIVE and not op.allow_active:
        raise TaskActive(f"task {op.task_id} is {task.status}; cancel it first")
    seq += 1  # the tombstone's seq is above every deleted event's: seq never goes back
    view.deleted(task, seq, now)
    outcome.task, outcome.seq, outcome.kind = task, seq, Kind.DELETED
    return seq
