"""The WebSocket (and SSE) messages, sans I/O: the close codes and their reasons, what a
client may send (`parse_client_message`), what the server sends (one builder per message
type, each returning a `Message`: its JSON text carrying its type and seq, so no framing
reads the JSON back), and an `Update`: one committed change serialized and framed once,
the same bytes for every socket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core import contract, jsonutil
from ..core.model import TERMINAL, Task, public, utc_now
from .frames import text_frame

# Close codes (SPEC): the reason strings are what clients read.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # flood
CLOSE_TOO_BIG = 1009  # sent by aiohttp itself (max_msg_size)
CLOSE_TRY_AGAIN = 1013  # the storage could not be read (its snapshot): reconnect later
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_SLOW = 4408
CLOSE_REPLACED = 4409  # more connections for one user than allowed: the oldest goes
TOO_SLOW = "too slow: resume with since"


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


class Message(str):
    """A message's JSON text (a str: written as is), carrying its `type` and, for the
    messages that state one (`connected`, `task_status`, `task_deleted`), its seq."""

    kind: str
    seq: int | None

    def __new__(cls, text: str, kind: str, seq: int | None = None) -> Message:
        message = super().__new__(cls, text)
        message.kind = kind
        message.seq = seq
        return message


CHANGE_KINDS = frozenset(("task_status", "task_deleted"))  # the messages a change is sent as


def dumps(message: dict[str, Any]) -> str:
    return jsonutil.dumps(message)


def connected(connection_id: str, epoch: str, seq: int, *, what: str = "WebSocket connection",
              node: str | None = None) -> Message:
    """The first message. `what` names the transport ("WebSocket connection", "event
    stream"); `node` (cluster mode only) is the name of the node that holds it."""
    message = {
        "type": "connected",
        "connection_id": connection_id,
        "message": f"{what} established",
        "timestamp": utc_now(),
        "epoch": epoch,
        "seq": seq,
    }
    if node is not None:
        message["node"] = node
    return Message(dumps(message), "connected", seq)


def active_tasks(tasks: list[Task]) -> Message:
    return Message(dumps({"type": "active_tasks", "tasks": [public(t) for t in tasks],
                          "count": len(tasks)}), "active_tasks")


def active_tasks_part(tasks: list[Task], *, first: bool, count: int | None) -> bytes:
    """A piece of one `active_tasks` message, for writing it page by page: the pieces of
    pages p1..pn (`first` on p1, the total `count` on pn) joined are exactly
    `active_tasks(p1 + ... + pn)`."""
    body = jsonutil.dumpb([public(t) for t in tasks])[1:-1]
    head = b'{"type":"active_tasks","tasks":[' if first else (b"," if body else b"")
    tail = b"" if count is None else b'],"count":%d}' % count
    return head + body + tail


def _task_status_text(task: Task) -> str:
    return dumps({"type": "task_status", **public(task)})


def _task_deleted_text(task_id: str) -> str:
    return dumps({"type": "task_deleted", "task_id": task_id})


def task_status(task: Task) -> Message:
    return Message(_task_status_text(task), "task_status", task.seq)


def task_deleted(task_id: str, seq: int | None = None) -> Message:
    """`seq`: the tombstone's (carried along, not written)."""
    return Message(_task_deleted_text(task_id), "task_deleted", seq)


def error(code: str, message: str) -> Message:
    return simple("error", code=code, message=message)


def simple(kind: str, **fields: Any) -> Message:
    return Message(dumps({"type": kind, **fields}), kind)


def pong() -> Message:
    return simple("pong", timestamp=utc_now())


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
    # False for a task's state read out of the push order (a subscribe): it says nothing
    # about the other tasks' changes (an SSE id must not claim them)
    in_order: bool = True
    # its Server-Sent Events chunk, built by the first stream that writes it and shared by
    # the others; it lives and dies with the update (sse.py)
    event_chunk: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.frame:
            object.__setattr__(self, "frame", text_frame(self.text))

    @property
    def mergeable(self) -> bool:
        return self.status not in TERMINAL and self.status != "deleted"

    @property
    def kind(self) -> str:
        """The message's `type`."""
        return "task_deleted" if self.status == "deleted" else "task_status"


def status_update(task: Task) -> Update:
    """A task's current state as pushed (serialized once, shared by every socket; the
    update carries its kind and seq itself, its text is a plain str)."""
    return Update(task.task_id, task.user_id, task.seq, task.status, _task_status_text(task))


def deleted_update(task_id: str, user_id: int, seq: int) -> Update:
    """A deletion as pushed (its seq is the tombstone's)."""
    return Update(task_id, user_id, seq, "deleted", _task_deleted_text(task_id))

