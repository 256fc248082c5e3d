"""server/push/watch.py: the clocks of every socket kept without a timer per socket.

Unit tests with a stand-in socket: a real sans-I/O `session.Session` (which keeps the
clocks and decides) and the few I/O methods of `watch.Watched`, recorded; the real
sockets' expiry, ping and stuck-send behaviour is tested end to end in test_ws_delivery.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

from server.core.auth import Identity as _Identity
from server.push.session import Session, SessionLimits, State
from server.push.watch import PING_FRAME, TokenDeadlines, check_sockets

LIMITS = SessionLimits(send_queue=100, rate=20.0, burst=40, strikes=3, max_subscriptions=10)


def Identity(expires_at: float | None) -> _Identity:
    return _Identity(1, expires_at=expires_at)


class Socket:
    def __init__(self, expires_at: float | None = None) -> None:
        self.session = Session(Identity(expires_at), LIMITS)
        self.session.snapshot_written()
        self.full = False  # the transport's buffer is over the direct-write limit
        self.events: list[str] = []
        self.frames: list[bytes] = []
        self.notified = asyncio.Event()

    def notice_expiring(self) -> None:
        self.events.append("notice")
        self.notified.set()

    def close(self, code: int, reason: str) -> None:
        self.events.append(f"close {code}")
        self.session.close(code, reason)
        self.notified.set()

    def abort(self) -> None:
        self.events.append("abort")
        self.session.gone()

    def backed_up(self) -> bool:
        return self.full

    def write_control(self, frame: bytes) -> bool:
        if self.full:
            return False
        self.frames.append(frame)
        return True


async def wait(sock: Socket, timeout: float = 5.0) -> None:
    await asyncio.wait_for(sock.notified.wait(), timeout)
    sock.notified.clear()


async def test_notice_then_close_at_exp_plus_leeway() -> None:
    deadlines = TokenDeadlines(leeway=0.1)
    sock = Socket(expires_at=time.time() + 0.2)  # inside the notice window already
    deadlines.schedule(sock, live=1)
    assert sock.events == ["notice"]
    sock.notified.clear()
    await wait(sock)
    assert sock.events == ["notice", "close 4401"]
    deadlines.stop()


async def test_a_refreshed_token_cancels_the_old_deadlines() -> None:
    deadlines = TokenDeadlines(leeway=0.0)
    sock = Socket(expires_at=time.time() + 0.2)
    deadlines.schedule(sock, live=1)
    sock.session.refreshed(Identity(time.time() + 0.6))  # refreshed
    deadlines.schedule(sock, live=1)
    sock.events.clear()
    sock.notified.clear()
    await wait(sock)
    assert sock.events == ["close 4401"]  # once, at the new deadline
    assert deadlines._heap == []  # the stale entry was dropped when it came due
    deadlines.stop()


async def test_no_deadline_without_exp_and_closed_sockets_are_not_touched() -> None:
    deadlines = TokenDeadlines(leeway=0.0)
    forever = Socket(expires_at=None)
    deadlines.schedule(forever, live=2)
    assert len(deadlines) == 0
    gone = Socket(expires_at=time.time() + 0.05)
    deadlines.schedule(gone, live=2)
    witness = Socket(expires_at=time.time() + 0.15)  # due after `gone`: served after it
    deadlines.schedule(witness, live=2)
    gone.session.gone()
    gone.events.clear()
    witness.notified.clear()
    await wait(witness)
    assert witness.events[-1] == "close 4401"
    assert gone.events == []  # its deadline passed first: a closed socket is not touched
    deadlines.stop()


async def test_entries_do_not_keep_sockets_alive_and_are_compacted() -> None:
    deadlines = TokenDeadlines(leeway=0.0)
    refs = []
    for _ in range(200):
        sock = Socket(expires_at=time.time() + 3600)
        deadlines.schedule(sock, live=1)
        refs.append(weakref.ref(sock))
        del sock
    gc.collect()
    assert all(ref() is None for ref in refs)
    # 64 + 4 * live bounds the heap: the entries of sockets gone were compacted away
    assert len(deadlines) <= 64 + 4 * 1 + 2
    deadlines.stop()


def test_ping_once_until_answered_then_drop_a_silent_peer() -> None:
    sock = Socket()
    assert check_sockets([sock], 10.0, send_timeout=10, ping_timeout=5, ping=True) == (0, 0)
    assert sock.frames == [PING_FRAME] and sock.session.ping_sent_at == 10.0
    check_sockets([sock], 12.0, send_timeout=10, ping_timeout=5, ping=True)
    assert sock.frames == [PING_FRAME]  # one unanswered ping at a time
    assert check_sockets([sock], 15.5, send_timeout=10, ping_timeout=5, ping=False) == (0, 1)
    assert sock.events == ["abort"]


def test_an_answered_ping_keeps_the_peer() -> None:
    sock = Socket()
    check_sockets([sock], 10.0, send_timeout=10, ping_timeout=5, ping=True)
    sock.session.ping_sent_at = 0.0  # what the receive loop does on any frame (the pong)
    check_sockets([sock], 100.0, send_timeout=10, ping_timeout=5, ping=True)
    assert sock.events == [] and sock.frames == [PING_FRAME, PING_FRAME]


def test_a_backed_up_socket_with_no_sender_is_closed_4408_after_the_send_timeout() -> None:
    """Frames left unread in the transport by direct writes count as a stuck send."""
    sock = Socket()
    sock.full = True
    assert check_sockets([sock], 10.0, send_timeout=10, ping_timeout=5, ping=True) == (0, 0)
    assert sock.frames == [] and sock.session.ping_sent_at == 0.0  # not pinged behind a backlog
    assert check_sockets([sock], 19.0, send_timeout=10, ping_timeout=5, ping=True) == (0, 0)
    assert check_sockets([sock], 20.5, send_timeout=10, ping_timeout=5, ping=False) == (1, 0)
    assert sock.events == ["close 4408"]


def test_a_backlog_that_drains_in_time_is_forgiven() -> None:
    sock = Socket()
    sock.full = True
    check_sockets([sock], 10.0, send_timeout=10, ping_timeout=5, ping=False)
    sock.full = False  # the peer read it
    check_sockets([sock], 15.0, send_timeout=10, ping_timeout=5, ping=False)
    sock.full = True
    assert check_sockets([sock], 21.0, send_timeout=10, ping_timeout=5, ping=False) == (0, 0)
    assert sock.events == [] and sock.session.backed_up_since == 21.0


def test_a_stuck_send_is_closed_4408() -> None:
    sock = Socket()
    sock.session.send_began(1.0)
    assert check_sockets([sock], 5.0, send_timeout=10, ping_timeout=5, ping=False) == (0, 0)
    assert check_sockets([sock], 11.5, send_timeout=10, ping_timeout=5, ping=False) == (1, 0)
    assert sock.events == ["close 4408"]


def test_a_socket_waiting_for_its_snapshot_is_neither_pinged_nor_dropped_as_dead() -> None:
    """Its receive loop does not run before its snapshot is written (its pongs go unread):
    waiting its turn for the snapshot budget is not silence."""
    sock = Socket()
    check_sockets([sock], 10.0, send_timeout=10, ping_timeout=5, ping=True)
    sock.session.state = State.SNAPSHOT  # a ping went out just before; the snapshot began
    for now in (12.0, 16.0, 30.0, 100.0):
        assert check_sockets([sock], now, send_timeout=10, ping_timeout=5, ping=True) == (0, 0)
    assert sock.events == [] and sock.frames == [PING_FRAME]
    sock.session.state = State.OPEN
    assert check_sockets([sock], 101.0, send_timeout=10, ping_timeout=5, ping=True) == (0, 1)


def test_a_socket_stuck_writing_a_snapshot_page_is_still_closed_4408() -> None:
    sock = Socket()
    sock.session.state = State.SNAPSHOT
    sock.session.send_began(1.0)  # the snapshot's drain: the peer does not take the page
    assert check_sockets([sock], 11.5, send_timeout=10, ping_timeout=5, ping=True) == (1, 0)
    sock = Socket()
    sock.session.state = State.SNAPSHOT
    sock.full = True  # or its pages sit unread in the transport
    check_sockets([sock], 10.0, send_timeout=10, ping_timeout=5, ping=True)
    assert check_sockets([sock], 20.5, send_timeout=10, ping_timeout=5, ping=True) == (1, 0)
    assert sock.events == ["close 4408"]


async def test_a_failing_socket_does_not_stop_the_other_deadlines() -> None:
    class Broken(Socket):
        def notice_expiring(self) -> None:
            raise RuntimeError("boom")

    deadlines = TokenDeadlines(leeway=0.0)
    broken = Broken(expires_at=time.time() + 60.05)  # notice due in 0.05 s, before the close
    deadlines.schedule(broken, live=2)
    healthy = Socket(expires_at=time.time() + 0.2)
    deadlines.schedule(healthy, live=2)
    healthy.events.clear()
    healthy.notified.clear()
    await wait(healthy)
    assert healthy.events[-1] == "close 4401"
    deadlines.stop()
