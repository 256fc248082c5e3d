"""One socket's state and every decision about it, sans I/O: the `Session` (outbox, control
queue, rate limiter, clocks, subscriptions) returns what to send or what to do (`Close`,
`Pong`, `Subscribe`, ...), and the socket's driver (web/ws.py, web/sse.py) carries it out.

Imports neither aiohttp nor the store and starts no task, so every rule here is unit-tested
without sockets.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.model import Task, utc_iso
from .messages import (
    CLOSE_POLICY,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    TOO_SLOW,
    ClientMessage,
    Message,
    ProtocolError,
    Update,
    error,
    parse_client_message,
    pong,
    simple,
    status_update,
)
from .outbox import DROPPED, Outbox, Queued

if TYPE_CHECKING:
    from ..core.auth import Identity

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


class State(enum.IntEnum):
    """Where a socket is in its life (ordered: the closing states come last)."""

    SNAPSHOT = 0  # the connect-time messages are being written; updates wait behind them
    OPEN = 1  # live: whatever is queued goes out
    CLOSING = 2  # a close decided after the snapshot: answers queued first, then the close
    CUT = 3  # a close decided during the snapshot (a message written in parts may be
    # unfinished): nothing but the close itself goes out
    GONE = 4  # the peer is gone, or dropped: nothing more is sent or decided


# the transitions a session makes; any other is refused (`Session._to` returns False)
TRANSITIONS: dict[State, frozenset[State]] = {
    State.SNAPSHOT: frozenset((State.OPEN, State.CUT, State.GONE)),
    State.OPEN: frozenset((State.CLOSING, State.GONE)),
    State.CLOSING: frozenset((State.GONE,)),
    State.CUT: frozenset((State.GONE,)),
    State.GONE: frozenset(),
}

_CLOSING = State.CLOSING
STOP = Stop.STOP
# what `Session.receive` returns: a Message is a message to send (`Session.send`)
Action = Message | Close | Pong | Subscribe | Unsubscribe | Refresh | Stop
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
    with a code, answer a ping, read a task. Where the socket is in its life is one
    `state` (`State`), moved only here and only along `TRANSITIONS`: `snapshot_written`,
    `close` (the only thing that starts a close; a method that decides one returns the
    `Close` and the driver closes) and `gone`.
    """

    __slots__ = ("backed_up_since", "control", "id", "identity", "limiter", "limits",
                 "outbox", "ping_sent_at", "send_started", "state", "subscriptions",
                 "token_generation", "user_id")

    def __init__(self, identity: Identity, limits: SessionLimits,
                 connection_id: str | None = None) -> None:
        self.id = connection_id or str(uuid.uuid4())
        self.identity = identity
        self.user_id = identity.user_id
        self.limits = limits
        self.outbox = Outbox(limits.send_queue)
        self.control: deque[Message] | None = None  # no empty deque kept per idle socket
        self.limiter = RateLimiter(limits.rate, limits.burst, limits.strikes)
        self.subscriptions: dict[str, None] = {}  # a set; a dict is smaller empty
        self.state = State.SNAPSHOT  # nothing else is written until the snapshot is
        self.send_started = 0.0  # clock time the current send began; 0 when not sending
        self.ping_sent_at = 0.0  # clock time of an unanswered ping; 0 once the peer spoke
        self.backed_up_since = 0.0  # clock time the transport was first seen backed up
        self.token_generation = 0  # bumped when the token changes: older deadlines lapse

    # ---- the state -------------------------------------------------------------------

    def _to(self, state: State) -> bool:
        if state in TRANSITIONS[self.state]:
            self.state = state
            return True
        return False

    @property
    def closing(self) -> bool:
        """A close has begun (or the peer is gone)."""
        return self.state >= State.CLOSING

    def close(self, code: int, reason: str) -> bool:
        """Start the close (CUT during the snapshot, CLOSING after it); False if it has
        begun already (a socket is closed once)."""
        return self._to(State.CUT if self.state is State.SNAPSHOT else State.CLOSING)

    def gone(self) -> None:
        """The peer is gone (or dropped): nothing more is sent or decided."""
        self.state = State.GONE

    # ---- what goes out ---------------------------------------------------------------

    def deliver(self, update: Update) -> Queued:
        """Queue a pushed update; what became of it (`Queued`: MERGED is counted, OVERFLOW,
        false, means the outbox is over its bound even after merging: the socket is too
        slow, close it with `TOO_SLOW`)."""
        if self.state >= _CLOSING:
            return DROPPED
        if update.user_id != self.user_id and not self.identity.is_admin:
            # the last line of isolation: whatever routed it here (a subscribe racing its
            # ownership check, a task id re-registered for another user), a non-admin
            # socket never carries another user's task
            return DROPPED
        return self.outbox.push(update)

    def deliver_current(self, update: Update) -> Queued:
        """A task's current state read outside the commit order (a subscribe's read, which
        ends here): queued even if it was sent before, unless a newer state was sent
        meanwhile; the commit's own pushes at or below it, which may still be on their
        way, are dropped (`Outbox.current`)."""
        outbox = self.outbox
        if self.state >= _CLOSING or (update.user_id != self.user_id
                                      and not self.identity.is_admin):
            done = DROPPED
        else:
            done = outbox.current(update)
        outbox.read_done()
        return done

    def send(self, text: Message) -> Close | None:
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
        return self.state is State.OPEN

    def next_control(self) -> Message | None:
        control = self.control
        if not control:
            return None
        text = control.popleft()
        if not control:
            self.control = None
        return text

    def next_item(self) -> Message | Update | None:
        """What goes out next: control messages first; live updates wait until the snapshot
        is written (no overtaking)."""
        if self.control:
            return self.next_control()
        return None if self.outbox.replaying else self.outbox.pop()

    def snapshot_written(self) -> None:
        """The connect-time messages are out: live updates may follow."""
        self._to(State.OPEN)
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
        # until its read returns, what is sent is marked: a read that returns an older
        # state must not be sent after a newer one (deliver_current)
        self.outbox.reading()
        return new

    def may_see(self, task: Task | None) -> bool:
        """An admin sees every task; a user only their own."""
        return self.identity.is_admin or (task is not None and task.user_id == self.user_id)

    def subscribe_read(self, task_id: str, task: Task | None) -> tuple[Message, Update | None]:
        """The task as read decides: the answer to send and its current state to deliver
        (`deliver_current`), or ProtocolError (another user's task and a missing one get
        the same answer)."""
        if not self.may_see(task):
            raise ProtocolError("forbidden", "no such task of yours to subscribe to")
        if task is None:
            self.outbox.read_done()
        return (simple("subscribed", task_id=task_id),
                None if task is None else status_update(task))

    def subscribe_failed(self, task_id: str, new: bool) -> Unsubscribe | None:
        """A subscribe refused or not read: a new one is undone (tell the hub)."""
        self.outbox.read_done()
        if not new:
            return None
        self.subscriptions.pop(task_id, None)
        return Unsubscribe(task_id)

    # ---- the token -------------------------------------------------------------------

    def refreshed(self, identity: Identity) -> Message:
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

    def expiry_notice(self, now: float) -> Message | None:
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
        if self.state is State.SNAPSHOT:
            return None
        if self.ping_sent_at:
            if ping_timeout and now - self.ping_sent_at > ping_timeout:
                return Tick.DEAD
            return None
        return Tick.PING if ping else None

    def pinged(self, now: float) -> None:
        """A ping frame went out at `now`: the next frame received answers it."""
        self.ping_sent_at = now
