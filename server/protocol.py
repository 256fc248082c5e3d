"""The WebSocket protocol, sans I/O: parse what clients send, build what the server sends,
and the per-connection outgoing buffer with its coalescing rule.

Imports neither aiohttp nor the store, so every rule here is unit-tested without sockets.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from . import contract, jsonutil
from .model import TERMINAL, Task, public, utc_now

# Close codes (SPEC): the reason strings are what clients read.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # flood
CLOSE_TOO_BIG = 1009  # sent by aiohttp itself (max_msg_size)
CLOSE_TRY_AGAIN = 1013  # the storage could not be read (its snapshot): reconnect later
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_SLOW = 4408
CLOSE_REPLACED = 4409  # more connections for one user than allowed: the oldest goes


class ProtocolError(Exception):
    """A bad client message: answered with an `error` message; the socket stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ClientMessage:
    type: str
    task_id: str | None = None
    token: str | None = None


_TASK_TYPES = ("subscribe", "unsubscribe")


def parse_client_message(text: str) -> ClientMessage:
    """Validate one text frame; raise ProtocolError with a machine-readable code."""
    try:
        data = jsonutil.loads(text)
    except ValueError:
        raise ProtocolError("invalid_json", "message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", "message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing_type", "message needs a string field 'type'")
    if kind == "ping":
        return ClientMessage("ping")
    if kind in _TASK_TYPES:
        return ClientMessage(kind, task_id=task_id_field(data.get("task_id")))
    if kind == "refresh":
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("missing_field", "refresh needs a string field 'token'")
        return ClientMessage("refresh", token=token)
    shown = kind[:40]
    raise ProtocolError("unknown_type", f"unknown message type {shown!r}")


def task_id_field(value: Any) -> str:
    """A task id by the HTTP API's rule (contract.task_id_problem); ints accepted."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise ProtocolError("missing_field", "a non-empty string field 'task_id' is required")
    problem = contract.task_id_problem(value)
    if problem is not None:
        raise ProtocolError("invalid_field", f"task_id {problem}")
    return value


def dumps(message: dict[str, Any]) -> str:
    return jsonutil.dumps(message)


def connected(connection_id: str, epoch: str, seq: int) -> str:
    return dumps({
        "type": "connected",
        "connection_id": connection_id,
        "message": "WebSocket connection established",
        "timestamp": utc_now(),
        "epoch": epoch,
        "seq": seq,
    })


def active_tasks(tasks: list[Task]) -> str:
    return dumps({"type": "active_tasks", "tasks": [public(t) for t in tasks],
                  "count": len(tasks)})


def active_tasks_part(tasks: list[Task], *, first: bool, count: int | None) -> bytes:
    """A piece of one `active_tasks` message, for writing it page by page: the pieces of
    pages p1..pn (`first` on p1, the total `count` on pn) joined are exactly
    `active_tasks(p1 + ... + pn)`."""
    body = jsonutil.dumpb([public(t) for t in tasks])[1:-1]
    head = b'{"type":"active_tasks","tasks":[' if first else (b"," if body else b"")
    tail = b"" if count is None else b'],"count":%d}' % count
    return head + body + tail


def task_status(task: Task) -> str:
    return dumps({"type": "task_status", **public(task)})


def task_deleted(task_id: str) -> str:
    return dumps({"type": "task_deleted", "task_id": task_id})


def error(code: str, message: str) -> str:
    return dumps({"type": "error", "code": code, "message": message})


def simple(kind: str, **fields: Any) -> str:
    return dumps({"type": kind, **fields})


def pong() -> str:
    return simple("pong", timestamp=utc_now())


def text_frame(text: str) -> bytes:
    """`text` as one unfragmented, unmasked WebSocket text frame (RFC 6455 section 5.2),
    which is how a server sends a message."""
    return data_frame(text.encode())


def data_frame(payload: bytes, *, first: bool = True, last: bool = True) -> bytes:
    """A frame of a text message (RFC 6455 section 5.4): a message written in parts is a
    text frame then continuation frames, the last one marked final."""
    head = (0x80 if last else 0) | (0x1 if first else 0x0)
    size = len(payload)
    if size < 126:
        header = bytes((head, size))
    elif size < 65536:
        header = struct.pack("!BBH", head, 126, size)
    else:
        header = struct.pack("!BBQ", head, 127, size)
    return header + payload


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked close frame (RFC 6455 section 5.5.1); the reason is cut to fit the
    125-byte limit of a control frame."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


@dataclass(frozen=True, slots=True)
class Update:
    """One change as pushed: serialized and framed once, the same bytes written to every
    socket."""

    task_id: str
    user_id: int
    seq: int
    status: str  # "deleted" for a task_deleted message
    text: str
    frame: bytes = b""  # text_frame(text), filled in on creation
    # its Server-Sent Events chunk, built by the first stream that writes it and shared by
    # the others; it lives and dies with the update (sse.py)
    event_chunk: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.frame:
            object.__setattr__(self, "frame", text_frame(self.text))

    @property
    def mergeable(self) -> bool:
        return self.status not in TERMINAL and self.status != "deleted"


def status_update(task: Task) -> Update:
    """A task's current state as pushed (serialized once, shared by every socket)."""
    return Update(task.task_id, task.user_id, task.seq, task.status, task_status(task))


