"""The WebSocket endpoint: authenticate, attach to the hub, send the snapshot (by pages,
`snapshot.py`), then run the receive loop (client messages). Queued frames are written
straight to the transport; a sender task exists only while a peer reads slowly.

Order on connect matters for "no gap, no duplicate": the connection is attached to the hub
BEFORE the snapshot is read, so a change committed meanwhile is queued; the outbox drops
whatever the snapshot already covered (per task, by seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque

from aiohttp import WSMsgType, web

from . import contract, keys, protocol, snapshot, validate
from .auth import AuthError, Identity, parse_user_id
from .errors import BadRequest, StorageUnavailable
from .hub import Hub
from .model import Task, utc_iso

log = logging.getLogger(__name__)

CONTROL_LIMIT = 256
CLOSE_TIMEOUT = 2.0  # seconds a peer has to answer our close frame
DIRECT_WRITE_LIMIT = 65536  # bytes buffered in the transport above which sends wait


class Connection:
    """One authenticated socket, as the hub sees it (`user_id`, `deliver`).

    There is no task per idle socket. What is queued is written straight to the transport
    while its buffer is small (`_write_direct`: no task, no await, the update's frame bytes
    shared by every socket); only a peer that reads slowly gets a sender task, which waits
    for the buffer to drain. Its clocks (token expiry, pings, a stuck send) are kept by
    `watch.py` for all sockets at once.
    """

    __slots__ = ("__weakref__", "_close_task", "_sender", "app", "backed_up_since", "closing",
                 "control", "id", "identity", "limiter", "metrics", "outbox", "ping_sent_at",
                 "send_started", "snapshotting", "subscriptions", "token_generation",
                 "transport", "user_id", "ws")

    def __init__(self, ws: web.WebSocketResponse, identity: Identity, request: web.Request):
        config = request.app[keys.CONFIG]
        self.ws = ws
        self.transport = request.transport
        self.app = request.app
        self.id = str(uuid.uuid4())
        self.identity = identity
        self.user_id = identity.user_id
        self.outbox = protocol.Outbox(config.send_queue)
        self.control: deque[str] | None = None
        self.subscriptions: dict[str, None] = {}  # a set; a dict is smaller empty (per socket)
        self.limiter = protocol.RateLimiter(config.rate_limit, config.rate_burst,
                                            config.flood_strikes)
        self.closing = False
        self.snapshotting = True  # nothing else is written until the snapshot is
        self.send_started = 0.0  # loop time the current send began; 0 when not sending
        self.ping_sent_at = 0.0  # loop time of an unanswered ping; 0 once the peer spoke
        self.backed_up_since = 0.0  # loop time the transport was first seen backed up
        self.token_generation = 0  # bumped when the token changes (watch.TokenDeadlines)
        self._sender: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self.metrics = request.app[keys.METRICS]

    # ---- what the hub calls ----------------------------------------------------------

    def deliver(self, update: protocol.Update) -> None:
        if self.closing:
            return
        if update.user_id != self.user_id and not self.identity.is_admin:
            # the last line of isolation: whatever routed it here (a subscribe racing its
            # ownership check, a task id re-registered for another user), a non-admin
            # socket never carries another user's task
            return
        merged = self.outbox.merged
        if not self.outbox.push(update):
            self.metrics.slow_closed.inc()
            self.close(protocol.CLOSE_TOO_SLOW, "too slow: resume with since")
            return
        if self.outbox.merged != merged:
            self.metrics.updates_merged.inc(self.outbox.merged - merged)

    def deliver_current(self, update: protocol.Update) -> None:
        """A task's current state read outside the commit order (a subscribe): sent even if
        it was sent before, and the commit's own pushes at or below it, which may still be
        on their way, are dropped."""
        self.outbox.clear_floor(update.task_id)
        self.deliver(update)
        self.outbox.raise_floor(update.task_id, update.seq)

    def flush(self) -> None:
        """Send what `deliver` queued (the hub calls it once per commit)."""
        self.kick()

    # ---- sending ---------------------------------------------------------------------

    def send(self, text: str) -> None:
        """Queue a control message (answers, notices); sent before queued updates."""
        if self.closing:
            return
        if self.control is None:
            self.control = deque()
        elif len(self.control) >= CONTROL_LIMIT:
            self.close(protocol.CLOSE_TOO_SLOW, "too slow: resume with since")
            return
        self.control.append(text)
        self.kick()

    def kick(self) -> None:
        """Write what is queued now, or start the sender if it must wait (it stops when the
        queues are empty)."""
        if (self._sender is None and not self.closing and not self.snapshotting
                and not self._write_direct()):
            self._sender = asyncio.get_running_loop().create_task(self._send_queued())

    def _next_item(self) -> str | protocol.Update | None:
        """What goes out next: control messages first; live updates wait until the snapshot
        is written (no overtaking)."""
        if self.control:
            item = self.control.popleft()
            if not self.control:
                self.control = None  # no empty deque kept per idle socket (performance.md)
            return item
        return None if self.outbox.replaying else self.outbox.pop()

    def _next_message(self) -> tuple[str, bytes | None] | None:
        """The next item as text and (for an update) its shared frame. The SSE stream
        (`sse.Stream`) frames the same items as events instead."""
        item = self._next_item()
        if item is None or isinstance(item, str):
            return None if item is None else (item, None)
        return item.text, item.frame

    async def _send_item(self, text: str, frame: bytes | None) -> None:
        """The sender task's write, which waits while the peer is slow."""
        await self.ws.send_str(text)

    def _write_direct(self) -> bool:
        """Write queued messages to the transport while its buffer is below
        DIRECT_WRITE_LIMIT, in the sender's order. True when nothing is left to send."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.ws.closed:
            return False  # the sender finds out what is wrong and marks the socket closing
        written = 0
        try:
            while transport.get_write_buffer_size() < DIRECT_WRITE_LIMIT:
                item = self._next_message()
                if item is None:
                    return True
                text, frame = item
                transport.write(frame if frame is not None else protocol.text_frame(text))
                written += 1
            return False
        finally:
            if written:
                self.metrics.messages_sent.inc(written)

    async def _send_queued(self) -> None:
        loop = asyncio.get_running_loop()
        sent = 0
        try:
            while not self.closing:
                item = self._next_message()
                if item is None:
                    break
                self.send_started = loop.time()
                await self._send_item(*item)
                sent += 1
        except (ConnectionError, RuntimeError):
            self.closing = True
        finally:
            self.send_started = 0.0
            self._sender = None
            if sent:
                self.metrics.messages_sent.inc(sent)

    async def stop_sending(self) -> None:
        sender = self._sender
        if sender is not None:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender

    def backed_up(self) -> bool:
        """Frames written and not yet taken by the peer fill the transport's buffer."""
        transport = self.transport
        return (transport is not None and not transport.is_closing()
                and transport.get_write_buffer_size() >= DIRECT_WRITE_LIMIT)

    def write_control(self, frame: bytes) -> bool:
        """A protocol frame (a ping) written whole, now, unless the socket is backed up."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.ws.closed or self.backed_up():
            return False
        transport.write(frame)
        return True

    def abort(self) -> None:
        """Drop a peer that answers nothing (no close handshake: it would only wait)."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def close(self, code: int, reason: str) -> None:
        """Close once, from any task; a peer that does not read is cut off after a timeout."""
        if self.closing:
            return
        self.closing = True
        self._close_task = asyncio.ensure_future(self._close(code, reason))

    async def _close_unread(self, code: int, reason: str) -> None:
        """Send the close frame, give the peer CLOSE_TIMEOUT to read it, then drop the
        connection (aborted, not closed: a close with unread input resets it anyway)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(protocol.close_frame(code, reason))
        await asyncio.sleep(CLOSE_TIMEOUT)

    async def _flush_control(self) -> None:
        while self.control and not self.ws.closed:
            await self.ws.send_str(self.control.popleft())

    async def _close(self, code: int, reason: str) -> None:
        flood = code == protocol.CLOSE_POLICY
        if flood and self.transport is not None:
            # what a flooder still sends is neither parsed nor answered: awaiting its close
            # frame would mean reading (and paying for) everything queued before it
            self.transport.pause_reading()
        try:
            # answers queued before the close go first (not inside a message written in
            # parts: only a control frame such as the close may come between its frames)
            if code != protocol.CLOSE_TOO_SLOW and not self.snapshotting:
                await asyncio.wait_for(self._flush_control(), CLOSE_TIMEOUT)
            if flood:
                await self._close_unread(code, reason)
            else:
                await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()),
                                       CLOSE_TIMEOUT)
                return
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # not our cancellation: aiohttp re-awaits the drain waiter that a timed-out
            # send left cancelled, so a peer that stopped reading lands here
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        transport = self.ws._req.transport if self.ws._req is not None else None
        if transport is not None:
            transport.abort()  # a peer that does not read cannot be closed gracefully

    def resume_point(self, request: web.Request) -> tuple[int | str | None, str | None]:
        """`since` (an int, "invalid" or None) and `epoch` to resume from."""
        return resume_query(request)

    def snapshot_writer(self, request: web.Request) -> snapshot.MessageWriter:
        """Where the connect-time messages are written (server/snapshot.py)."""
        return _SnapshotWriter(self, request)

    # ---- token lifetime --------------------------------------------------------------

    def schedule_expiry(self) -> None:
        self.app[keys.DEADLINES].schedule(self, len(self.app[keys.SOCKETS]))

    def notice_expiring(self) -> None:
        exp = self.identity.expires_at
        if exp is not None:
            remaining = max(0, round(exp - time.time()))
            self.send(protocol.simple("token_expiring", expires_in=remaining))


def _int_query(request: web.Request, name: str) -> int | str | None:
    """A seq cursor by validate.py's rule; "invalid" (snapshot.judge_resume's word) if bad."""
    try:
        return validate.query_int(request.query.get(name), contract.Limits.cursor(name))
    except BadRequest:
        return "invalid"


def resume_query(request: web.Request) -> tuple[int | str | None, str | None]:
    """The query's `since` (an int, "invalid" or None) and `epoch`."""
    return _int_query(request, "since"), request.query.get("epoch")


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    config = app[keys.CONFIG]
    # pings are sent and answered here and by watch.py, not by a timer per socket in aiohttp;
    # aiohttp refuses a message of max_msg_size bytes itself, and the flag is the largest
    # one accepted (tests/test_ws_delivery.py pins both edges)
    # compress=False: permessage-deflate is declined on purpose. An update is framed once and
    # the same bytes go to every socket (`_write_direct`); deflate would need a per-socket
    # compressor (its zlib state alone is many times an idle socket's memory) and a second
    # framing for the slow path. Updates are small JSON; see README "Where SPEC is silent".
    ws = web.WebSocketResponse(max_msg_size=config.max_frame_bytes + 1, autoping=False,
                               compress=False)
    await ws.prepare(request)

    try:
        identity = app[keys.VERIFIER].verify(request.query.get("token"))
    except AuthError as exc:
        await ws.close(code=protocol.CLOSE_UNAUTHORIZED, message=f"token {exc.reason}".encode())
        return ws
    if parse_user_id(request.match_info["user_id"]) != identity.user_id:
        await ws.close(code=protocol.CLOSE_FORBIDDEN, message=b"token is for another user")
        return ws

    conn = Connection(ws, identity, request)
    metrics = app[keys.METRICS]
    admit(conn)  # before reading the snapshot: nothing committed from now on is missed
    metrics.connections.inc()
    metrics.connections_total.inc()
    try:
        try:
            await _send_snapshot(conn, request)
        except ConnectionError:
            return ws  # gone during its snapshot (or closed: 4408, 4409)
        conn.schedule_expiry()
        await _receive_loop(conn, request)
    finally:
        metrics.connections.dec()
        await release(conn)
        if not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)
    return ws


