"""Producer REST endpoints (SPEC "Producer endpoints"): API key, register (idempotent),
single events with strict validation, terminal finality, batches, the active-task limit,
and malformed bodies that must be refused with an envelope, never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
from typing import Any

import pytest

from server.config import Config
from tests.conftest import API_KEY, PRODUCER, auth, event, register
from tests.support import STATUS, data_of, error_of, still_serving

REGISTER = "/api/task/tasks"
EVENTS = "/api/task/task/{}/events"
BATCH = "/api/task/events"
JSON_HEADERS = {**PRODUCER, "Content-Type": "application/json"}


async def status_of(client: Any, task_id: str, user_id: int = 1) -> dict[str, Any]:
    return await data_of(await client.get(STATUS.format(task_id), headers=auth(user_id)))


async def post_raw(client: Any, path: str, body: bytes) -> Any:
    return await client.post(path, data=body, headers=JSON_HEADERS)


# ---- API key -------------------------------------------------------------------------

ENDPOINTS = [
    (REGISTER, {"task_id": "t9", "user_id": 1, "task_type": "x"}),
    (EVENTS.format("t1"), {"status": "running"}),
    (BATCH, {"events": [{"task_id": "t1", "status": "running"}]}),
]


async def test_producer_api_disabled_without_api_key(make_client: Any) -> None:
    client = await make_client(api_key=None)
    for path, body in ENDPOINTS:
        for headers in (PRODUCER, {}):
            body_ = await error_of(await client.post(path, json=body, headers=headers), 403)
            assert "api-key" in body_["message"].lower()
    listed = await data_of(await client.get("/api/task/tasks", headers=auth(1)))
    assert listed["tasks"] == []


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""},
                                     {"X-API-Key": API_KEY + "x"}, {"X-API-Key": API_KEY[:-1]},
                                     {"Authorization": f"Bearer {API_KEY}"},
                                     {"X-API-Key": "ключ"}])
async def test_wrong_api_key_is_401(client: Any, headers: dict[str, str]) -> None:
    await register(client, "t1", 1)
    for path, body in ENDPOINTS:
        await error_of(await client.post(path, json=body, headers=headers), 401)
    task = await status_of(client, "t1")
    assert task["status"] == "pending"
    await error_of(await client.get(STATUS.format("t9"), headers=auth(1)), 404)
    await still_serving(client)


async def test_user_token_is_not_a_producer_credential(client: Any) -> None:
    await error_of(await client.post(REGISTER, json=ENDPOINTS[0][1],
                                     headers=auth(1, admin=True)), 401)


# ---- register ------------------------------------------------------------------------

async def test_register_201_then_idempotent_200(client: Any) -> None:
    body = {"task_id": "t1", "user_id": 1, "task_type": "report", "metadata": {"a": [1]}}
    first = await client.post(REGISTER, json=body, headers=PRODUCER)
    created = await data_of(first, 201)
    assert created["status"] == "pending" and created["progress"] == 0
    assert created["metadata"] == {"a": [1]} and created["cancel_requested"] is False
    again = await data_of(await client.post(REGISTER, json=body, headers=PRODUCER), 200)
    assert again == created
    # user_id as a string of digits is the same registration
    same = await data_of(await client.post(REGISTER, json={**body, "user_id": "1"},
                                           headers=PRODUCER), 200)
    assert same["seq"] == created["seq"]
    listed = await data_of(await client.get("/api/task/tasks", headers=auth(1)))
    assert listed["count"] == 1


@pytest.mark.parametrize("change", [{"user_id": 2}, {"task_type": "other"},
                                    {"metadata": {"a": [2]}}, {"metadata": None}])
async def test_register_different_body_is_409(client: Any, change: dict[str, Any]) -> None:
    body = {"task_id": "t1", "user_id": 1, "task_type": "report", "metadata": {"a": [1]}}
    created = await data_of(await client.post(REGISTER, json=body, headers=PRODUCER), 201)
    await error_of(await client.post(REGISTER, json={**body, **change}, headers=PRODUCER), 409)
    assert await status_of(client, "t1") == created
    await error_of(await client.get(STATUS.format("t1"), headers=auth(2)), 404)


async def test_register_after_progress_is_still_idempotent(client: Any) -> None:
    await register(client, "t1", 1)
    moved = await event(client, "t1", "progress", progress=50)
    again = await data_of(await client.post(
        REGISTER, json={"task_id": "t1", "user_id": 1, "task_type": "interview_generation"},
        headers=PRODUCER), 200)
    assert again["status"] == "progress" and again["seq"] == moved["seq"]


async def test_register_default_task_id(client: Any) -> None:
    first = await data_of(await client.post(REGISTER, json={"user_id": 1, "task_type": "export"},
                                            headers=PRODUCER), 201)
    second = await data_of(await client.post(REGISTER, json={"user_id": 1,
                                                             "task_type": "export"},
                                             headers=PRODUCER), 201)
    for task in (first, second):
        assert re.fullmatch(r"export_\d+", task["task_id"]), task["task_id"]
    assert first["task_id"] != second["task_id"]
    assert (await status_of(client, first["task_id"]))["task_type"] == "export"


@pytest.mark.parametrize("body, status", [
    ({"user_id": 1}, 400),
    ({"task_type": "x"}, 400),
    ({"user_id": -1, "task_type": "x"}, 400),
    ({"user_id": True, "task_type": "x"}, 400),
    ({"user_id": 1, "task_type": "x", "extra": 1}, 400),
    ({"user_id": 1, "task_type": "x" * 101}, 400),
    ({"user_id": 1, "task_type": "x", "task_id": "y" * 201}, 400),
    ({"user_id": 1, "task_type": "x", "task_id": 5}, 400),
])
async def test_register_validation(client: Any, body: dict[str, Any], status: int) -> None:
    await error_of(await client.post(REGISTER, json=body, headers=PRODUCER), status)
    listed = await data_of(await client.get("/api/task/tasks", headers=auth(1)))
    assert listed["tasks"] == []
    await still_serving(client)


async def test_register_metadata_over_limit_is_413(make_client: Any) -> None:
    client = await make_client(max_json_bytes=1000)
    body = {"task_id": "t1", "user_id": 1, "task_type": "x", "metadata": {"k": "v" * 1000}}
    await error_of(await client.post(REGISTER, json=body, headers=PRODUCER), 413)
    await error_of(await client.get(STATUS.format("t1"), headers=auth(1)), 404)
    await still_serving(client)


async def test_max_active_tasks_is_429(make_client: Any) -> None:
    client = await make_client(max_active_tasks=2)
    await register(client, "a", 1)
    await register(client, "b", 1)
    body = await error_of(await client.post(
        REGISTER, json={"task_id": "c", "user_id": 1, "task_type": "x"}, headers=PRODUCER), 429)
    assert "active" in body["message"]
    await error_of(await client.get(STATUS.format("c"), headers=auth(1)), 404)
    await register(client, "other", 2)  # another user is not limited by user 1's tasks
    # an idempotent repeat of an existing registration is not a new task
    await register(client, "a", 1)
    await event(client, "a", "completed")
    await register(client, "c", 1)


# ---- single events -------------------------------------------------------------------

@pytest.mark.parametrize("status", ["pending", "running", "progress", "completed", "failed",
                                    "cancelled"])
async def test_every_status_is_accepted(client: Any, status: str) -> None:
    created = await register(client, "t1", 1)
    task = await event(client, "t1", status, message=f"now {status}")
    assert task["status"] == status and task["seq"] > created["seq"]
    assert task["message"] == f"now {status}"
    stored = await status_of(client, "t1")
    assert stored == task


async def test_event_fields_are_stored(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "progress", progress=33.5, message="m", step="parse")
    task = await event(client, "t1", "completed", result={"rows": [1, 2]})
    assert task["progress"] == 100 and task["result"] == {"rows": [1, 2]}
    assert task["message"] == "m" and task["step"] == "parse"
    await register(client, "t2", 1)
    failed = await event(client, "t2", "failed", error="boom", error_type="ValueError")
    assert (failed["error"], failed["error_type"]) == ("boom", "ValueError")


async def test_event_is_committed_before_the_answer(client: Any, config: Config) -> None:
    await register(client, "t1", 1)
    task = await event(client, "t1", "progress", progress=70, message="seventy")
    with sqlite3.connect(config.db) as conn:
        row = conn.execute("SELECT status, progress, message, seq FROM tasks"
                           " WHERE task_id = 't1'").fetchone()
        (events,) = conn.execute("SELECT count(*) FROM events WHERE task_id = 't1'").fetchone()
    assert row == ("progress", 70, "seventy", task["seq"])
    assert events == 2


async def test_event_for_unknown_task_is_404(client: Any) -> None:
    await error_of(await client.post(EVENTS.format("nope"), json={"status": "running"},
                                     headers=PRODUCER), 404)
    await error_of(await client.post(EVENTS.format("x" * 201), json={"status": "running"},
                                     headers=PRODUCER), 400)


BAD_PROGRESS = {
    "bool": b'{"status":"progress","progress":true}',
    "string": b'{"status":"progress","progress":"50"}',
    "negative": b'{"status":"progress","progress":-1}',
    "over 100": b'{"status":"progress","progress":101}',
    "NaN": b'{"status":"progress","progress":NaN}',
    "Infinity": b'{"status":"progress","progress":Infinity}',
    "1e309": b'{"status":"progress","progress":1e309}',
    "list": b'{"status":"progress","progress":[50]}',
}


@pytest.mark.parametrize("case", sorted(BAD_PROGRESS))
async def test_progress_validation(client: Any, case: str) -> None:
    await register(client, "t1", 1)
    before = await event(client, "t1", "progress", progress=10)
    await error_of(await post_raw(client, EVENTS.format("t1"), BAD_PROGRESS[case]), 400)
    assert await status_of(client, "t1") == before
    await still_serving(client)


@pytest.mark.parametrize("name, limit", [("message", 2000), ("step", 500), ("error", 4000),
                                         ("error_type", 100)])
async def test_string_length_caps(client: Any, name: str, limit: int) -> None:
    await register(client, "t1", 1)
    resp = await client.post(EVENTS.format("t1"), headers=PRODUCER,
                             json={"status": "progress", name: "x" * (limit + 1)})
    assert resp.status in (400, 413)
    await error_of(resp, resp.status)
    assert (await status_of(client, "t1"))["status"] == "pending"
    at_limit = await event(client, "t1", "progress", **{name: "é" * limit})
    assert at_limit[name] == "é" * limit
    await still_serving(client)


@pytest.mark.parametrize("body", [
    {"status": "progress", "percent": 5},
    {"status": "progress", "task_id": "t1"},
    {"status": "progress", "user_id": 2},
    {"status": "finished"},
    {"progress": 5},
    {"status": "progress", "message": 5},
    {"status": "failed", "error": {"x": 1}},
])
async def test_invalid_event_fields_are_400(client: Any, body: dict[str, Any]) -> None:
    await register(client, "t1", 1)
    await error_of(await client.post(EVENTS.format("t1"), json=body, headers=PRODUCER), 400)
    task = await status_of(client, "t1")
    assert task["status"] == "pending" and task["user_id"] == 1
    await still_serving(client)


async def test_result_over_max_json_bytes_is_413(make_client: Any) -> None:
    client = await make_client(max_json_bytes=1000)
    await register(client, "t1", 1)
    body = {"status": "completed", "result": {"blob": "x" * 1000}}
    await error_of(await client.post(EVENTS.format("t1"), json=body, headers=PRODUCER), 413)
    assert (await status_of(client, "t1"))["status"] == "pending"
    done = await event(client, "t1", "completed", result={"blob": "x" * 900})
    assert done["result"] == {"blob": "x" * 900}
    await still_serving(client)


async def test_body_over_max_body_bytes_is_413_envelope(make_client: Any) -> None:
    client = await make_client(max_body_bytes=4096)
    await register(client, "t1", 1)
    body = json.dumps({"status": "progress", "message": "x" * 5000}).encode()
    for path in (EVENTS.format("t1"), REGISTER, BATCH):
        await error_of(await post_raw(client, path, body), 413)
    assert (await status_of(client, "t1"))["status"] == "pending"
    await still_serving(client)


class _Received(asyncio.Protocol):
    """Every byte a connection received, and how it ended (None: closed; else the error)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future())

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def test_a_body_trickled_a_byte_at_a_time_is_cut_off_with_408(make_client: Any
                                                                    ) -> None:
    """A producer with a valid key that sends its body a byte at a time does not hold the
    connection for as long as it likes: --body-timeout after the body began, 408 with the
    envelope, and the connection is closed (a raw socket: the client library would not
    trickle)."""
    client = await make_client(body_timeout=0.5)
    await register(client, "t1", 1)
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_connection(
        _Received, client.server.host, client.server.port)
    transport.write(f"POST {EVENTS.format('t1')} HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                    f"{API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000"
                    "\r\n\r\n{".encode())

    async def trickle() -> None:
        for _ in range(300):  # far longer than the timeout, if nothing stopped it
            await asyncio.sleep(0.1)
            if transport.is_closing():
                return
            transport.write(b" ")

    trickling = asyncio.create_task(trickle())
    try:
        # The server answers, then closes. Bytes we trickled after it stopped reading may
        # make its close a reset: that ends the connection too, but only once the whole
        # answer has arrived (every byte received before the reset is kept here, where a
        # StreamReader would raise instead of returning what it had buffered).
        ended_by = await asyncio.wait_for(peer.lost, 10)
    finally:
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickling
        transport.close()
    assert ended_by is None or isinstance(ended_by, ConnectionResetError), ended_by
    answer = bytes(peer.data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None and len(body) == int(length[1]), answer[:400]
    envelope = json.loads(body)
    assert envelope["code"] == 408 and envelope["data"] is None
    assert "0.5 seconds" in envelope["message"]
    assert (await status_of(client, "t1"))["status"] == "pending"
    await still_serving(client)


MALFORMED = {
    "empty": b"",
    "not json": b"status=running",
    "truncated": b'{"status": "run',
    "array": b'[{"status": "running"}]',
    "number": b"42",
    "string": b'"running"',
    "null": b"null",
    "invalid utf-8": b'{"status": "running", "message": "\xff\xfe\xfd"}',
    "utf-16": '{"status": "running"}'.encode("utf-16"),
    "deep array": b"[" * 100_000,
    "deep object": b'{"a":' * 100_000,
    "nested result": b'{"status":"completed","result":' + b"[" * 100_000 + b"]" * 100_000
                     + b"}",
    "result beyond a double": b'{"status":"completed","result":{"x":[1, 1e400]}}',
}


async def test_numbers_beyond_a_double_are_refused_not_stored_as_null(client: Any) -> None:
    """1e400 is valid JSON syntax, but no double holds it: read as infinity it would be
    written as null. Refused with 400 like NaN, in result, metadata and a batch."""
    await register(client, "t1", 1)
    resp = await post_raw(client, EVENTS.format("t1"),
                          b'{"status": "completed", "result": {"score": 1e400}}')
    assert "JSON" in (await error_of(resp, 400))["message"]
    resp = await post_raw(client, REGISTER,
                          b'{"task_id": "t2", "user_id": 1, "task_type": "x",'
                          b' "metadata": {"n": -1E309}}')
    await error_of(resp, 400)
    resp = await post_raw(client, BATCH,
                          b'{"events": [{"task_id": "t1", "status": "progress",'
                          b' "progress": 1e400}]}')
    await error_of(resp, 400)
    assert (await status_of(client, "t1"))["status"] == "pending"
    await error_of(await client.get(STATUS.format("t2"), headers=auth(1)), 404)


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_bodies_are_400_never_500(client: Any, case: str) -> None:
    await register(client, "t1", 1)
    for path in (EVENTS.format("t1"), REGISTER, BATCH):
        await error_of(await post_raw(client, path, MALFORMED[case]), 400)
    assert (await status_of(client, "t1"))["status"] == "pending"
    await still_serving(client)


# ---- terminal finality ---------------------------------------------------------------

@pytest.mark.parametrize("final", ["completed", "failed", "cancelled"])
@pytest.mark.parametrize("later", ["progress", "running", "completed", "pending"])
async def test_terminal_is_final(client: Any, final: str, later: str) -> None:
    await register(client, "t1", 1)
    done = await event(client, "t1", final, result={"v": 1}, error="e" if final == "failed"
                       else None)
    body = await error_of(await client.post(EVENTS.format("t1"), headers=PRODUCER,
                                            json={"status": later, "progress": 5}), 409)
    assert "cancel_requested" not in body
    assert await status_of(client, "t1") == done
    history = await data_of(await client.get("/api/task/task/t1/history", headers=auth(1)))
    assert history["count"] == 2


async def test_producer_sees_cancel_requested_after_user_cancel(client: Any) -> None:
    await register(client, "t1", 1)
    await event(client, "t1", "progress", progress=10)
    cancelled = await data_of(await client.post("/api/task/task/t1/cancel", headers=auth(1)))
    body = await error_of(await client.post(EVENTS.format("t1"), headers=PRODUCER,
                                            json={"status": "progress", "progress": 20}), 409)
    assert body["cancel_requested"] is True
    assert await status_of(client, "t1") == cancelled


# ---- batch ---------------------------------------------------------------------------

async def test_batch_mixed_results_in_request_order(client: Any) -> None:
    for name in ("a", "b", "c", "done"):
        await register(client, name, 1)
    await event(client, "done", "completed")
    events = [
        {"task_id": "a", "status": "progress", "progress": 40, "message": "forty"},
        {"task_id": "b", "status": "bogus"},
        {"task_id": "missing", "status": "running"},
        {"task_id": "done", "status": "progress"},
        "not an object",
        {"status": "running"},
        {"task_id": "c", "status": "completed", "result": [1]},
        {"task_id": "c", "status": "progress"},
        {"task_id": "b", "status": "running", "progress": 101},
        {"task_id": "b", "status": "running", "extra": True},
        {"task_id": "b", "status": "running", "message": "x" * 2001},
        {"task_id": "b", "status": "failed", "error": "bad", "error_type": "E"},
    ]
    resp = await client.post(BATCH, json={"events": events}, headers=PRODUCER)
    results = (await data_of(resp))["results"]
    assert len(results) == len(events)
    expected = [("a", True, None), ("b", False, 400), ("missing", False, 404),
                ("done", False, 409), (None, False, 400), (None, False, 400),
                ("c", True, None), ("c", False, 409), ("b", False, 400),
                ("b", False, 400), ("b", False, 413), ("b", True, None)]
    for result, (task_id, ok, code) in zip(results, expected, strict=True):
        assert result["task_id"] == task_id, result
        assert result["ok"] is ok, result
        if ok:
            assert isinstance(result["seq"], int) and "code" not in result
        else:
            assert result["code"] == code and result["message"], result
            assert "seq" not in result
    applied = [r["seq"] for r in results if r["ok"]]
    assert applied == sorted(applied)
    # every applied event is visible as soon as the answer is out
    a = await status_of(client, "a")
    assert (a["status"], a["progress"], a["message"], a["seq"]) == ("progress", 40, "forty",
                                                                    results[0]["seq"])
    c = await status_of(client, "c")
    assert (c["status"], c["result"], c["seq"]) == ("completed", [1], results[6]["seq"])
    b = await status_of(client, "b")
    assert (b["status"], b["error"], b["seq"]) == ("failed", "bad", results[11]["seq"])
    assert (await status_of(client, "done"))["status"] == "completed"
    await still_serving(client)


async def test_batch_of_many_events_all_committed(client: Any, config: Config) -> None:
    names = [f"t{n}" for n in range(50)]
    for name in names:
        await register(client, name, 1)
    events = [{"task_id": n, "status": "progress", "progress": p}
              for p in (10, 20) for n in names]
    results = (await data_of(await client.post(BATCH, json={"events": events},
                                               headers=PRODUCER)))["results"]
    assert all(r["ok"] for r in results) and len(results) == 100
    with sqlite3.connect(config.db) as conn:
        rows = conn.execute("SELECT progress, seq FROM tasks").fetchall()
    assert {row[0] for row in rows} == {20}
    assert max(r["seq"] for r in results) == max(row[1] for row in rows)


async def test_batch_empty_and_too_many(client: Any) -> None:
    empty = await data_of(await client.post(BATCH, json={"events": []}, headers=PRODUCER))
    assert empty == {"results": []}
    await register(client, "t1", 1)
    too_many = {"events": [{"task_id": "t1", "status": "progress"}] * 1001}
    await error_of(await client.post(BATCH, json=too_many, headers=PRODUCER), 413)
    history = await data_of(await client.get("/api/task/task/t1/history", headers=auth(1)))
    assert history["count"] == 1
    await error_of(await client.post(BATCH, json={"events": {"t1": "x"}}, headers=PRODUCER),
                   400)
    await error_of(await client.post(BATCH, json={"evts": []}, headers=PRODUCER), 400)
    await still_serving(client)


async def test_batch_reports_cancel_like_single_form(client: Any) -> None:
    await register(client, "t1", 1)
    await data_of(await client.post("/api/task/task/t1/cancel", headers=auth(1)))
    results = (await data_of(await client.post(
        BATCH, json={"events": [{"task_id": "t1", "status": "progress"}]},
        headers=PRODUCER)))["results"]
    assert results[0]["ok"] is False and results[0]["code"] == 409


async def test_lone_surrogate_is_refused_alone_and_others_are_applied(client: Any) -> None:
    await register(client, "good", 1)
    await register(client, "bad", 1)
    body = ('{"events": [{"task_id": "good", "status": "running"},'
            ' {"task_id": "bad", "status": "running", "message": "\\ud800"}]}')
    resp = await client.post("/api/task/events", headers={**PRODUCER,
                             "Content-Type": "application/json"}, data=body)
    assert resp.status == 400  # the body itself is not storable text
    single = await client.post("/api/task/task/bad/events",
                               headers={**PRODUCER, "Content-Type": "application/json"},
                               data='{"status": "running", "message": "\\udfff"}')
    assert single.status == 400
    ok = await client.post("/api/task/events", headers=PRODUCER,
                           json={"events": [{"task_id": "good", "status": "running"}]})
    assert ok.status == 200 and (await ok.json())["data"]["results"][0]["ok"]
    assert (await client.get("/healthz")).status == 200


# ---- Idempotency-Key -----------------------------------------------------------------

async def test_idempotency_key_makes_a_retry_change_nothing(client: Any) -> None:
    await register(client, "t1", 1)
    headers = {**PRODUCER, "Idempotency-Key": "evt-1"}
    first = await data_of(await client.post(EVENTS.format("t1"), headers=headers,
                                            json={"status": "progress", "progress": 10}))
    retry = await data_of(await client.post(EVENTS.format("t1"), headers=headers,
                                            json={"status": "progress", "progress": 10}))
    assert retry["seq"] == first["seq"] and retry["progress"] == 10
    final_headers = {**PRODUCER, "Idempotency-Key": "evt-2"}
    done = await data_of(await client.post(EVENTS.format("t1"), headers=final_headers,
                                           json={"status": "completed"}))
    # the answer to the final event was lost: its retry is not refused as "already final"
    again = await data_of(await client.post(EVENTS.format("t1"), headers=final_headers,
                                            json={"status": "completed"}))
    assert again["seq"] == done["seq"] and again["status"] == "completed"
    history = await data_of(await client.get("/api/task/task/t1/history", headers=auth(1)))
    assert [e["status"] for e in history["events"]] == ["pending", "progress", "completed"]
    # a new key is a new event, refused on a finished task
    await error_of(await client.post(EVENTS.format("t1"), json={"status": "progress"},
                                     headers={**PRODUCER, "Idempotency-Key": "evt-3"}), 409)


@pytest.mark.parametrize("key", ["", "x" * 201, "clé"])
async def test_bad_idempotency_key_is_400(client: Any, key: str) -> None:
    await register(client, "t1", 1)
    resp = await client.post(EVENTS.format("t1"), json={"status": "running"},
                             headers={**PRODUCER, "Idempotency-Key": key})
    await error_of(resp, 400)
    assert (await status_of(client, "t1"))["status"] == "pending"
    await still_serving(client)
