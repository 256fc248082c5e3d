"""The WebSocket protocol, sans I/O: parse what clients send, build what the server sends,
the per-connection outgoing buffer with its coalescing rule, and the `Session`: one socket's
state (outbox, control queue, rate limiter, clocks, subscriptions) and every decision about
it, returned as what to send or what to do.

Imports neither aiohttp nor the store and starts no task, so every rule here is unit-tested
without sockets; ws.py (and sse.py) drive a session over a real transport.
"""

from __future__ import annotations

import enum
import struct
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core import contract, jsonutil
from ..core.model import TERMINAL, Task, public, utc_iso, utc_now

if TYPE_CHECKING:
    from ..core.auth import Identity

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


def dumps(message: dict[str, Any]) -> str:
    return jsonutil.dumps(message)


def connected(connection_id: str, epoch: str, seq: int, *, what: str = "WebSocket connection",
              node: str | None = None) -> str:
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
    return dumps(message)


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

    __slots__ = ("_ahead", "_floor", "_items", "_latest", "_live", "_sent", "limit", "merged",
                 "replaying")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[int, Update] = OrderedDict()  # keyed by seq: send order
        self._latest: dict[str, int] = {}  # task_id -> seq of its newest queued update
        self._sent: dict[str, int] = {}  # task_id -> seq last sent (active tasks only)
        self._floor: dict[str, int] | None = None  # task_id -> seq already sent out of band
        self._live = 0  # the highest seq pushed (live updates come in seq order)
        self._ahead = 0  # the highest seq the snapshot sent that live updates had not reached
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
        """The snapshot is sent: forget what it sent, except for queued tasks and states
        live updates have not reached yet (a node behind the database reads its pages
        ahead of its feed: those updates are still to come, and must not go out again)."""
        self.replaying = False
        live = self._live
        self._sent = {t: s for t, s in self._sent.items() if t in self._latest or s > live}
        self._ahead = max((s for s in self._sent.values() if s > live), default=0)

    def _reached(self) -> None:
        """Live updates have passed every state the snapshot sent ahead of them."""
        self._ahead = 0
        self._sent = {t: s for t, s in self._sent.items() if t in self._latest}

    def raise_floor(self, task_id: str, seq: int) -> None:
        """A task's state at `seq` went out of the usual order (a subscribe reads the task
        and may see a commit whose push is still on its way): later pushes of the task at
        or below `seq` are dropped, so the client never sees it go back."""
        if self._floor is None:
            self._floor = {}
        self._floor[task_id] = max(seq, self._floor.get(task_id, seq))

    def clear_floor(self, task_id: str) -> None:
        """The task's next push goes out even if its state was sent before (a subscribe
        sends the current state again)."""
        if self._floor:
            self._floor.pop(task_id, None)
        if self._sent and not self.replaying:
            self._sent.pop(task_id, None)

    def push(self, update: Update) -> bool:
        if update.seq > self._live:
            self._live = update.seq
        if self._floor:
            floor = self._floor.get(update.task_id)
            if floor is not None:
                if update.seq <= floor:
                    return True
                del self._floor[update.task_id]
        sent = self._sent.get(update.task_id)
        if sent is not None and update.seq <= sent:
            if self._ahead and update.seq >= self._ahead and not self.replaying:
                self._reached()
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
        if self._ahead and update.seq >= self._ahead and not self.replaying:
            self._reached()
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


# ---- the session: one socket's state and what it decides --------------------------------

# RFC 6455 opcodes of a received frame (aiohttp's WSMsgType has the same values), and a frame
# the transport could not read
OP_TEXT, OP_BINARY, OP_PING, OP_PONG = 0x1, 0x2, 0x9, 0xA
OP_BROKEN = -1
CONTROL_LIMIT = 256  # control messages queued unsent before the peer counts as too slow
EXPIRY_NOTICE = 60.0  # seconds before exp that `token_expiring` is sent


