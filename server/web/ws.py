"""The WebSocket endpoint: authenticate, attach a `Connection` (connection.py) framed as a
WebSocket (`WebSocketFraming`) to the hub, send its snapshot, then read frames and do what
its session answers for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import WSMsgType, web

from ..core.auth import AuthError, Identity, TokenVerifier, parse_user_id
from ..push.frames import close_frame, data_frame, text_frame
from ..push.messages import (
    CLOSE_FORBIDDEN,
    CLOSE_POLICY,
    CLOSE_TOO_SLOW,
    CLOSE_UNAUTHORIZED,
    Message,
    ProtocolError,
    Update,
    error,
)
from ..push.session import (
    OP_BROKEN,
    Action,
    Close,
    Pong,
    Refresh,
    Session,
    State,
    Subscribe,
    Unsubscribe,
)
from ..storage.api import Store
from . import keys
from .connection import CLOSE_TIMEOUT, Connection, Services, resume_query

log = logging.getLogger(__name__)


class WebSocketFraming:
    """`connection.Framing` of a WebSocket: a message is a text frame (an update's frame is
    built once and shared by every socket), a message in parts a text frame and
    continuation frames; the close is aiohttp's handshake, which also reads the peer's
    answer (the receive loop runs), except for a flooder (a close frame, then cut off)."""

    what = "WebSocket connection"
    pings = True
    __slots__ = ("ws",)

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws

    def open(self) -> bool:
        return not self.ws.closed

    def message(self, item: Message | Update) -> bytes:
        return item.frame if isinstance(item, Update) else text_frame(item)

    def part(self, data: bytes, *, first: bool, last: bool) -> bytes:
        return data_frame(data, first=first, last=last)

    def dropped(self) -> None:
        pass

    async def close(self, conn: Connection, code: int, reason: str) -> None:
        flood = code == CLOSE_POLICY
        transport = conn.transport
        if flood and transport is not None:
            # what a flooder still sends is neither parsed nor answered: awaiting its close
            # frame would mean reading (and paying for) everything queued before it
            transport.pause_reading()
        try:
            # answers queued before the close go first (not inside a message written in
            # parts, a CUT close: only a control frame such as the close may come between
            # its frames)
            if code != CLOSE_TOO_SLOW and conn.session.state is State.CLOSING:
                await asyncio.wait_for(self._flush_control(conn), CLOSE_TIMEOUT)
            if flood:
                await self._close_unread(conn, code, reason)
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
        if conn.transport is not None:
            conn.transport.abort()  # a peer that does not read cannot be closed gracefully

    async def _flush_control(self, conn: Connection) -> None:
        session = conn.session
        while session.control and not self.ws.closed:
            text = session.next_control()
            if text is not None:
                await conn.write(text_frame(text))

    @staticmethod
    async def _close_unread(conn: Connection, code: int, reason: str) -> None:
        """Send the close frame, give the peer CLOSE_TIMEOUT to read it, then drop the
        connection (aborted, not closed: a close with unread input resets it anyway)."""
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        transport.write(close_frame(code, reason))
        await asyncio.sleep(CLOSE_TIMEOUT)


def handler(services: Services) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`GET /api/task/ws/task/{user_id}?token=JWT[&since=SEQ&epoch=E]`."""

    async def websocket_handler(request: web.Request) -> web.StreamResponse:
        app = request.app
        config = app[keys.CONFIG]
        # pings are sent and answered here and by watch.py, not by a timer per socket in
        # aiohttp; aiohttp refuses a message of max_msg_size bytes itself, and the flag is
        # the largest one accepted (tests/test_ws_delivery.py pins both edges)
        # compress=False: permessage-deflate is declined on purpose. An update is framed
        # once and the same bytes go to every socket (`_write_direct`); deflate would need
        # a per-socket compressor (its zlib state alone is many times an idle socket's
        # memory) and a second framing for the slow path. Updates are small JSON; measured
        # with Chromium in docs/performance.md, "permessage-deflate".
        ws = web.WebSocketResponse(max_msg_size=config.max_frame_bytes + 1, autoping=False,
                                   compress=False)
        await ws.prepare(request)

        verifier = app[keys.VERIFIER]
        try:
            identity: Identity = verifier.verify(request.query.get("token"))
        except AuthError as exc:
            await ws.close(code=CLOSE_UNAUTHORIZED,
                           message=f"token {exc.reason}".encode())
            return ws
        if parse_user_id(request.match_info["user_id"]) != identity.user_id:
            await ws.close(code=CLOSE_FORBIDDEN, message=b"token is for another user")
            return ws

        conn = Connection(WebSocketFraming(ws), Session(identity, services.limits),
                          request.transport, services)
        metrics = services.metrics
        conn.admit()  # before reading the snapshot: nothing committed from now on is missed
        metrics.connections.inc()
        metrics.connections_total.inc()
        try:
            store = app[keys.STORE]
            try:
                await conn.send_snapshot(store, app[keys.SNAPSHOT_BUDGET],
                                         *resume_query(request))
            except ConnectionError:
                return ws  # gone during its snapshot (or closed: 4408, 4409)
            conn.schedule_expiry()
            await _receive_loop(conn, ws, store, verifier)
        finally:
            metrics.connections.dec()
            await conn.release()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2.0)
        return ws

    return websocket_handler


async def _receive_loop(conn: Connection, ws: web.WebSocketResponse, store: Store,
                        verifier: TokenVerifier) -> None:
    session = conn.session
    async for msg in ws:
        kind = OP_BROKEN if msg.type is WSMsgType.ERROR else msg.type
        if not await perform(conn, ws, session.receive(kind, msg.data), store, verifier):
            break


def refresh(conn: Connection, token: str, verifier: TokenVerifier) -> None:
    try:
        identity = verifier.verify(token)
    except AuthError as exc:
        raise ProtocolError("invalid_token", f"refresh refused: token {exc.reason}"
                                     ) from None
    answer = conn.session.refreshed(identity)
    conn.schedule_expiry()
    conn.send(answer)


async def perform(conn: Connection, ws: web.WebSocketResponse, actions: Iterable[Action],
                  store: Store, verifier: TokenVerifier) -> bool:
    """Do what the session asked for one received frame; False: stop reading."""
    for action in actions:
        try:
            if isinstance(action, str):
                conn.send(action)
            elif isinstance(action, Pong):
                await ws.pong(action.data)
            elif isinstance(action, Subscribe):
                await conn.subscribe(action.task_id, store)
            elif isinstance(action, Unsubscribe):
                conn.services.hub.unsubscribe(conn, action.task_id)
            elif isinstance(action, Refresh):
                refresh(conn, action.token, verifier)
            elif isinstance(action, Close):
                conn.close(action.code, action.reason)
                return False
            else:
                return False  # STOP
        except ProtocolError as exc:
            conn.send(error(exc.code, exc.message))
    return True