def admit(conn: Connection) -> None:
    """Attach a socket or an SSE stream to the hub (before its snapshot is read) and keep
    --max-connections-per-user, which counts both: the user's oldest is closed with 4409."""
    hub: Hub = conn.app[keys.HUB]
    hub.attach(conn)
    conn.app[keys.SOCKETS].add(conn)
    mine = hub.connections_of(conn.user_id)
    for old in mine[: max(0, len(mine) - conn.app[keys.CONFIG].max_connections_per_user)]:
        if isinstance(old, Connection):
            old.close(protocol.CLOSE_REPLACED, "too many connections for this user")


async def release(conn: Connection) -> None:
    """Detach a connection that ended and wait for its sender and its close to finish."""
    conn.closing = True
    conn.app[keys.HUB].detach(conn, conn.subscriptions)
    conn.app[keys.SOCKETS].discard(conn)
    await conn.stop_sending()
    if conn._close_task is not None:
        with contextlib.suppress(Exception):
            await conn._close_task


class _SnapshotWriter:
    """`snapshot.MessageWriter` for a socket: frames straight to its transport; `drain`
    waits for aiohttp's flow control (the transport's buffer back below its low-water
    mark). A stuck peer is closed by watch.py's stuck-send rule, which ends the wait."""

    __slots__ = ("conn", "protocol")

    def __init__(self, conn: Connection, request: web.Request) -> None:
        self.conn = conn
        self.protocol = request.protocol

    def _write(self, frame: bytes, count: bool = True) -> None:
        transport = self.conn.transport
        if self.conn.closing or transport is None or transport.is_closing():
            raise ConnectionResetError("socket closed during its snapshot")
        transport.write(frame)
        if count:
            self.conn.metrics.messages_sent.inc()

    def message(self, text: str, seq: int | None = None) -> None:
        self._write(protocol.text_frame(text))

    def part(self, data: bytes, *, first: bool, last: bool) -> None:
        self._write(protocol.data_frame(data, first=first, last=last), count=last)

    async def drain(self) -> None:
        conn = self.conn
        if self.protocol.writing_paused:
            conn.send_started = asyncio.get_running_loop().time()  # watch.py: stuck send?
            try:
                # shielded: aiohttp shares one drain waiter among its writers
                await asyncio.shield(self.protocol._drain_helper())
            finally:
                conn.send_started = 0.0
        if conn.closing:
            raise ConnectionResetError("socket closed during its snapshot")


