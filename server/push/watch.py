"""Every socket's clocks served by one task and one timer, none per socket (a timer per
socket is most of an idle socket's memory: docs/performance.md). Each socket's session
(`session.Session`) keeps its clocks and decides; this module only asks it when:
- token deadlines (`token_expiring`, then close 4401) sit in one heap served by a single
  loop timer; an entry holds a weak reference and is dropped if the socket has gone or its
  token was refreshed since;
- one task ticks about once a second: it pings each socket every `--ping-interval` (a
  two-byte frame), drops a peer that has sent nothing for `--ping-timeout` after a ping, and
  closes with 4408 a socket whose send has been stuck, or whose written frames have sat in
  its transport unread, for longer than `--send-timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

from .session import Close, Session, Tick

log = logging.getLogger(__name__)

PING_FRAME = b"\x89\x00"  # RFC 6455: final frame, opcode ping, no payload, unmasked


class Watched(Protocol):
    """What the clocks need of a socket (ws.Connection, sse.Stream): its sans-I/O session,
    which keeps the clocks and decides, and the I/O that carries a decision out. Nothing
    of aiohttp."""

    session: Session

    def backed_up(self) -> bool: ...

    def write_control(self, frame: bytes) -> bool: ...

    def notice_expiring(self) -> None: ...

    def close(self, code: int, reason: str) -> object: ...

    def abort(self) -> None: ...


Connection = Watched  # the name the rest of this module reads best with
_Entry = tuple[float, int, "weakref.ref[Watched]", int, bool]  # when, n, conn, gen, close?


class TokenDeadlines:
    """The heap of (wall-clock) token deadlines and the one timer that serves it."""

    def __init__(self, leeway: float) -> None:
        self.leeway = leeway
        self._heap: list[_Entry] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, conn: Connection, live: int) -> None:
        """(Re)start `conn`'s deadlines from its current token; earlier ones lapse."""
        session = conn.session
        generation = session.restart_token_clock()
        due = session.token_deadlines(self.leeway)
        if due is None:
            return
        notice_at, close_at = due
        ref = weakref.ref(conn)
        if notice_at > time.time():
            self._push((notice_at, next(self._order), ref, generation, False))
        else:
            conn.notice_expiring()
        self._push((close_at, next(self._order), ref, generation, True))
        if len(self._heap) > 64 + 4 * live:
            self._compact()
        self._arm()

    def _push(self, entry: _Entry) -> None:
        heapq.heappush(self._heap, entry)

    @staticmethod
    def _due(entry: _Entry) -> tuple[Connection | None, Close | Tick | None]:
        """The entry's socket and what its session decides (None: the entry lapsed)."""
        conn = entry[2]()
        if conn is None:
            return None, None
        return conn, conn.session.token_due(entry[3], entry[4])

    def _compact(self) -> None:
        """Forget the entries of sockets that closed or refreshed their token."""
        self._heap = [entry for entry in self._heap if self._due(entry)[1] is not None]
        heapq.heapify(self._heap)

    def _arm(self) -> None:
        if not self._heap:
            return
        when = self._heap[0][0]
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = when
        self._timer = loop.call_at(loop.time() + max(0.0, when - time.time()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.time()
        while self._heap and self._heap[0][0] <= now:
            conn, due = self._due(heapq.heappop(self._heap))
            if conn is None or due is None:
                continue
            try:
                if isinstance(due, Close):
                    conn.close(due.code, due.reason)
                else:
                    conn.notice_expiring()
            except Exception:  # one socket's failure must not stop every other deadline
                log.exception("token deadline of a socket failed")
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()


def check_sockets(conns: Iterable[Connection], now: float, *, send_timeout: float,
                  ping_timeout: float, ping: bool) -> tuple[int, int]:
    """One tick over every socket: returns (closed as stuck, dropped as dead). Each
    session judges its own clocks (`Session.clock`); this carries the verdicts out."""
    stuck = dead = 0
    for conn in conns:
        session = conn.session
        if session.closing:
            continue
        verdict = session.clock(now, backed_up=conn.backed_up(), send_timeout=send_timeout,
                                ping_timeout=ping_timeout, ping=ping)
        if verdict is None:
            continue
        if verdict is Tick.PING:
            if conn.write_control(PING_FRAME):
                session.pinged(now)
        elif verdict is Tick.DEAD:
            conn.abort()  # it answers nothing: a close handshake would only wait
            dead += 1
        elif isinstance(verdict, Close):
            conn.close(verdict.code, verdict.reason)
            stuck += 1
    return stuck, dead


def socket_watch(sockets: Callable[[], Iterable[Watched]], deadlines: TokenDeadlines,
                 on_stuck: Callable[[int], object], *, ping_interval: float,
                 ping_timeout: float, send_timeout: float
                 ) -> Callable[[object], AsyncIterator[None]]:
    """A cleanup_ctx: the ticking task over `sockets()`, and the token deadlines' timer
    stopped at the end. Its collaborators and settings are passed in; it reads no app
    state and no configuration."""
    ping_every = ping_interval
    tick = min(1.0, send_timeout / 2, ping_every / 2 if ping_every else 1.0)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + ping_every
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            ping = bool(ping_every) and now >= next_ping
            if ping:
                next_ping = now + ping_every
            stuck, _ = check_sockets(list(sockets()), now,
                                     send_timeout=send_timeout,
                                     ping_timeout=ping_timeout, ping=ping)
            if stuck:
                on_stuck(stuck)

    async def ctx(_app: object) -> AsyncIterator[None]:
        task = asyncio.create_task(run(), name="taskpush-socket-watch")
        yield
        task.cancel()
        deadlines.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
