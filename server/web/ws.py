"""The WebSocket endpoint: authenticate, attach a `Connection` (connection.py) to the hub,
send its snapshot, then read frames and do what its session answers for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import WSMsgType, web

from ..core.auth import AuthError, Identity, TokenVerifier, parse_user_id
from ..push.messages import CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, ProtocolError, error
from ..push.session import (
    OP_BROKEN,
    Action,
    Close,
    Pong,
    Refresh,
    Session,
    Subscribe,
    Unsubscribe,
)
from ..storage.api import Store
from . import keys
from .connection import Connection, Services, resume_query

log = logging.getLogger(__name__)


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

        conn = Connection(ws, Session(identity, services.limits), request.transport,
                          services, request.protocol)
        metrics = services.metrics
        conn.admit()  # before reading the snapshot: nothing committed from now on is missed
        metrics.connections.inc()
        metrics.connections_total.inc()
        try:
            store = app[keys.STORE]
            try:
                await conn.send_snapshot(store, app[keys.SNAPSHOT_BUDGET],
                                         *resume_query(request), request.protocol)
            except ConnectionError:
                return ws  # gone during its snapshot (or closed: 4408, 4409)
            conn.schedule_expiry()
            await _receive_loop(conn, store, verifier)
        finally:
            metrics.connections.dec()
            await conn.release()
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2.0)
        return ws

    return websocket_handler


async def _receive_loop(conn: Connection, store: Store, verifier: TokenVerifier) -> None:
    session = conn.session
    async for msg in conn.ws:
        kind = OP_BROKEN if msg.type is WSMsgType.ERROR else msg.type
        if not await perform(conn, session.receive(kind, msg.data), store, verifier):
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


async def perform(conn: Connection, actions: Iterable[Action], store: Store,
                  verifier: TokenVerifier) -> bool:
    """Do what the session asked for one received frame; False: stop reading."""
    for action in actions:
        try:
            if isinstance(action, str):
                conn.send(action)
            elif isinstance(action, Pong):
                await conn.ws.pong(action.data)
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