async def _send_snapshot(conn: Connection, request: web.Request) -> None:
    """The connect-time messages, by pages with backpressure (server/snapshot.py), framed
    by the connection's own writer (a socket's frames; an SSE stream's events); live
    updates queued meanwhile wait in the outbox, under its bound, and go out after."""
    app = request.app
    store = app[keys.STORE]
    since, epoch = conn.resume_point(request)
    if isinstance(since, int) and since > store.last_seq:  # seen on another node, perhaps
        await store.catch_up(since)
    resume = snapshot.judge_resume(store, since, epoch)
    try:
        await snapshot.write_snapshot(
            conn.snapshot_writer(request), store, app[keys.SNAPSHOT_BUDGET],
            user_id=conn.user_id, connection_id=conn.id, resume=resume,
            mark_sent=conn.outbox.mark_sent)
    except snapshot.HistorySwept:
        conn.snapshotting = False
        conn.close(protocol.CLOSE_TOO_SLOW, "too slow: resume with since")
        return
    except StorageUnavailable as exc:
        # perhaps inside `active_tasks` (a message in parts): it stays `snapshotting`, so
        # nothing but the close frame (a stream: nothing) is written after its last part
        log.warning("snapshot of a connection not read (%s): closed with %d",
                    exc, protocol.CLOSE_TRY_AGAIN)
        conn.close(protocol.CLOSE_TRY_AGAIN, "storage unavailable: try again later")
        return
    conn.snapshotting = False
    conn.outbox.end_replay()
    conn.kick()


