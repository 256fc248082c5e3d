"""A real aiohttp server on loopback in front of a taskpush server, for the client's tests
about bad answers: it answers the first requests badly (or holds them), then forwards."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import aiohttp
from aiohttp import web

BadAnswer = Callable[[], web.Response]


class Front:
    """A real aiohttp server on loopback, on a loop of its own thread, in front of a
    taskpush server: the first requests get `bad` answers (one each, in order), the rest
    are forwarded. While `gate` is clear, forwarded requests wait for it (a slow server).
    `get_status`: every GET answers it (a taskpush older than a route)."""

    def __init__(self, target: str, bad: list[BadAnswer] | None = None,
                 gate: threading.Event | None = None, get_status: int | None = None) -> None:
        self.target, self.bad, self.gate = target, list(bad or []), gate
        self.get_status, self.gets = get_status, 0
        self.refused = self.forwarded = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as self._session:
            self._ready.set()
            await self._stop.wait()
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method == "GET" and self.get_status is not None:
            self.gets += 1
            return web.json_response({"code": self.get_status, "message": "no",
                                      "data": None}, status=self.get_status)
        if self.bad:
            self.refused += 1
            return self.bad.pop(0)()
        if self.gate is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        self.forwarded += 1
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("content-type", "x-api-key", "authorization")}
        async with self._session.request(request.method, self.target + request.path_qs,
                                         data=body, headers=headers) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type=resp.content_type)

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
