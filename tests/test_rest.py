"""User REST endpoints (SPEC "REST"): envelope, Bearer auth, 404 for others' tasks, ETag and
long poll, listing and paging, delete, cancel; plus CORS, /healthz, /metrics and demo mode.
Real app, real SQLite file, real sockets."""

from __future__ import annotations

import asyncio
import re
import time
import warnings
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.conftest import (
    PRODUCER,
    SECRET,
    auth,
    event,
    handshake,
    make_token,
    recv_until,
    register,
    ws_connect,
)
from tests.support import STATUS, data_of, error_of, still_serving

# ---- envelope ------------------------------------------------------------------------

async def test_success_envelope_carries_the_task(client: Any) -> None:
    await register(client, "t1", 1, metadata={"k": "v"})
    await event(client, "t1", "progress", progress=40, message="half", step="s2")
    task = await data_of(await client.get(STATUS.format("t1"), headers=auth(1)))
    assert task["task_id"] == "t1" and task["user_id"] == 1
    assert task["status"] == "progress" and task["progress"] == 40
    assert task["message"] == "half" and task["step"] == "s2"
    assert task["metadata"] == {"k": "v"}
    for name in ("task_type", "result", "error", "error_type", "created_at", "updated_at",
                 "seq", "cancel_requested"):
        assert name in task


async def test_failure_envelope_for_unknown_route_and_method(client: Any) -> None:
    await error_of(await client.get("/api/nothing-here", headers=auth(1)), 404)
    resp = await client.put(STATUS.format("t1"), headers=auth(1))
    await error_of(resp, 405)
    await still_serving(client)


# ---- auth ----------------------------------------------------------------------------

def hs512_token() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyjwt warns about the short key for HS512
        return jwt.encode({"sub": "1", "exp": int(time.time()) + 3600}, SECRET,
                          algorithm="HS512")


BAD_AUTH = {
    "missing": {},
    "empty bearer": {"Authorization": "Bearer "},
    "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
    "garbage": {"Authorization": "Bearer not.a.jwt"},
    "invalid signature": {"Authorization": f"Bearer {make_token(1, secret='other-secret-' * 3)}"},
    "alg none": {"Authorization": "Bearer " + jwt.encode({"sub": "1"}, None, algorithm="none")},
    "expired": {"Authorization": f"Bearer {make_token(1, ttl=-120)}"},
    "wrong algorithm": {"Authorization": f"Bearer {hs512_token()}"},
    "sub not a user id": {"Authorization": f"Bearer {make_token('alice')}"},
    "no sub": {"Authorization": "Bearer " + jwt.encode({"exp": int(time.time()) + 60},
                                                       SECRET, algorithm="HS256")},
}


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
async def test_bad_bearer_is_401_everywhere(client: Any, case: str) -> None:
    await register(client, "t1", 1)
    headers = BAD_AUTH[case]
    for method, path in (("GET", STATUS.format("t1")), ("GET", "/api/task/tasks"),
                         ("GET", "/api/task/task/t1/history"),
                         ("POST", "/api/task/task/t1/cancel"),
                         ("DELETE", "/api/task/task/t1")):
        body = await error_of(await client.request(method, path, headers=headers), 401)
        assert "token" in body["message"]
    # nothing happened to the task
    task = await data_of(await client.get(STATUS.format("t1"), headers=auth(1)))
    assert task["status"] == "pending"
    await still_serving(client)


async def test_expired_within_leeway_is_accepted(client: Any) -> None:
    await register(client, "t1", 1)
    await data_of(await client.get(STATUS.format("t1"), headers=auth(1, ttl=-5)))


# ---- another user's task is indistinguishable from a missing one ------------------------

async def test_other_users_task_answers_exactly_like_unknown(make_client: Any,
                                                             tmp_path: Path) -> None:
    """Same task id: present but owned by user 2 (client A) vs absent (client B)."""
    a = await make_client()
    b = await make_client(db=str(tmp_path / "empty.db"))
    await register(a, "secret-task", 2)
    await event(a, "secret-task", "running")
    await register(a, "done-task", 2)
    await event(a, "done-task", "completed")
    for method, path in (("GET", STATUS.format("secret-task")),
                         ("GET", "/api/task/task/secret-task/history"),
                         ("POST", "/api/task/task/secret-task/cancel"),
                         ("DELETE", "/api/task/task/secret-task"),
                         ("DELETE", "/api/task/task/done-task"),
                         ("GET", STATUS.format("done-task"))):
        ra = await a.request(method, path, headers=auth(1))
        rb = await b.request(method, path, headers=auth(1))
        assert ra.status == rb.status == 404, (method, path)
        assert await ra.read() == await rb.read(), (method, path)
        assert "ETag" not in ra.headers
    # and user 2's tasks were left alone
    task = await data_of(await a.get(STATUS.format("secret-task"), headers=auth(2)))
    assert task["status"] == "running"
    await data_of(await a.get(STATUS.format("done-task"), headers=auth(2)))