def deleted_update(task_id: str, user_id: int, seq: int) -> Update:
    """A deletion as pushed (its seq is the tombstone's)."""
    return Update(task_id, user_id, seq, "deleted", task_deleted(task_id))


def message_type(text: str) -> str:
    """The `type` of a message built here (each builder writes it first, so no parse)."""
    if text.startswith('{"type":"'):
        end = text.find('"', 9)
        if end > 0:
            return text[9:end]
    kind = jsonutil.loads(text).get("type")
    return kind if isinstance(kind, str) else "message"


class Outbox:
    """A bounded per-connection queue of updates.

    While an update waits unsent, a newer update of the same task with the same
    non-terminal status replaces it (the latest wins, so progress is coalesced); a change of
    status, a terminal state and a deletion are always kept. `push()` returns False when the
    queue is over its bound even after merging: the connection is too slow and must go.
    Updates at or below the seq a task was last sent with are dropped (no duplicates, no
    going back), which is what lets a connection attach to live updates before it reads its
    snapshot from the database.
    """

    __slots__ = ("_floor", "_items", "_latest", "_sent", "limit", "merged", "replaying")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[int, Update] = OrderedDict()  # keyed by seq: send order
        self._latest: dict[str, int] = {}  # task_id -> seq of its newest queued update
        self._sent: dict[str, int] = {}  # task_id -> seq last sent (active tasks only)
        self._floor: dict[str, int] | None = None  # task_id -> seq already sent out of band
        self.merged = 0
        self.replaying = True

    def __len__(self) -> int:
        return len(self._items)

    def mark_sent(self, task_id: str, seq: int) -> bool:
        """Remember what was sent while the snapshot overlaps live updates; after that,
        updates arrive once each in seq order and nothing needs remembering. The highest seq
        is kept; False (nothing recorded) when the task was already sent at a LATER seq:
        the caller skips that older state, so the client never sees the task go back (and
        the live update of the later seq, covered, is not sent again). The same seq is
        True: the `since` replay repeats what `active_tasks` carried (SPEC: one
        `task_status` for every task changed after SEQ)."""
        if self.replaying:
            sent = self._sent.get(task_id)
            if sent is not None and seq < sent:
                return False
            self._sent[task_id] = seq
        elif self._sent:
            self._sent.pop(task_id, None)
        return True

    def end_replay(self) -> None:
        """The snapshot is sent and live updates overlap it no more: prune finished tasks."""
        self.replaying = False
        self._sent = {t: s for t, s in self._sent.items() if t in self._latest}

    def raise_floor(self, task_id: str, seq: int) -> None:
        """A task's state at `seq` went out of the usual order (a subscribe reads the task
        and may see a commit whose push is still on its way): later pushes of the task at
        or below `seq` are dropped, so the client never sees it go back."""
        if self._floor is None:
            self._floor = {}
        self._floor[task_id] = max(seq, self._floor.get(task_id, seq))

    def clear_floor(self, task_id: str) -> None:
        if self._floor:
            self._floor.pop(task_id, None)

    def push(self, update: Update) -> bool:
        if self._floor:
            floor = self._floor.get(update.task_id)
            if floor is not None:
                if update.seq <= floor:
                    return True
                del self._floor[update.task_id]
        sent = self._sent.get(update.task_id)
        if sent is not None and update.seq <= sent:
            return True
        prev_seq = self._latest.get(update.task_id)
        if prev_seq is not None:
            if update.seq <= prev_seq:  # a newer state of this task is already queued
                return True
            prev = self._items.get(prev_seq)
            if prev is not None and prev.mergeable and prev.status == update.status:
                del self._items[prev_seq]
                self.merged += 1
        self._items[update.seq] = update
        self._latest[update.task_id] = update.seq
        return len(self._items) <= self.limit

    def pop(self) -> Update | None:
        while self._items:
            _, update = self._items.popitem(last=False)
            if self._latest.get(update.task_id) == update.seq:
                del self._latest[update.task_id]
            sent = self._sent.get(update.task_id)
            if sent is None or update.seq > sent:
                self.mark_sent(update.task_id, update.seq)
                return update
            if not self.replaying and update.task_id not in self._latest:
                del self._sent[update.task_id]
        return None


class RateLimiter:
    """Token bucket for inbound messages, plus a count of refusals in a row (flood)."""

    __slots__ = ("burst", "rate", "stamp", "strikes", "strikes_allowed", "tokens")

    def __init__(self, rate: float, burst: int, strikes: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.strikes_allowed = strikes
        self.strikes = 0
        self.stamp = time.monotonic()

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.strikes = 0
            return True
        self.strikes += 1
        return False

    @property
    def flooding(self) -> bool:
        return self.strikes >= self.strikes_allowed
