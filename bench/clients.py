"""WebSocket receivers that run inside the orchestrator process.

Each client holds one authenticated WebSocket and a reader coroutine. ``task_status`` frames
whose ``message`` is ``"b:<step>:<due_ns>"`` are timed against the monotonic clock (shared by
all processes of the machine) and recorded per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict

import aiohttp
import orjson

from bench.common import make_token

mono = time.monotonic_ns
loads = orjson.loads
TEXT = aiohttp.WSMsgType.TEXT
ENDED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
         aiohttp.WSMsgType.ERROR)


class Stats:
    def __init__(self) -> None:
        self.lat: dict[str, list[int]] = defaultdict(list)
        self.last_recv: dict[str, int] = {}
        self.status_msgs = 0
        self.seq_regressions = 0
        self.other_msgs: dict[str, int] = defaultdict(int)
        self.close_codes: dict[str, int] = defaultdict(int)

    def count(self, step: str) -> int:
        return len(self.lat.get(step, ()))


class Client:
    __slots__ = ("active_count", "error", "last_seq", "reader", "ready", "t_ready", "uid", "ws")

    def __init__(self, uid: int) -> None:
        self.uid = uid
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.active_count: int | None = None
        self.t_ready: int | None = None
        self.reader: asyncio.Task | None = None
        self.last_seq: dict[str, int] = {}
        self.error: str | None = None


async def all_at_once(coros: list, timeout: float) -> tuple[int, int, set, set]:
    """Start every coroutine now; wait (bounded) for all; cancel the late ones."""
    t0 = mono()
    done, pending = await asyncio.wait([asyncio.create_task(c) for c in coros],
                                       timeout=timeout)
    for task in pending:
        task.cancel()
    return t0, mono(), done, pending


def connect_summary(t0: int, t1: int, clients: list, timed_out: int) -> dict:
    """What a mass connect reports: who got `active_tasks`, who did not and why."""
    errors: dict[str, int] = defaultdict(int)
    for c in clients:
        if c.error:
            errors[c.error[:80]] += 1
    return {
        "t0": t0,
        "wall_s": (t1 - t0) / 1e9,
        "clients": clients,
        "ok": [c for c in clients
               if c.ready.done() and not c.ready.cancelled() and c.ready.result()],
        "timed_out": timed_out,
        "errors": dict(errors),
    }


class Pool:
    """A set of WebSocket clients sharing one unlimited ClientSession."""

    def __init__(self, base_url: str, secret: str) -> None:
        self.base = base_url.rstrip("/")
        self.secret = secret
        self.stats = Stats()
        self.clients: list[Client] = []
        # limit=0: WebSockets hold their connection for life; a limited pool would block.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=60),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        await self.close_all()
        await self.session.close()

    def url(self, uid: int, token: str) -> str:
        return f"{self.base}/api/task/ws/task/{uid}?token={token}"

    async def connect(self, uid: int, token: str | None = None) -> Client:
        c = Client(uid)
        self.clients.append(c)
        try:
            c.ws = await self.session.ws_connect(
                self.url(uid, token or make_token(self.secret, uid)),
                autoping=True,
                heartbeat=None,
                max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            c.error = f"connect: {type(e).__name__}: {e}"[:200]
            if not c.ready.done():
                c.ready.set_result(False)
            return c
        c.reader = asyncio.create_task(self._read(c))
        return c

    async def _read(self, c: Client) -> None:
        st = self.stats
        lat = st.lat
        last_recv = st.last_recv
        last_seq = c.last_seq
        ws = c.ws
        try:
            while True:
                msg = await ws.receive()
                if msg.type is TEXT:
                    d = loads(msg.data)
                    typ = d.get("type")
                    if typ == "task_status":
                        now = mono()
                        st.status_msgs += 1
                        tid = d.get("task_id")
                        s = d.get("seq")
                        prev = last_seq.get(tid)
                        if prev is not None and s is not None and s <= prev:
                            st.seq_regressions += 1
                        last_seq[tid] = s
                        m = d.get("message")
                        if m and m[:2] == "b:":
                            _, step, due = m.split(":")
                            lat[step].append(now - int(due))
                            last_recv[step] = now
                    elif typ == "active_tasks":
                        c.active_count = d.get("count")
                        c.t_ready = mono()
                        if not c.ready.done():
                            c.ready.set_result(True)
                    elif typ == "connected":
                        pass
                    else:
                        st.other_msgs[str(typ)] += 1
                elif msg.type in ENDED:
                    code = ws.close_code
                    st.close_codes[str(code)] += 1
                    if not c.ready.done():
                        c.error = f"closed {code} {msg.extra!r}"[:200]
                        c.ready.set_result(False)
                    return
        except (asyncio.CancelledError, ConnectionError):
            if not c.ready.done():
                c.ready.set_result(False)
            raise
        except Exception as e:
            c.error = f"reader: {type(e).__name__}: {e}"[:200]
            if not c.ready.done():
                c.ready.set_result(False)

    async def connect_many(self, uids, concurrency: int = 0, timeout: float = 60.0) -> dict:
        """Connect one client per uid and wait until each got ``active_tasks`` (or failed).

        concurrency=0 launches every handshake at once (the reconnect storm)."""
        toks = {u: make_token(self.secret, u) for u in uids}
        sem = asyncio.Semaphore(concurrency) if concurrency else None

        async def one(u):
            if sem is None:
                c = await self.connect(u, toks[u])
                await c.ready
                return c
            async with sem:
                c = await self.connect(u, toks[u])
                await c.ready
                return c

        t0, t1, done, pending = await all_at_once([one(u) for u in uids], timeout)
        clients = [t.result() for t in done if not t.cancelled() and t.exception() is None]
        return connect_summary(t0, t1, clients, len(pending))

    async def close_all(self) -> None:
        clients, self.clients = self.clients, []

        async def close(c: Client):
            if c.ws is not None and not c.ws.closed:
                with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
                    await asyncio.wait_for(c.ws.close(), 5)
            if c.reader is not None and not c.reader.done():
                c.reader.cancel()

        # Bounded concurrency so the close itself is not a storm.
        for i in range(0, len(clients), 500):
            await asyncio.gather(*(close(c) for c in clients[i : i + 500]))