@dataclass(frozen=True, slots=True)
class Close:
    """Close the socket with this code and reason (a stream: its last `close` event)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer a ping frame with a pong frame carrying its payload."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Read the task (the driver owns the store), then `Session.subscribe_read` decides."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Tell the hub this socket no longer wants the task's updates."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Refresh:
    """Verify this token (the driver owns the verifier), then `Session.refreshed` decides."""

    token: str


class Stop(enum.Enum):
    """Stop reading this socket."""

    STOP = "stop"


class Tick(enum.Enum):
    """What one tick of the clocks wants done (besides a `Close`)."""

    PING = "ping"  # write a ping frame, then `Session.pinged`
    DEAD = "dead"  # the peer answers nothing: drop it without a close handshake
    NOTICE = "notice"  # the token expires soon: send `Session.expiry_notice`


STOP = Stop.STOP
# what `Session.receive` returns: a str is a message to send (`Session.send`)
Action = str | Close | Pong | Subscribe | Unsubscribe | Refresh | Stop
_CLOSE_TOO_SLOW = Close(CLOSE_TOO_SLOW, TOO_SLOW)
_CLOSE_FLOOD = Close(CLOSE_POLICY, "message rate limit exceeded")
_CLOSE_EXPIRED = Close(CLOSE_UNAUTHORIZED, "token expired")


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The per-socket bounds (the settings `app.session_limits` reads), shared by every
    session of a server."""

    send_queue: int
    rate: float
    burst: int
    strikes: int
    max_subscriptions: int
    control: int = CONTROL_LIMIT