# ---- ETag and long poll --------------------------------------------------------------

async def test_etag_and_if_none_match(client: Any) -> None:
    created = await register(client, "t1", 1)
    resp = await client.get(STATUS.format("t1"), headers=auth(1))
    await data_of(resp)
    etag = resp.headers["ETag"]
    assert etag == f'"{created["seq"]}"'
    same = await client.get(STATUS.format("t1"), headers={**auth(1), "If-None-Match": etag})
    assert same.status == 304
    assert same.headers["ETag"] == etag
    assert await same.read() == b""
    await event(client, "t1", "running")
    changed = await client.get(STATUS.format("t1"), headers={**auth(1), "If-None-Match": etag})
    task = await data_of(changed)
    assert task["status"] == "running"
    assert changed.headers["ETag"] == f'"{task["seq"]}"' != etag


@pytest.mark.parametrize("header", ['W/"{seq}"', '"0", W/"{seq}"', ' "9999" ,"{seq}" ', "*"],
                         ids=["weak", "list-weak", "list-strong", "star"])
async def test_if_none_match_uses_weak_comparison_lists_and_star(client: Any, header: str
                                                                 ) -> None:
    """RFC 9110: a proxy may weaken the ETag (W/), a client may send several, or `*`."""
    created = await register(client, "t1", 1)
    value = header.format(seq=created["seq"])
    same = await client.get(STATUS.format("t1"), headers={**auth(1), "If-None-Match": value})
    assert same.status == 304
    # and a long poll with it waits for the change instead of answering at once
    waiting = asyncio.create_task(client.get(STATUS.format("t1") + "?wait=10",
                                             headers={**auth(1), "If-None-Match": value}))
    await asyncio.sleep(0.3)  # let it reach the wait; it must not answer before a change
    assert not waiting.done()
    updated = await event(client, "t1", "running")
    resp = await asyncio.wait_for(waiting, 5)
    if header == "*":  # any current representation matches `*`: still not modified
        assert resp.status == 304
    else:
        assert (await data_of(resp))["seq"] == updated["seq"]


@pytest.mark.parametrize("header", ['W/"0"', '"0", "1x"', '"{seq}x"', "W/{seq}", ""])
async def test_if_none_match_that_does_not_match_answers_the_task(client: Any, header: str
                                                                  ) -> None:
    created = await register(client, "t1", 1)
    resp = await client.get(STATUS.format("t1"),
                            headers={**auth(1), "If-None-Match": header.format(
                                seq=created["seq"])})
    assert (await data_of(resp))["task_id"] == "t1"


async def test_long_poll_is_released_by_an_update(client: Any) -> None:
    created = await register(client, "t1", 1)
    etag = f'"{created["seq"]}"'

    async def poll() -> tuple[int, dict[str, Any], str]:
        resp = await client.get(STATUS.format("t1") + "?wait=10",
                                headers={**auth(1), "If-None-Match": etag})
        return resp.status, await resp.json(), resp.headers["ETag"]

    waiting = asyncio.create_task(poll())
    await asyncio.sleep(0.3)  # let it reach the wait; it must not answer before a change
    assert not waiting.done()
    updated = await event(client, "t1", "progress", progress=25)
    status, body, new_etag = await asyncio.wait_for(waiting, 5)
    assert status == 200
    assert body["data"]["seq"] == updated["seq"] > created["seq"]
    assert body["data"]["progress"] == 25
    assert new_etag == f'"{updated["seq"]}"'


async def test_long_poll_times_out_with_304(client: Any) -> None:
    created = await register(client, "t1", 1)
    etag = f'"{created["seq"]}"'
    resp = await client.get(STATUS.format("t1") + "?wait=1",
                            headers={**auth(1), "If-None-Match": etag})
    assert resp.status == 304
    assert resp.headers["ETag"] == etag


