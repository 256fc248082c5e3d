"""A producer (X-API-Key) reads a task's status as a user reads their own: ETag, 304, long
poll; any user's task; a wrong key 401, no key configured 403; a bearer token still decides
when both are sent."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import PRODUCER, auth, event, register

STATUS = "/api/task/task/{}/status"


async def test_the_producer_key_reads_any_task_with_its_etag(client: Any) -> None:
    await register(client, "p1", 7)
    resp = await client.get(STATUS.format("p1"), headers=PRODUCER)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["data"]["task_id"] == "p1" and body["data"]["user_id"] == 7
    etag = resp.headers["ETag"]
    again = await client.get(STATUS.format("p1"), headers={**PRODUCER, "If-None-Match": etag})
    assert again.status == 304
    missing = await client.get(STATUS.format("nope"), headers=PRODUCER)
    assert missing.status == 404


async def test_a_producer_long_poll_returns_on_the_users_cancel(client: Any) -> None:
    await register(client, "p2", 1)
    await event(client, "p2", "running")
    first = await client.get(STATUS.format("p2"), headers=PRODUCER)
    etag = first.headers["ETag"]
    poll = asyncio.ensure_future(client.get(
        STATUS.format("p2") + "?wait=30", headers={**PRODUCER, "If-None-Match": etag}))
    cancel = await client.post("/api/task/task/p2/cancel", headers=auth(1))
    assert cancel.status == 200
    resp = await asyncio.wait_for(poll, 20)
    assert resp.status == 200
    data = (await resp.json())["data"]
    assert data["status"] == "cancelled" and data["cancel_requested"] is True


async def test_a_wrong_key_reads_nothing(client: Any) -> None:
    await register(client, "p3", 1)
    wrong = await client.get(STATUS.format("p3"), headers={"X-API-Key": "x" * 32})
    assert wrong.status == 401
    assert "x" * 32 not in await wrong.text()
    # both headers: the bearer token decides (another user's task is not found)
    both = await client.get(STATUS.format("p3"), headers={**PRODUCER, **auth(2)})
    assert both.status == 404


async def test_no_producer_key_configured_reads_nothing(make_client: Any) -> None:
    disabled = await make_client(api_key=None)
    refused = await disabled.get(STATUS.format("p3"), headers=PRODUCER)
    assert refused.status == 403