async def _receive_loop(conn: Connection, request: web.Request) -> None:
    ws = conn.ws
    async for msg in ws:
        if conn.closing:
            break
        # every frame counts, control frames too (a ping answered for free is a flood),
        # except the pong that answers our own ping: at most one per --ping-interval
        free = msg.type == WSMsgType.PONG and conn.ping_sent_at != 0.0
        conn.ping_sent_at = 0.0  # it spoke: alive
        if not free and not conn.limiter.allow():
            if conn.limiter.flooding:
                conn.close(protocol.CLOSE_POLICY, "message rate limit exceeded")
                break
            if conn.limiter.strikes == 1:
                conn.send(protocol.error("rate_limited", "too many messages; slow down"))
            continue
        if msg.type == WSMsgType.PING:
            await ws.pong(msg.data)
        elif msg.type == WSMsgType.PONG:
            pass
        elif msg.type == WSMsgType.TEXT:
            try:
                message = protocol.parse_client_message(msg.data)
                await _handle(conn, message, request)
            except protocol.ProtocolError as exc:
                conn.send(protocol.error(exc.code, exc.message))
        elif msg.type == WSMsgType.BINARY:
            conn.send(protocol.error("binary_frame", "only JSON text frames are accepted"))
        elif msg.type == WSMsgType.ERROR:
            break