async def test_long_poll_does_not_wait_on_a_stale_etag_or_without_one(client: Any) -> None:
    await register(client, "t1", 1)
    task = await data_of(await asyncio.wait_for(
        client.get(STATUS.format("t1") + "?wait=30", headers={**auth(1), "If-None-Match":
                                                               '"0"'}), 5))
    assert task["task_id"] == "t1"
    await data_of(await asyncio.wait_for(
        client.get(STATUS.format("t1") + "?wait=30", headers=auth(1)), 5))


@pytest.mark.parametrize("wait", ["31", "-1", "abc", "1.5", "99999999999999999999"])
async def test_bad_wait_is_400(client: Any, wait: str) -> None:
    await register(client, "t1", 1)
    await error_of(await client.get(STATUS.format("t1") + f"?wait={wait}", headers=auth(1)),
                   400)
    await still_serving(client)


# ---- listing -------------------------------------------------------------------------

async def test_list_newest_first_own_tasks_only(client: Any) -> None:
    for name in ("a", "b", "c"):
        await register(client, name, 1)
    await register(client, "other", 2)
    await event(client, "a", "progress", progress=10)  # a newer change does not reorder
    data = await data_of(await client.get("/api/task/tasks", headers=auth(1)))
    assert [t["task_id"] for t in data["tasks"]] == ["c", "b", "a"]
    assert data["count"] == 3 and data["next_before"] is None
    assert data["tasks"][2]["progress"] == 10


async def test_list_status_filter(client: Any) -> None:
    for name in ("a", "b", "c"):
        await register(client, name, 1)
    await event(client, "b", "completed")
    await event(client, "c", "running")
    done = await data_of(await client.get("/api/task/tasks?status=completed", headers=auth(1)))
    assert [t["task_id"] for t in done["tasks"]] == ["b"]
    pending = await data_of(await client.get("/api/task/tasks?status=pending",
                                             headers=auth(1)))
    assert [t["task_id"] for t in pending["tasks"]] == ["a"]


async def test_list_limit_and_before_cursor(client: Any) -> None:
    names = [f"t{n}" for n in range(5)]
    for name in names:
        await register(client, name, 1)
    seen: list[str] = []
    url = "/api/task/tasks?limit=2"
    pages = 0
    while True:
        data = await data_of(await client.get(url, headers=auth(1)))
        pages += 1
        assert data["count"] == len(data["tasks"]) <= 2
        seen += [t["task_id"] for t in data["tasks"]]
        if data["next_before"] is None:
            break
        url = f"/api/task/tasks?limit=2&before={data['next_before']}"
    assert seen == names[::-1]
    assert pages == 3


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=abc", "limit=-3",
                                   "status=done", "status=PENDING", "before=-1",
                                   "before=x", "since=abc", "since=-1", "limit=1e3"])
async def test_list_bad_params_are_400(client: Any, query: str) -> None:
    await error_of(await client.get(f"/api/task/tasks?{query}", headers=auth(1)), 400)
    await still_serving(client)


async def test_list_since_returns_changed_tasks_ascending(client: Any) -> None:
    for name in ("a", "b", "c"):
        await register(client, name, 1)
    await register(client, "other", 2)
    mark = (await data_of(await client.get("/api/task/tasks?since=0", headers=auth(1))))["seq"]
    await event(client, "c", "progress", progress=5)
    await event(client, "a", "completed")
    await event(client, "other", "running")
    data = await data_of(await client.get(f"/api/task/tasks?since={mark}", headers=auth(1)))
    assert [t["task_id"] for t in data["tasks"]] == ["c", "a"]
    seqs = [t["seq"] for t in data["tasks"]]
    assert seqs == sorted(seqs) and seqs[0] > mark
    assert data["count"] == 2 and data["resync"] is False
    assert data["seq"] >= seqs[-1] and isinstance(data["epoch"], str) and data["epoch"]
    everything = await data_of(await client.get("/api/task/tasks?since=0", headers=auth(1)))
    assert [t["task_id"] for t in everything["tasks"]] == ["b", "c", "a"]
    future = await data_of(await client.get(f"/api/task/tasks?since={data['seq'] + 100}",
                                            headers=auth(1)))
    assert future["resync"] is True


# ---- history -------------------------------------------------------------------------

async def test_history_lists_every_change_oldest_first(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "running")
    await event(client, "t1", "progress", progress=50, step="half")
    await event(client, "t1", "completed")
    data = await data_of(await client.get("/api/task/task/t1/history", headers=auth(1)))
    assert [e["status"] for e in data["events"]] == ["pending", "running", "progress",
                                                     "completed"]
    assert data["count"] == 4 and data["events"][2]["step"] == "half"
    seqs = [e["seq"] for e in data["events"]]
    assert seqs == sorted(seqs)


