"""Long polls are capped per user (`--max-polls-per-user`): one user at the cap gets a 429
envelope with Retry-After while another user's poll still waits; a slot comes back when
its poll ends by a change, by its timeout, or by its client hanging up."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from server.app import create_app
from server.config import Config
from server.web import keys
from tests.cluster_support import eventually
from tests.conftest import PRODUCER, MakeClient, auth, event, register
from tests.support import STATUS, data_of, error_of


def poll(client: Any, task_id: str, etag: str, user_id: int = 1, wait: int = 30
         ) -> asyncio.Task[Any]:
    return asyncio.create_task(client.get(
        STATUS.format(task_id) + f"?wait={wait}",
        headers={**auth(user_id), "If-None-Match": etag}))


async def held(client: Any, user_id: int, count: int) -> None:
    polls = client.server.app[keys.POLLS]
    await eventually(lambda: polls.held(user_id) == count, 10,
                     f"user {user_id} holding {count} polls")


async def test_a_user_at_the_cap_gets_429_while_another_users_poll_waits(
        make_client: MakeClient) -> None:
    client = await make_client(max_polls_per_user=2)
    a1 = await register(client, "a1", 1)
    b1 = await register(client, "b1", 2)
    etag = f'"{a1["seq"]}"'
    first, second = poll(client, "a1", etag), poll(client, "a1", etag)
    await held(client, 1, 2)
    refused = await client.get(STATUS.format("a1") + "?wait=30",
                               headers={**auth(1), "If-None-Match": etag})
    body = await error_of(refused, 429)
    assert "long polls" in body["message"] and refused.headers["Retry-After"] == "1"
    # not a poll: a plain read (no wait, or an ETag that is not current) is never refused
    assert (await data_of(await client.get(STATUS.format("a1"), headers=auth(1))))["seq"]
    other = poll(client, "b1", f'"{b1["seq"]}"', user_id=2)
    await held(client, 2, 1)
    changed = await event(client, "b1", "running")
    assert (await data_of(await asyncio.wait_for(other, 10)))["seq"] == changed["seq"]
    # a change releases user 1's polls, and their slots with them
    changed = await event(client, "a1", "running")
    for waiting in (first, second):
        assert (await data_of(await asyncio.wait_for(waiting, 10)))["seq"] == changed["seq"]
    await held(client, 1, 0)


async def test_a_slot_comes_back_after_a_timeout(make_client: MakeClient) -> None:
    client = await make_client(max_polls_per_user=1)
    task = await register(client, "a1", 1)
    etag = f'"{task["seq"]}"'
    timed = await client.get(STATUS.format("a1") + "?wait=1",
                             headers={**auth(1), "If-None-Match": etag})
    assert timed.status == 304
    await held(client, 1, 0)
    again = poll(client, "a1", etag)
    await held(client, 1, 1)
    changed = await event(client, "a1", "running")
    assert (await data_of(await asyncio.wait_for(again, 10)))["seq"] == changed["seq"]


async def test_a_slot_comes_back_when_the_client_hangs_up(config: Config) -> None:
    """Served as `run.py` serves (aiohttp's test server cancels a handler whose client
    left; `web.run_app` does not, so the poll itself must notice)."""
    app = create_app(config.replace(max_polls_per_user=1))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    polls = app[keys.POLLS]
    try:
        async with aiohttp.ClientSession(base) as http:
            resp = await http.post("/api/task/tasks", headers=PRODUCER, json={
                "task_id": "a1", "user_id": 1, "task_type": "t"})
            etag = f'"{(await resp.json())["data"]["seq"]}"'
            headers = {**auth(1), "If-None-Match": etag}
            gone = asyncio.create_task(http.get(STATUS.format("a1") + "?wait=30",
                                                headers=headers))
            await eventually(lambda: polls.held(1) == 1, 10, "the poll waiting")
            gone.cancel()  # the client hangs up: its connection is closed
            await asyncio.gather(gone, return_exceptions=True)
            await eventually(lambda: polls.held(1) == 0, 10, "the slot released")
            resp = await http.get(STATUS.format("a1") + "?wait=1", headers=headers)
            assert resp.status == 304
    finally:
        await runner.cleanup()
