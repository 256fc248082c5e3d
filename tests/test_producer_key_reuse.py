"""An Idempotency-Key reused with a different event: 422, nothing applied, on both engines
and in both forms; the same event again (whatever its bytes) stays a replay of the first
answer. `model.event_digest` says what "the same event" is."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from tests.conftest import PRODUCER, MakeClient, auth, register
from tests.engines import ENGINES

EVENTS = "/api/task/task/{}/events"
BATCH = "/api/task/events"
JSON_HEADERS = {**PRODUCER, "Content-Type": "application/json"}


@pytest.fixture(params=ENGINES)
async def client(request: pytest.FixtureRequest, make_client: MakeClient) -> Any:
    """An app on a SQLite file, or on a fresh PostgreSQL database."""
    if request.param == "postgresql":
        return await make_client(db=request.getfixturevalue("pg_url"))
    return await make_client()


async def post_event(client: Any, task_id: str, key: str, body: bytes) -> Any:
    return await client.post(EVENTS.format(task_id), data=body,
                             headers={**JSON_HEADERS, "Idempotency-Key": key})


async def batch(client: Any, *events: dict[str, Any]) -> list[dict[str, Any]]:
    resp = await client.post(BATCH, headers=PRODUCER, json={"events": list(events)})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]["results"]


async def history(client: Any, task_id: str) -> list[tuple[str, float]]:
    resp = await client.get(f"/api/task/task/{task_id}/history", headers=auth(1))
    return [(e["status"], e["progress"]) for e in (await resp.json())["data"]["events"]]


async def test_the_single_form_answers_422_to_a_key_reused_with_another_event(client: Any
                                                                              ) -> None:
    await register(client, "r1")
    first = await post_event(client, "r1", "k", b'{"status": "progress", "progress": 10,'
                                                b' "result": {"a": 1, "b": 2}}')
    assert first.status == 200, await first.text()
    seq = (await first.json())["data"]["seq"]
    # the same event in other bytes (order, spacing, 10.0): a replay of the first answer
    same = await post_event(client, "r1", "k", b'{"result":{"b":2,"a":1},"progress":10.0,'
                                               b'"status":"progress"}')
    assert same.status == 200, await same.text()
    assert (await same.json())["data"]["seq"] == seq
    reused = await post_event(client, "r1", "k", b'{"status": "progress", "progress": 20}')
    assert reused.status == 422, await reused.text()
    envelope = await reused.json()
    assert envelope["code"] == 422 and envelope["data"] is None
    assert "Idempotency-Key" in envelope["message"] and "different" in envelope["message"]
    assert await history(client, "r1") == [("pending", 0), ("progress", 10)]
    # the key's own event is still a replay afterwards
    again = await post_event(client, "r1", "k", b'{"status":"progress","progress":10,'
                                                b'"result":{"a":1,"b":2}}')
    assert again.status == 200 and (await again.json())["data"]["seq"] == seq


async def test_a_batch_refuses_a_reused_key_alone_within_and_across_requests(client: Any
                                                                            ) -> None:
    await register(client, "r2")
    await register(client, "r3")
    results = await batch(
        client,
        {"task_id": "r2", "status": "running", "idempotency_key": "a"},
        {"task_id": "r2", "status": "progress", "progress": 5, "idempotency_key": "a"},
        {"task_id": "r3", "status": "running", "idempotency_key": "a"},  # another task's key
        {"task_id": "r2", "status": "running", "idempotency_key": "a"})
    ok, reused, other, replay = results
    assert ok["ok"] and other["ok"]
    assert (reused["ok"], reused["code"]) == (False, 422) and "different" in reused["message"]
    assert (replay["ok"], replay["seq"]) == (True, ok["seq"])
    # across requests, and across forms: the single form's key is the batch's key
    single = await post_event(client, "r2", "b", b'{"status": "progress", "progress": 7}')
    assert single.status == 200
    results = await batch(
        client,
        {"task_id": "r2", "status": "progress", "progress": 8, "idempotency_key": "b"},
        {"task_id": "r2", "status": "progress", "progress": 7.0, "idempotency_key": "b"},
        {"task_id": "r2", "status": "completed", "idempotency_key": "a"})
    assert [(r["ok"], r.get("code")) for r in results] == [(False, 422), (True, None),
                                                           (False, 422)]
    assert results[1]["seq"] == (await single.json())["data"]["seq"]
    assert await history(client, "r2") == [("pending", 0), ("running", 0), ("progress", 7)]


async def test_keys_recorded_before_digests_were_kept_still_replay(make_client: MakeClient,
                                                                   config: Any) -> None:
    """A SQLite file whose events have no digest column (written by an earlier taskpush)
    gets the column at start; its recorded keys replay whatever the body, as before."""
    client = await make_client()
    await register(client, "old")
    resp = await post_event(client, "old", "k", b'{"status": "progress", "progress": 3}')
    assert resp.status == 200
    seq = (await resp.json())["data"]["seq"]
    await client.close()
    conn = sqlite3.connect(config.db)
    conn.execute("ALTER TABLE events DROP COLUMN idem_digest")
    conn.commit()
    conn.close()
    client = await make_client()
    resp = await post_event(client, "old", "k", b'{"status": "progress", "progress": 4}')
    assert resp.status == 200 and (await resp.json())["data"]["seq"] == seq
    resp = await post_event(client, "old", "n", b'{"status": "progress", "progress": 4}')
    assert resp.status == 200
    resp = await post_event(client, "old", "n", b'{"status": "progress", "progress": 5}')
    assert resp.status == 422
