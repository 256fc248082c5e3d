"""What is waiting to be sent, in order, with progress coalesced: no I/O, no clock of its own.

Every report (a registration or an event) is an `Item` in one queue; the sender takes the
head of the queue as one request: a registration alone (`POST /api/task/tasks`), or the
events up to the next registration as one batch (`POST /api/task/events`) of at most
MAX_BATCH events and `max_bytes` of JSON (an event larger than that goes alone), well
below the server's default --max-body-bytes: a body over it is refused whole (413), and
the sender then has to split it. Each item is serialized here, once, strictly (no NaN, no
lone surrogate, JSON types only): one that is not JSON is taken with `problem` set and
never sent, so it cannot make the server refuse its neighbours' request. A progress event
for a task replaces the queued progress event of that task when nothing else of that task
was queued after it (latest wins, merged field by field as the server would), so a fast loop
costs one event per flush. A state change or a terminal state is never merged or dropped by
coalescing. `read_batch` turns the server's answers into outcomes; `retry_after` says what
is worth retrying.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_BATCH = 1000  # the server's limit per batch request
MAX_BATCH_BYTES = 512 * 1024  # half the server's default --max-body-bytes (1 MiB)
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
_BATCH_HEAD, _BATCH_TAIL = b'{"events":[', b"]}"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
log = logging.getLogger("taskpush_client")


class Ticket:
    """The outcome of one report, set once by the sender; waited on from any thread, or
    awaited through callbacks (`Report.__await__`)."""

    __slots__ = ("_callbacks", "_event", "_lock", "cancelled", "value")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Ticket], None]] = []
        self.value: dict[str, Any] | None = None  # the server's answer for this report
        self.cancelled = False  # refused because the user cancelled the task

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, value: dict[str, Any] | None = None, *, cancelled: bool = False) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.value, self.cancelled = value, cancelled
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:  # run on the sender: a failing one must not stop it
            try:
                callback(self)
            except Exception:
                log.exception("taskpush: a report's callback failed")

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)

    def add_callback(self, callback: Callable[[Ticket], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)


@dataclass(eq=False)
class Item:
    kind: str  # "register" or "event"
    task_id: str
    body: dict[str, Any]
    deadline: float  # monotonic time after which it is dropped
    queued_at: float
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    ticket: Ticket = field(default_factory=Ticket)
    merged: int = 0  # progress events folded into this one
    encoded: bytes | None = None  # the request body (register) or batch entry (event)
    problem: str | None = None  # why it cannot be sent (not JSON): dropped with a warning

    @property
    def is_progress(self) -> bool:
        return self.kind == "event" and self.body.get("status") == "progress"

    def wire(self) -> dict[str, Any]:
        """The item as one entry of a batch request."""
        return {"task_id": self.task_id, **self.body, "idempotency_key": self.key}

    def encode(self) -> int:
        """Serialize (cached until the item changes); the size in bytes, 0 if it is not
        JSON (then `problem` says why)."""
        if self.encoded is None and self.problem is None:
            value = self.body if self.kind == "register" else self.wire()
            try:
                self.encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                                          allow_nan=False).encode("utf-8")
            except (TypeError, ValueError, RecursionError) as exc:  # UnicodeError: ValueError
                self.problem = (f"{self.describe()} not sent: not JSON "
                                f"({type(exc).__name__}: {str(exc)[:100]})")
        return len(self.encoded or b"")

    def describe(self) -> str:
        if self.kind == "register":
            return f"registration of task {self.task_id}"
        return f"{self.body.get('status')} event of task {self.task_id}"


def batch_body(items: list[Item]) -> bytes:
    """The body of `POST /api/task/events` for encoded events."""
    return _BATCH_HEAD + b",".join(item.encoded or b"" for item in items) + _BATCH_TAIL


def batch_size(items: list[Item]) -> int:
    return len(_BATCH_HEAD) + len(_BATCH_TAIL) + sum(
        len(item.encoded or b"") for item in items) + max(len(items) - 1, 0)


class Outbox:
    """The ordered queue. Not thread-safe by itself: the sender guards it with its lock."""

    def __init__(self) -> None:
        self.queue: list[Item] = []
        self._last: dict[str, Item] = {}  # the latest queued item of each task
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self.queue)

    def put(self, item: Item) -> Item:
        """Queue `item`, or fold a progress event into the task's queued one; returns the
        item that carries it (its ticket answers for both)."""
        last = self._last.get(item.task_id)
        if item.is_progress and last is not None and last.is_progress:
            last.body.update(item.body)
            last.deadline = max(last.deadline, item.deadline)
            last.merged += 1
            last.encoded = last.problem = None  # serialized again when taken
            self.coalesced += 1
            return last
        self.queue.append(item)
        self._last[item.task_id] = item
        return item

    def oldest_progress_only(self) -> float | None:
        """When every queued item is a progress event: when the oldest was queued (the
        sender waits up to its max delay for more); else None (send now)."""
        if not self.queue or any(not item.is_progress for item in self.queue):
            return None
        return min(item.queued_at for item in self.queue)

    def take(self, max_bytes: int = MAX_BATCH_BYTES) -> list[Item]:
        """The next request's items, removed from the queue, serialized: a registration
        alone, or the events up to the next registration, at most MAX_BATCH of them and at
        most `max_bytes` as one batch body (an event larger than that alone). Items that
        are not JSON are taken too (in order, `problem` set), adding nothing to the size."""
        if not self.queue:
            return []
        if self.queue[0].kind == "register":
            taken = [self.queue[0]]
            taken[0].encode()
        else:
            taken = []
            size, sendable = len(_BATCH_HEAD) + len(_BATCH_TAIL), 0
            for item in self.queue:
                if item.kind != "event" or len(taken) == MAX_BATCH:
                    break
                length = item.encode()
                if item.encoded is not None:
                    grown = size + length + (1 if sendable else 0)  # the comma
                    if sendable and grown > max_bytes:
                        break
                    size, sendable = grown, sendable + 1
                taken.append(item)
        del self.queue[:len(taken)]
        for item in taken:
            if self._last.get(item.task_id) is item:
                del self._last[item.task_id]
        return taken


def retry_after(status: int | None, headers: dict[str, str] | None = None) -> float | None:
    """Seconds the server asked us to wait (Retry-After), 0 to use our own backoff, or None
    when the answer is final. `status` None means the request never got an answer
    (connection refused or reset, timeout)."""
    if status is None:
        return 0.0
    if status not in RETRY_STATUSES:
        return None
    value = (headers or {}).get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:  # absent, or an HTTP date: our own backoff
        return 0.0
    if not math.isfinite(seconds):  # nan, inf: a broken proxy, not a number to sleep
        return 0.0
    return min(max(seconds, 0.0), 30.0)


def malformed(items: list[Item], status: int, body: Any) -> str | None:
    """Why a success answer is not taskpush's answer to this request (an HTML page from a
    proxy, results that are not objects, a count that differs), or None when it is one.
    Such an answer says nothing about the reports: the sender retries them (every event
    carries its idempotency key, so a retry is never recorded twice)."""
    if not 200 <= status < 300:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return f"HTTP {status} without a JSON envelope"
    if items[0].kind == "register":
        return None
    results = data.get("results")
    if not isinstance(results, list) or len(results) != len(items):
        return f"HTTP {status} without one result per event"
    if not all(isinstance(result, dict) for result in results):
        return f"HTTP {status} with a result that is not an object"
    return None


@dataclass
class Outcome:
    value: dict[str, Any] | None
    cancelled: bool = False  # the user cancelled the task
    problem: str | None = None  # refused for a reason worth a warning


def read_register(item: Item, status: int, body: Any) -> Outcome:
    if status in (200, 201) and isinstance(body, dict):
        return Outcome(body.get("data"))
    return Outcome(None, problem=f"{item.describe()} refused: HTTP {status}: {_message(body)}")


def read_batch(items: list[Item], status: int, body: Any) -> list[Outcome]:
    """One outcome per item from a batch answer (200 with per-event results); any other
    final status refuses them all."""
    results = body.get("data", {}).get("results") if isinstance(body, dict) and \
        isinstance(body.get("data"), dict) else None
    if status != 200 or not isinstance(results, list) or len(results) != len(items):
        why = f"HTTP {status}: {_message(body)}"
        return [Outcome(None, problem=f"{item.describe()} refused: {why}") for item in items]
    outcomes = []
    for item, result in zip(items, results):  # as many (checked above)
        if not isinstance(result, dict):
            outcomes.append(Outcome(None, problem=f"{item.describe()}: malformed answer"))
        elif result.get("ok"):
            outcomes.append(Outcome(result))
        elif result.get("cancel_requested"):
            outcomes.append(Outcome(result, cancelled=True))
        elif result.get("code") == 409:  # already finished: the terminal rule, not a problem
            outcomes.append(Outcome(result))
        else:
            outcomes.append(Outcome(result, problem=f"{item.describe()} refused: "
                                    f"{result.get('code')} {result.get('message')}"))
    return outcomes


def _message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message", ""))[:200]
    return ""