# ---- delete --------------------------------------------------------------------------

async def test_delete_finished_removes_task_and_history(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "completed", result={"ok": True})
    data = await data_of(await client.delete("/api/task/task/t1", headers=auth(1)))
    assert data == {"task_id": "t1", "deleted": True}
    await error_of(await client.get(STATUS.format("t1"), headers=auth(1)), 404)
    await error_of(await client.get("/api/task/task/t1/history", headers=auth(1)), 404)
    await error_of(await client.delete("/api/task/task/t1", headers=auth(1)), 404)
    listed = await data_of(await client.get("/api/task/tasks", headers=auth(1)))
    assert listed["tasks"] == []


async def test_delete_active_is_409_and_keeps_it(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "progress", progress=30)
    await error_of(await client.delete("/api/task/task/t1", headers=auth(1)), 409)
    task = await data_of(await client.get(STATUS.format("t1"), headers=auth(1)))
    assert task["status"] == "progress" and task["progress"] == 30


async def test_delete_is_pushed_as_task_deleted(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "failed", error="x")
    ws = await ws_connect(client, 1)
    await handshake(ws)
    await data_of(await client.delete("/api/task/task/t1", headers=auth(1)))
    seen = await recv_until(ws, lambda m: m["type"] == "task_deleted")
    assert seen[-1] == {"type": "task_deleted", "task_id": "t1"}
    await ws.close()


# ---- cancel --------------------------------------------------------------------------

async def test_cancel_active_is_pushed_to_the_owner(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "progress", progress=20)
    ws = await ws_connect(client, 1)
    await handshake(ws)
    task = await data_of(await client.post("/api/task/task/t1/cancel", headers=auth(1)))
    assert task["status"] == "cancelled" and task["cancel_requested"] is True
    seen = await recv_until(ws, lambda m: m["type"] == "task_status" and m["task_id"] == "t1")
    pushed = seen[-1]
    assert pushed["status"] == "cancelled" and pushed["seq"] == task["seq"]
    stored = await data_of(await client.get(STATUS.format("t1"), headers=auth(1)))
    assert stored["status"] == "cancelled"
    await ws.close()


@pytest.mark.parametrize("final", ["completed", "failed", "cancelled"])
async def test_cancel_finished_is_409(client: Any, final: str) -> None:
    await register(client, "t1", 1)
    done = await event(client, "t1", final)
    await error_of(await client.post("/api/task/task/t1/cancel", headers=auth(1)), 409)
    task = await data_of(await client.get(STATUS.format("t1"), headers=auth(1)))
    assert task["status"] == final and task["seq"] == done["seq"]


async def test_cancel_pending_task(client: Any) -> None:
    await register(client, "t1", 1)
    task = await data_of(await client.post("/api/task/task/t1/cancel", headers=auth(1)))
    assert task["status"] == "cancelled"


# ---- CORS ----------------------------------------------------------------------------

ORIGIN = "https://app.example"


def preflight(origin: str) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"}


async def test_cors_allowed_origin(make_client: Any) -> None:
    client = await make_client(cors_origins=(ORIGIN,))
    await register(client, "t1", 1)
    resp = await client.options("/api/task/tasks", headers=preflight(ORIGIN))
    assert resp.status in (200, 204)
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "GET" in resp.headers["Access-Control-Allow-Methods"]
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
    got = await client.get(STATUS.format("t1"), headers={**auth(1), "Origin": ORIGIN})
    await data_of(got)
    assert got.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "ETag" in got.headers.get("Access-Control-Expose-Headers", "")
    failed = await client.get(STATUS.format("t1"), headers={"Origin": ORIGIN})
    await error_of(failed, 401)
    assert failed.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_cors_other_origin_gets_nothing(make_client: Any) -> None:
    client = await make_client(cors_origins=(ORIGIN,))
    other = "https://evil.example"
    resp = await client.options("/api/task/tasks", headers=preflight(other))
    assert "Access-Control-Allow-Origin" not in resp.headers
    got = await client.get("/api/task/tasks", headers={**auth(1), "Origin": other})
    await data_of(got)
    assert "Access-Control-Allow-Origin" not in got.headers


async def test_cors_default_is_none(client: Any) -> None:
    resp = await client.options("/api/task/tasks", headers=preflight(ORIGIN))
    assert "Access-Control-Allow-Origin" not in resp.headers
    got = await client.get("/api/task/tasks", headers={**auth(1), "Origin": ORIGIN})
    await data_of(got)
    assert "Access-Control-Allow-Origin" not in got.headers