class Session:
    """One socket's protocol state, without I/O: what is queued (`Outbox`, control
    messages), the inbound rate limit, the subscriptions, the token and the clocks.

    Its methods change that state and say what the driver must do: send a message, close
    with a code, answer a ping, read a task. `close` is the only thing that marks it
    closing; a method that decides a close returns the `Close` and the driver closes.
    """

    __slots__ = ("_reading", "backed_up_since", "closing", "control", "id", "identity",
                 "limiter", "limits", "outbox", "ping_sent_at", "send_started",
                 "snapshotting", "subscriptions", "token_generation", "user_id")

    def __init__(self, identity: Identity, limits: SessionLimits,
                 connection_id: str | None = None) -> None:
        self.id = connection_id or str(uuid.uuid4())
        self.identity = identity
        self.user_id = identity.user_id
        self.limits = limits
        self.outbox = Outbox(limits.send_queue)
        self.control: deque[str] | None = None  # no empty deque kept per idle socket
        self.limiter = RateLimiter(limits.rate, limits.burst, limits.strikes)
        self.subscriptions: dict[str, None] = {}  # a set; a dict is smaller empty
        self._reading: dict[str, int] | None = None  # task_id -> newest seq pushed meanwhile
        self.closing = False
        self.snapshotting = True  # nothing else is written until the snapshot is
        self.send_started = 0.0  # clock time the current send began; 0 when not sending
        self.ping_sent_at = 0.0  # clock time of an unanswered ping; 0 once the peer spoke
        self.backed_up_since = 0.0  # clock time the transport was first seen backed up
        self.token_generation = 0  # bumped when the token changes: older deadlines lapse

    # ---- ending ----------------------------------------------------------------------

    def close(self, code: int, reason: str) -> bool:
        """Mark it closing; False if it already was (a socket is closed once)."""
        if self.closing:
            return False
        self.closing = True
        return True

    def gone(self) -> None:
        """The peer is gone (or dropped): nothing more is sent or decided."""
        self.closing = True

    # ---- what goes out ---------------------------------------------------------------

    def deliver(self, update: Update) -> bool:
        """Queue a pushed update; False when the outbox is over its bound even after
        merging: the socket is too slow (close it with `TOO_SLOW`)."""
        if self.closing:
            return True
        if update.user_id != self.user_id and not self.identity.is_admin:
            # the last line of isolation: whatever routed it here (a subscribe racing its
            # ownership check, a task id re-registered for another user), a non-admin
            # socket never carries another user's task
            return True
        if self._reading and update.task_id in self._reading:
            self._reading[update.task_id] = max(self._reading[update.task_id], update.seq)
        return self.outbox.push(update)

    def deliver_current(self, update: Update) -> bool:
        """A task's current state read outside the commit order (a subscribe): queued even
        if it was sent before, and the commit's own pushes at or below it, which may still
        be on their way, are dropped."""
        newer = self._reading.pop(update.task_id, 0) if self._reading else 0
        if update.seq < newer:
            return True  # a newer state was pushed while the task was read: that one stands
        outbox = self.outbox
        outbox.clear_floor(update.task_id)
        ok = self.deliver(update)
        outbox.raise_floor(update.task_id, update.seq)
        return ok

    def send(self, text: str) -> Close | None:
        """Queue a control message (answers, notices; they go before queued updates); a
        `Close` when too many wait unsent."""
        if self.closing:
            return None
        control = self.control
        if control is None:
            self.control = deque((text,))
        elif len(control) >= self.limits.control:
            return _CLOSE_TOO_SLOW
        else:
            control.append(text)
        return None

    @property
    def writable(self) -> bool:
        """Queued messages may be written now (not closing; the snapshot is out)."""
        return not self.closing and not self.snapshotting

    def next_control(self) -> str | None:
        control = self.control
        if not control:
            return None
        text = control.popleft()
        if not control:
            self.control = None
        return text

    def next_item(self) -> str | Update | None:
        """What goes out next: control messages first; live updates wait until the snapshot
        is written (no overtaking)."""
        if self.control:
            return self.next_control()
        return None if self.outbox.replaying else self.outbox.pop()

    def snapshot_written(self) -> None:
        """The connect-time messages are out: live updates may follow."""
        self.snapshotting = False
        self.outbox.end_replay()

    def send_began(self, now: float) -> None:
        """A write waits for the peer (judged by `clock` against the send timeout)."""
        self.send_started = now

    def send_ended(self) -> None:
        self.send_started = 0.0

    # ---- what comes in ---------------------------------------------------------------

    def receive(self, opcode: int, data: Any) -> tuple[Action, ...]:
        """One received frame (an RFC 6455 opcode, or OP_BROKEN): what to do about it."""
        if self.closing:
            return (STOP,)
        # every frame counts, control frames too (a ping answered for free is a flood),
        # except the pong that answers our own ping: at most one per ping interval
        free = opcode == OP_PONG and self.ping_sent_at != 0.0
        self.ping_sent_at = 0.0  # it spoke: alive
        limiter = self.limiter
        if not free and not limiter.allow():
            if limiter.flooding:
                return (_CLOSE_FLOOD,)
            if limiter.strikes == 1:
                return (error("rate_limited", "too many messages; slow down"),)
            return ()
        if opcode == OP_TEXT:
            try:
                return self._message(parse_client_message(data))
            except ProtocolError as exc:
                return (error(exc.code, exc.message),)
        if opcode == OP_PING:
            return (Pong(data),)
        if opcode == OP_BINARY:
            return (error("binary_frame", "only JSON text frames are accepted"),)
        if opcode == OP_BROKEN:
            return (STOP,)
        return ()

    def _message(self, message: ClientMessage) -> tuple[Action, ...]:
        kind = message.type
        if kind == "ping":
            return (pong(),)
        if kind == "subscribe":
            return (Subscribe(message.task_id or ""),)
        if kind == "unsubscribe":
            task_id = message.task_id or ""
            answer = simple("unsubscribed", task_id=task_id)
            if task_id in self.subscriptions:
                del self.subscriptions[task_id]
                return (Unsubscribe(task_id), answer)
            return (answer,)
        return (Refresh(message.token or ""),)

    # ---- subscriptions ---------------------------------------------------------------

    def subscribe(self, task_id: str) -> bool:
        """Record a subscribe before its task is read (so no change is missed); raises
        ProtocolError over the limit. True when it is new (undo it if refused)."""
        new = task_id not in self.subscriptions
        if new:
            limit = self.limits.max_subscriptions
            if len(self.subscriptions) >= limit:
                raise ProtocolError("too_many_subscriptions",
                                    f"at most {limit} subscriptions per connection")
            self.subscriptions[task_id] = None
        # until its read returns, remember the newest push of the task: a read that
        # returns an older state must not be sent after it (deliver_current)
        if self._reading is None:
            self._reading = {}
        self._reading[task_id] = 0
        return new

    def may_see(self, task: Task | None) -> bool:
        """An admin sees every task; a user only their own."""
        return self.identity.is_admin or (task is not None and task.user_id == self.user_id)

    def subscribe_read(self, task_id: str, task: Task | None) -> tuple[str, Update | None]:
        """The task as read decides: the answer to send and its current state to deliver
        (`deliver_current`), or ProtocolError (another user's task and a missing one get
        the same answer)."""
        if not self.may_see(task):
            raise ProtocolError("forbidden", "no such task of yours to subscribe to")
        if task is None and self._reading:
            self._reading.pop(task_id, None)
        return (simple("subscribed", task_id=task_id),
                None if task is None else status_update(task))

    def subscribe_failed(self, task_id: str, new: bool) -> Unsubscribe | None:
        """A subscribe refused or not read: a new one is undone (tell the hub)."""
        if self._reading:
            self._reading.pop(task_id, None)
        if not new:
            return None
        self.subscriptions.pop(task_id, None)
        return Unsubscribe(task_id)

    # ---- the token -------------------------------------------------------------------

    def refreshed(self, identity: Identity) -> str:
        """A verified refresh token: the answer, or ProtocolError if it is another user's.
        Restart the token's clock after it (`restart_token_clock`)."""
        if identity.user_id != self.user_id:
            raise ProtocolError("forbidden", "refresh token is for another user")
        self.identity = identity
        expires = None if identity.expires_at is None else utc_iso(identity.expires_at)
        return simple("refreshed", expires_at=expires)

    def restart_token_clock(self) -> int:
        """The token changed (or is first scheduled): deadlines of the older one lapse.
        Returns the generation the new deadlines carry."""
        self.token_generation += 1
        return self.token_generation

    def token_deadlines(self, leeway: float) -> tuple[float, float] | None:
        """(when to send the notice, when to close) in wall-clock seconds; None if the
        token never expires or the socket is closing."""
        exp = self.identity.expires_at
        if exp is None or self.closing:
            return None
        return exp - EXPIRY_NOTICE, exp + leeway

    def token_due(self, generation: int, final: bool) -> Close | Tick | None:
        """A deadline of `generation` came due: the notice, the 4401 close, or None when
        it lapsed (token refreshed since, socket closing)."""
        if self.closing or generation != self.token_generation:
            return None
        return _CLOSE_EXPIRED if final else Tick.NOTICE

    def expiry_notice(self, now: float) -> str | None:
        """`token_expiring` with the seconds left at wall-clock `now`."""
        exp = self.identity.expires_at
        if exp is None:
            return None
        return simple("token_expiring", expires_in=max(0, round(exp - now)))

    # ---- liveness --------------------------------------------------------------------

    def clock(self, now: float, *, backed_up: bool, send_timeout: float,
              ping_timeout: float, ping: bool) -> Close | Tick | None:
        """One tick of the clocks at `now`. `backed_up`: frames written sit unread in the
        transport (they count like a send that is stuck, sender task or not). A stuck
        send closes 4408; a busy socket is not pinged; a socket writing its snapshot is not
        pinged nor judged dead (its pongs are not read yet); an unanswered ping past
        `ping_timeout` is a dead peer; else, when `ping`, a ping is due."""
        if self.closing:
            return None
        if backed_up:
            if not self.backed_up_since:
                self.backed_up_since = now
        else:
            self.backed_up_since = 0.0
        since = min(filter(None, (self.send_started, self.backed_up_since)), default=0.0)
        if since:
            return _CLOSE_TOO_SLOW if now - since > send_timeout else None
        if self.snapshotting:
            return None
        if self.ping_sent_at:
            if ping_timeout and now - self.ping_sent_at > ping_timeout:
                return Tick.DEAD
            return None
        return Tick.PING if ping else None

    def pinged(self, now: float) -> None:
        """A ping frame went out at `now`: the next frame received answers it."""
        self.ping_sent_at = now