async def _handle(conn: Connection, message: protocol.ClientMessage, request: web.Request
                  ) -> None:
    app = request.app
    if message.type == "ping":
        conn.send(protocol.pong())
    elif message.type == "subscribe":
        await _subscribe(conn, message.task_id or "", request)
    elif message.type == "unsubscribe":
        task_id = message.task_id or ""
        if task_id in conn.subscriptions:
            conn.subscriptions.pop(task_id, None)
            app[keys.HUB].unsubscribe(conn, task_id)
        conn.send(protocol.simple("unsubscribed", task_id=task_id))
    elif message.type == "refresh":
        _refresh(conn, message.token or "", request)


async def _subscribe(conn: Connection, task_id: str, request: web.Request) -> None:
    app = request.app
    hub = app[keys.HUB]
    if task_id not in conn.subscriptions and (
        len(conn.subscriptions) >= app[keys.CONFIG].max_subscriptions
    ):
        raise protocol.ProtocolError(
            "too_many_subscriptions",
            f"at most {app[keys.CONFIG].max_subscriptions} subscriptions per connection",
        )
    already = task_id in conn.subscriptions
    hub.subscribe(conn, task_id)  # before reading, so no change is missed
    conn.subscriptions[task_id] = None  # before the await: detach() cleans it up if cancelled
    allowed = False
    try:
        task: Task | None = await app[keys.STORE].get_task(task_id)
        allowed = conn.identity.is_admin or (
            task is not None and task.user_id == conn.user_id)
    except StorageUnavailable:
        # an `error` the client can retry; the socket stays open (SPEC "Storage unavailable")
        raise protocol.ProtocolError("unavailable",
                                     "storage unavailable: try the subscribe again") from None
    finally:
        if not allowed and not already:
            conn.subscriptions.pop(task_id, None)
            hub.unsubscribe(conn, task_id)
    if not allowed:
        # another user's task and a missing one get the same answer
        raise protocol.ProtocolError("forbidden", "no such task of yours to subscribe to")
    conn.send(protocol.simple("subscribed", task_id=task_id))
    if task is not None:
        conn.deliver_current(protocol.status_update(task))
        conn.flush()


def _refresh(conn: Connection, token: str, request: web.Request) -> None:
    try:
        identity = request.app[keys.VERIFIER].verify(token)
    except AuthError as exc:
        raise protocol.ProtocolError("invalid_token", f"refresh refused: token {exc.reason}"
                                     ) from None
    if identity.user_id != conn.user_id:
        raise protocol.ProtocolError("forbidden", "refresh token is for another user")
    conn.identity = identity
    conn.schedule_expiry()
    expires = None if identity.expires_at is None else utc_iso(identity.expires_at)
    conn.send(protocol.simple("refreshed", expires_at=expires))


async def close_all(app: web.Application) -> None:
    """Shutdown: every socket is closed with 1001 (going away)."""
    conns = list(app[keys.SOCKETS])
    for conn in conns:
        conn.close(protocol.CLOSE_GOING_AWAY, "server shutting down")
    tasks = [c._close_task for c in conns if c._close_task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=5.0)