# ---- operations ----------------------------------------------------------------------

async def test_healthz(client: Any) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body["database"] is True and body["status"] == "ok"


async def test_metrics_prometheus_text(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "progress", progress=1)
    await event(client, "t1", "completed")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert re.search(r"^# TYPE taskpush_events_ingested(_total)? counter$", text, re.M)
    assert re.search(r'^taskpush_events_ingested_total\{kind="change"\} 2\.0$', text, re.M)
    assert re.search(r'^taskpush_events_ingested_total\{kind="register"\} 1\.0$', text, re.M)
    assert "# TYPE taskpush_commit_seconds histogram" in text
    count = re.search(r"^taskpush_commit_seconds_count (\S+)$", text, re.M)
    assert count is not None and float(count.group(1)) >= 3


async def test_pages_are_served(client: Any) -> None:
    for path in ("/", "/docs"):
        resp = await client.get(path)
        assert resp.status == 200 and resp.content_type == "text/html", path


# ---- demo mode -----------------------------------------------------------------------

async def test_demo_endpoints_are_404_in_token_mode(client: Any) -> None:
    await error_of(await client.post("/api/demo/login", json={"user_id": 1}), 404)
    await error_of(await client.post("/api/demo/tasks", json={"kind": "success"},
                                     headers=auth(1)), 404)


@pytest.fixture
async def demo(make_client: Any) -> Any:
    return await make_client(jwt_secret=None, demo_task_seconds=0.2)


async def demo_login(client: Any, user_id: int) -> str:
    data = await data_of(await client.post("/api/demo/login", json={"user_id": user_id}))
    assert data["user_id"] == user_id and data["expires_at"].endswith("Z")
    return data["token"]


@pytest.mark.parametrize("kind, final", [("success", "completed"), ("fail", "failed")])
async def test_demo_task_runs_to_the_end(demo: Any, kind: str, final: str) -> None:
    token = await demo_login(demo, 7)
    headers = {"Authorization": f"Bearer {token}"}
    await data_of(await demo.get("/api/task/tasks", headers=headers))
    ws = await ws_connect(demo, 7, token=token)
    await handshake(ws)
    task = await data_of(await demo.post("/api/demo/tasks", json={"kind": kind},
                                         headers=headers), 201)
    assert task["user_id"] == 7 and task["status"] == "pending"
    seen = await recv_until(ws, lambda m: m["type"] == "task_status"
                            and m["task_id"] == task["task_id"]
                            and m["status"] in ("completed", "failed", "cancelled"),
                            timeout=10)
    last = seen[-1]
    assert last["status"] == final
    if final == "completed":
        assert last["progress"] == 100 and last["result"]["kind"] == "success"
        assert any(m.get("status") == "progress" for m in seen)
    else:
        assert last["error"] and last["error_type"]
    stored = await data_of(await demo.get(STATUS.format(task["task_id"]), headers=headers))
    assert stored["status"] == final and stored["seq"] == last["seq"]
    await ws.close()


async def test_demo_token_is_refused_for_another_user(demo: Any) -> None:
    token = await demo_login(demo, 7)
    ws = await ws_connect(demo, 8, token=token)
    msg = await ws.receive(timeout=5)
    assert ws.close_code == 4403, msg


async def test_demo_bad_requests(demo: Any) -> None:
    await error_of(await demo.post("/api/demo/login", json={"user_id": "bob"}), 400)
    await error_of(await demo.post("/api/demo/login", data=b"[" * 10000), 400)
    await error_of(await demo.post("/api/demo/tasks", json={"kind": "success"}), 401)
    token = await demo_login(demo, 1)
    await error_of(await demo.post("/api/demo/tasks", json={"kind": "explode"},
                                   headers={"Authorization": f"Bearer {token}"}), 400)
    # a token signed with another secret does not work in demo mode either
    await error_of(await demo.get("/api/task/tasks", headers=auth(1)), 401)
    await still_serving(demo)


async def test_producer_headers_unused_by_user_endpoints(client: Any) -> None:
    """The producer key is not a user credential (it may read a task's status: see
    tests/test_producer_status.py)."""
    await register(client, "t1", 1)
    await error_of(await client.get("/api/task/tasks", headers=PRODUCER), 401)
    await error_of(await client.get("/api/task/task/t1/history", headers=PRODUCER), 401)
