"""Server-Sent Events: the WebSocket's messages as a `text/event-stream`, for clients that
cannot use WebSockets or only listen (`EventSource`, `curl -N`).

One delivery path, two framings: a `Stream` is a `connection.Connection` on the same
`Session` (same hub attachment, Outbox with its coalescing and bound, connect-time
snapshot, stuck-send and token clocks in watch.py, shutdown in `connection.close_all`, per-user
limit) whose `Framing` is `EventFraming`: each message an event instead of a WebSocket
frame. What differs:

- `event:` is the message's type, `data:` its JSON; `task_status` and `task_deleted` (and a
  fresh stream's `active_tasks`) carry `id: <epoch>:<seq>`, a point up to which this user's
  changes have all been sent, so `Last-Event-ID` resumes exactly as `since`+`epoch` does.
  A task's state read out of order (an admin's `task_id=` subscription) carries the
  stream's current point, never its own seq, so an id never claims more than was sent.
- Where the socket gets a close code, the stream sends a last `close` event with the same
  code and reason (`{"type":"close","code":4409,"reason":"..."}`), then ends.
- The connect-time snapshot is the connection's (push/snapshot.py: by pages, under
  `--snapshot-memory`, drained page by page), framed by `EventFraming`: `active_tasks` is
  ONE event whose `data:` line is written page by page (orjson's JSON has no newline), each
  replayed change an event with its own `id:`. A close that comes inside that line cannot
  end with a `close` event: the stream is cut off (a client reconnects with its last id).
- Nothing is read from the client: no pings; one task (`stream_watch`) writes a comment
  every `--sse-heartbeat` seconds and notices streams whose peer went away.
- The token is checked once (401 envelope, no stream); the stream ends at its expiry as the
  socket is closed (a client reconnects with a fresh token and `since`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11

from ..core import contract
from ..core.auth import AuthError
from ..core.errors import BadRequest, Unauthorized
from ..push.messages import (
    CHANGE_KINDS,
    CLOSE_TOO_SLOW,
    Message,
    ProtocolError,
    Update,
    error,
    simple,
    task_id_field,
)
from ..push.session import Session
from . import keys
from .connection import (
    CLOSE_TIMEOUT,
    Connection,
    Services,
    resume_query,
)

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}
HEARTBEAT = b": keep-alive\n\n"


def event_bytes(kind: str, text: str, event_id: str | None = None) -> bytes:
    """One event: `event:`, optional `id:`, `data:` (one line per line of text), blank line."""
    head = f"event: {kind}\n" if event_id is None else f"event: {kind}\nid: {event_id}\n"
    if "\n" in text or "\r" in text:  # compact JSON never has one; stay correct anyway
        data = "".join(f"data: {line}\n" for line in text.splitlines())
    else:
        data = f"data: {text}\n"
    return (head + data + "\n").encode()


def chunk(data: bytes) -> bytes:
    """HTTP/1.1 chunked transfer coding of one piece of the body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class EventFraming:
    """`connection.Framing` of an event stream: a message is an event (`event:` its type,
    `data:` its JSON, `id:` a resume point for a change in order), a chunk of the body when
    the response is chunked; a message in parts is ONE event whose `data:` line is written
    part by part; the close is a last `close` event, then the end of the body (cut off at
    once if the peer is too slow to take it, or inside an event)."""

    what = "Server-Sent Events stream"
    pings = False  # an EventSource never answers: `stream_watch` writes heartbeats
    __slots__ = ("_chunked", "_connected_seq", "_epoch", "_point", "_since", "ended", "resp")

    def __init__(self, resp: web.StreamResponse, *, store_epoch: str,
                 since: int | str | None) -> None:
        self.resp = resp
        self._chunked = resp.chunked  # what the prepared response really does
        self._epoch = store_epoch
        self._since = since  # the resume point asked for (the first events' id)
        self._point: int | None = None  # the resume point sent last (the id of events)
        self._connected_seq = 0
        self.ended = asyncio.Event()  # the stream is over: its handler returns

    def open(self) -> bool:
        return True

    def _id(self, seq: int) -> str:
        return f"{self._epoch}:{seq}"

    def _id_or_none(self) -> str | None:
        return None if self._point is None else self._id(self._point)

    def wrap(self, data: bytes) -> bytes:
        return chunk(data) if self._chunked else data

    def message(self, item: Message | Update) -> bytes:
        if isinstance(item, Update):
            return self._update(item)
        seq = item.seq
        if item.kind in CHANGE_KINDS and seq is not None:
            # a change the snapshot replays, in seq order: every change of the user up to
            # it has been sent
            self._point = seq
            return self.wrap(event_bytes(item.kind, item, self._id(seq)))
        kind = item.kind
        if kind == "connected":  # resumed: the point is `since` until the replay moves it
            self._connected_seq = seq or 0
            self._point = self._since if isinstance(self._since, int) else self._connected_seq
        elif kind == "resync":  # answered as a fresh stream: the snapshot's seq
            self._point = self._connected_seq
        return self.wrap(event_bytes(kind, item))

    def _update(self, update: Update) -> bytes:
        seq = update.seq
        if not update.in_order:  # read out of order: it proves nothing about the rest
            return self.wrap(event_bytes(update.kind, update.text, self._id_or_none()))
        point = self._point
        if point is not None and seq < point:
            return self.wrap(event_bytes(update.kind, update.text, self._id(point)))
        self._point = seq
        if not self._chunked:
            return event_bytes(update.kind, update.text, self._id(seq))
        framed = update.event_chunk  # framed once for every stream, as its WebSocket frame is
        if framed is None:
            framed = chunk(event_bytes(update.kind, update.text, self._id(seq)))
            object.__setattr__(update, "event_chunk", framed)  # a cache on a frozen value
        return framed

    def part(self, data: bytes, *, first: bool, last: bool) -> bytes:
        if first:
            head = b"event: active_tasks\n"
            event_id = self._id_or_none()  # fresh: the snapshot's seq; resumed: `since`
            if event_id is not None:
                head += b"id: %s\n" % event_id.encode()
            data = head + b"data: " + data
        if last:
            data += b"\n\n"
        return self.wrap(data) if data else b""  # an empty chunk would end the body

    def dropped(self) -> None:
        self.ended.set()

    async def close(self, conn: Connection, code: int, reason: str) -> None:
        try:
            await conn.stop_sending()
            transport = conn.transport
            if (code == CLOSE_TOO_SLOW or transport is None or conn.in_message
                    or conn.backed_up()):
                if transport is not None:
                    transport.abort()
                return
            last = []
            while (text := conn.session.next_control()) is not None:
                last.append(self.message(text))
            text = simple("close", code=code, reason=reason)
            last.append(self.wrap(event_bytes("close", text)))
            if not transport.is_closing():
                transport.write(b"".join(last))
                conn.services.metrics.messages_sent.inc(len(last))
            await asyncio.wait_for(self.resp.write_eof(), CLOSE_TIMEOUT)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except (TimeoutError, ConnectionError, RuntimeError):
            if conn.transport is not None:
                conn.transport.abort()
        finally:
            self.ended.set()


