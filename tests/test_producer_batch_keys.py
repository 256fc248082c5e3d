"""The batch endpoint's two additions for the client package: a per-event
`idempotency_key` (the single form's Idempotency-Key header) and `cancel_requested` on a
refusal because the user cancelled."""

from __future__ import annotations

from typing import Any

from tests.conftest import PRODUCER, auth, register


async def batch(client: Any, *events: dict[str, Any], status: int = 200) -> Any:
    resp = await client.post("/api/task/events", headers=PRODUCER, json={"events": list(events)})
    assert resp.status == status, await resp.text()
    return (await resp.json())["data"]


async def history(client: Any, task_id: str) -> list[str]:
    resp = await client.get(f"/api/task/task/{task_id}/history", headers=auth(1))
    return [e["status"] for e in (await resp.json())["data"]["events"]]


async def test_a_batch_retried_with_the_same_keys_is_recorded_once(client: Any) -> None:
    await register(client, "k1")
    events = ({"task_id": "k1", "status": "running", "idempotency_key": "k1-run"},
              {"task_id": "k1", "status": "progress", "progress": 40, "idempotency_key": "k1-p"})
    first = await batch(client, *events)
    again = await batch(client, *events)
    assert [r["ok"] for r in first["results"]] == [True, True]
    assert [r["ok"] for r in again["results"]] == [True, True]
    assert await history(client, "k1") == ["pending", "running", "progress"]
    done = {"task_id": "k1", "status": "completed", "idempotency_key": "k1-done"}
    await batch(client, done)
    replay = await batch(client, done)  # also after the task finished: a replay, not a 409
    assert replay["results"][0]["ok"] is True
    assert await history(client, "k1") == ["pending", "running", "progress", "completed"]


async def test_a_bad_key_refuses_that_event_only(client: Any) -> None:
    await register(client, "k2")
    answer = await batch(client, {"task_id": "k2", "status": "running", "idempotency_key": 5},
                         {"task_id": "k2", "status": "running", "idempotency_key": ""},
                         {"task_id": "k2", "status": "running"})
    assert [(r["ok"], r.get("code")) for r in answer["results"]] == [(False, 400), (False, 400),
                                                                    (True, None)]


async def test_a_refusal_after_the_users_cancel_says_so(client: Any) -> None:
    await register(client, "k3")
    await register(client, "k4")
    await batch(client, {"task_id": "k3", "status": "running"},
                {"task_id": "k4", "status": "completed"})
    resp = await client.post("/api/task/task/k3/cancel", headers=auth(1))
    assert resp.status == 200
    answer = await batch(client, {"task_id": "k3", "status": "progress", "progress": 5},
                         {"task_id": "k4", "status": "progress", "progress": 5})
    cancelled, finished = answer["results"]
    assert (cancelled["code"], cancelled["cancel_requested"]) == (409, True)
    assert finished["code"] == 409 and "cancel_requested" not in finished
