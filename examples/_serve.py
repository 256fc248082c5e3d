"""Run an example against a real app: create_app + AppRunner on 127.0.0.1 (a free port),
demo mode, a temporary database. A WebSocket client logged in as user 1 prints every update
the example pushes, so you see what a front end would see."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from server.app import create_app
from server.config import Config

TERMINAL = {"completed", "failed", "cancelled"}


async def _watch(url: str, user_id: int, done: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/api/demo/login", json={"user_id": user_id}) as resp:
            token = (await resp.json())["data"]["token"]
        ws_url = f"{url}/api/task/ws/task/{user_id}?token={token}"
        async with session.ws_connect(ws_url) as ws:
            done.set()  # connected: the example may start
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                if data["type"] == "task_status":
                    fields = {k: data[k] for k in ("status", "progress", "message", "result",
                                                   "error") if data.get(k) is not None}
                    print(f"  [ws] {data['task_id']} seq={data['seq']} {fields}")
                    if data["status"] in TERMINAL:
                        return
                else:
                    print(f"  [ws] {data['type']}")


async def serve_and_run(main: Callable[[], Awaitable[Any]], user_id: int = 1) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(db=str(Path(tmp) / "taskpush.db"), access_log=False)
        runner = web.AppRunner(create_app(config))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        print(f"taskpush running on {url} (demo mode, database in {tmp})")
        connected = asyncio.Event()
        watcher = asyncio.create_task(_watch(url, user_id, connected))
        try:
            await asyncio.wait_for(connected.wait(), 10)
            try:
                result = await main()
                print(f"main() returned {result!r}")
            except Exception as exc:
                result = exc
                print(f"main() raised {exc!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher, 5)
            return result
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await runner.cleanup()


def run(main: Callable[[], Awaitable[Any]]) -> None:
    asyncio.run(serve_and_run(main))