class Stream(Connection):
    """A connection framed as an event stream: what the hub, watch.py and shutdown see of
    it is the socket's; only its `framing` differs."""

    __slots__ = ()
    framing: EventFraming

    @property
    def in_event(self) -> bool:
        """Inside the one event written in parts (the snapshot's `active_tasks`)."""
        return self.in_message

    @property
    def ended(self) -> asyncio.Event:
        return self.framing.ended

    def heartbeat(self) -> None:
        """A comment line, written whole between events (never while the peer lags)."""
        if not (self.closing or self.in_message or self.backed_up()) and self.transport:
            self.transport.write(self.framing.wrap(HEARTBEAT))


def _last_event_id(raw: str | None) -> tuple[int | str | None, str | None] | None:
    """`Last-Event-ID: <epoch>:<seq>` as (since, epoch); None when absent."""
    if raw is None or raw == "":
        return None
    epoch, sep, seq = raw.rpartition(":")
    if not sep or not (seq.isascii() and seq.isdigit()):
        return "invalid", None
    return contract.Limits.cursor("Last-Event-ID").saturate(seq), epoch or None


def handler(services: Services) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`GET /api/task/stream?token=JWT[&since=SEQ&epoch=E][&task_id=X...]`."""

    async def stream_handler(request: web.Request) -> web.StreamResponse:
        app = request.app
        config = app[keys.CONFIG]
        try:
            identity = app[keys.VERIFIER].verify(request.query.get("token"))
        except AuthError as exc:
            raise Unauthorized(f"token {exc.reason}") from None
        task_ids = request.query.getall("task_id", [])
        if len(task_ids) > config.max_subscriptions:
            raise BadRequest(f"at most {config.max_subscriptions} task_id per stream")
        try:
            task_ids = list(dict.fromkeys(task_id_field(t) for t in task_ids))
        except ProtocolError as exc:
            raise BadRequest(exc.message) from None
        resume = _last_event_id(request.headers.get("Last-Event-ID"))
        # the browser's own resume point wins over the URL it reconnects to
        since, epoch = resume_query(request) if resume is None else resume

        resp = web.StreamResponse(headers=HEADERS)
        if request.version >= HttpVersion11:
            resp.enable_chunked_encoding()  # said on purpose: direct writes frame the chunks
        resp.force_close()  # the end of the stream is the end of the connection
        await resp.prepare(request)
        await resp.write(b": taskpush\n\n")  # the headers go out now, not with the first event
        store = app[keys.STORE]
        framing = EventFraming(resp, store_epoch=store.epoch, since=since)
        stream = Stream(framing, Session(identity, services.limits), request.transport,
                        services)
        metrics = services.metrics
        stream.admit()  # before the snapshot is read: nothing committed from now on is missed
        metrics.sse_streams.inc()
        metrics.sse_total.inc()
        try:
            try:
                await stream.send_snapshot(store, app[keys.SNAPSHOT_BUDGET], since, epoch)
            except ConnectionError:
                return resp  # gone during its snapshot (or cut off: 4408; closed: 4409, 1001)
            for task_id in task_ids:
                if stream.closing:
                    break  # closed during its snapshot (1013, 4408, 4409, 1001)
                try:
                    await stream.subscribe(task_id, store)
                except ProtocolError as exc:
                    stream.send(error(exc.code, exc.message))
            stream.schedule_expiry()
            await stream.ended.wait()
        finally:
            metrics.sse_streams.dec()
            await stream.release()
        return resp

    return stream_handler


def check_streams(conns: Iterable[Any], beat: bool) -> None:
    """One tick: a stream whose peer went away is ended; with `beat`, heartbeats."""
    for conn in conns:
        if not isinstance(conn, Stream):
            continue
        transport = conn.transport
        if transport is None or transport.is_closing():
            conn.session.gone()
            conn.framing.ended.set()
        elif beat:
            conn.heartbeat()


def stream_watch(every: float, sockets: Callable[[], Iterable[object]]
                 ) -> Callable[[object], AsyncIterator[None]]:
    """A cleanup_ctx: one task for every stream's heartbeat (each `every` seconds) and
    hang-up, none per stream. Its collaborators are passed in; it reads no app state."""
    tick = min(1.0, every / 2)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + every
        while True:
            await asyncio.sleep(tick)
            beat = loop.time() >= next_beat
            if beat:
                next_beat = loop.time() + every
            check_streams(list(sockets()), beat)

    async def ctx(_app: object) -> AsyncIterator[None]:
        task = asyncio.create_task(run(), name="taskpush-stream-watch")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
