"""The HTTP contract is declared once (server/core/contract.py): the published OpenAPI document
and the server's validation cannot drift apart.

- a changed limit changes the document and the server's answer at the boundary together;
- bodies generated from the published schemas (Register, Event, BatchEvent in a Batch) are
  accepted exactly when the schema allows them (and the rules it states only in words hold),
  mutated ones one bound outside are refused;
- every bound of every body, just inside and just outside, is answered as the schema says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.core import contract, validate
from server.push.messages import ProtocolError, parse_client_message
from tests import schema_gen
from tests.conftest import PRODUCER, auth
from tests.schema_gen import Schema

PROPERTY = settings(deadline=None, max_examples=80, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.filter_too_much])
BASE = {"Register": {"user_id": 1, "task_type": "t"},
        "Event": {"status": "progress"},
        "BatchEvent": {"task_id": "nobody", "status": "progress"}}
REFUSED = (400, 413)


async def published(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    return await resp.json()


def components(doc: dict[str, Any]) -> dict[str, Schema]:
    return doc["components"]["schemas"]


async def refused(client: TestClient, name: str, body: Any) -> bool:
    """Whether the server refuses `body` as a `name` body (400/413; for a BatchEvent, that
    event's result in a batch of one). Any other answer means validation let it through."""
    raw = json.dumps(body).encode()
    if name == "Register":
        resp = await client.post("/api/task/tasks", data=raw, headers=PRODUCER)
        assert resp.status in (200, 201, 409, 429, *REFUSED), await resp.text()
        return resp.status in REFUSED
    if name == "Event":
        resp = await client.post("/api/task/task/nobody/events", data=raw, headers=PRODUCER)
        assert resp.status in (404, *REFUSED), await resp.text()  # no such task: valid
        return resp.status in REFUSED
    if name == "Batch":
        resp = await client.post("/api/task/events", data=raw, headers=PRODUCER)
        assert resp.status in (200, *REFUSED), await resp.text()
        return resp.status in REFUSED
    assert name == "BatchEvent"
    resp = await client.post("/api/task/events", data=json.dumps({"events": [body]}),
                             headers=PRODUCER)
    assert resp.status == 200, await resp.text()
    (result,) = (await resp.json())["data"]["results"]
    assert result["ok"] or result["code"] in (404, *REFUSED), result
    return not result["ok"] and result["code"] in REFUSED


def expected_refusal(name: str, body: Any, schemas: dict[str, Schema]) -> bool:
    return (not schema_gen.valid({"$ref": name}, schemas, body)
            or schema_gen.server_only_refusal(name, body))


def boundary_cases(schemas: dict[str, Schema]) -> Iterator[tuple[str, str, Any]]:
    for name, base in BASE.items():
        assert schema_gen.valid({"$ref": name}, schemas, base)
        for what, body in schema_gen.boundary_bodies(name, base, schemas):
            yield name, what, body
    most = schemas["Batch"]["properties"]["events"]["maxItems"]
    item = BASE["BatchEvent"]
    yield "Batch", f"{most} events", {"events": [item] * most}
    yield "Batch", f"{most + 1} events", {"events": [item] * (most + 1)}
    yield "Batch", "an unknown field", {"events": [], "zz": 1}
    yield "Batch", "events not a list", {"events": {"a": 1}}


async def check_boundaries(client: TestClient) -> int:
    """Every boundary case answered as the published schema says; returns the count."""
    schemas = components(await published(client))
    wrong = []
    count = 0
    for name, what, body in boundary_cases(schemas):
        count += 1
        expected = expected_refusal(name, body, schemas)
        if await refused(client, name, body) != expected:
            wrong.append(f"{what}: schema says {'refuse' if expected else 'accept'}")
    assert not wrong, wrong
    return count


async def test_every_bound_inside_and_outside_is_answered_as_the_schema_says(
        client: TestClient) -> None:
    assert await check_boundaries(client) > 60  # every property of every body was walked


# ---- one limit changed: document and validation follow together -------------------------


@pytest.fixture
def narrowed() -> Iterator[contract.Limits]:
    saved = contract.LIMITS
    contract.declare(contract.with_limits(
        task_id=12, task_type=20, idempotency_key=9, text={**saved.text, "message": 10},
        batch_events=3, list_limit=7, list_default=4, history_limit=5, max_wait=2))
    try:
        yield contract.LIMITS
    finally:
        contract.declare(saved)


def _param(doc: dict[str, Any], path: str, name: str) -> Schema:
    (param,) = [p for p in doc["paths"][path]["get"]["parameters"] if p.get("name") == name]
    return param["schema"]


async def test_changing_a_limit_changes_document_and_validation(
        narrowed: contract.Limits, client: TestClient) -> None:
    doc = await published(client)
    schemas = components(doc)
    assert schemas["Register"]["properties"]["task_type"]["maxLength"] == 20
    assert schemas["BatchEvent"]["properties"]["task_id"]["maxLength"] == 12
    assert schemas["Event"]["properties"]["message"]["maxLength"] == 10
    assert schemas["BatchEvent"]["properties"]["idempotency_key"]["maxLength"] == 9
    assert schemas["Batch"]["properties"]["events"]["maxItems"] == 3
    assert _param(doc, "/api/task/tasks", "limit") == {"type": "integer", "minimum": 1,
                                                       "maximum": 7, "default": 4}
    assert _param(doc, "/api/task/task/{task_id}/history", "limit")["maximum"] == 5
    assert _param(doc, "/api/task/task/{task_id}/status", "wait")["maximum"] == 2

    # the server's answers at the same boundaries, with today's messages
    resp = await client.post("/api/task/tasks", headers=PRODUCER,
                             json={"user_id": 1, "task_type": "x" * 21})
    assert resp.status == 400
    assert (await resp.json())["message"] == \
        "task_type must be printable and at most 20 characters"
    resp = await client.post("/api/task/tasks", headers=PRODUCER,
                             json={"task_id": "t" * 12, "user_id": 1, "task_type": "x" * 20})
    assert resp.status == 201, await resp.text()
    resp = await client.post("/api/task/task/t/events", headers=PRODUCER,
                             json={"status": "running", "message": "m" * 11})
    assert resp.status == 413
    resp = await client.post("/api/task/events", headers=PRODUCER,
                             json={"events": [BASE["BatchEvent"]] * 4})
    assert (resp.status, (await resp.json())["message"]) == \
        (413, "at most 3 events per request, got 4")
    user = auth(1)
    for path, param, good, bad, message in [
            ("/api/task/tasks", "limit", 7, 8, "limit must be an integer from 1 to 7"),
            (f"/api/task/task/{'t' * 12}/history", "limit", 5, 6,
             "limit must be an integer from 1 to 5"),
            (f"/api/task/task/{'t' * 12}/status", "wait", 2, 3,
             "wait must be an integer from 0 to 2")]:
        resp = await client.get(path, params={param: str(good)}, headers=user)
        assert resp.status == 200, (path, await resp.text())
        resp = await client.get(path, params={param: str(bad)}, headers=user)
        assert (resp.status, (await resp.json())["message"]) == (400, message), path

    # the WebSocket's subscribe follows the same task-id rule
    assert parse_client_message(json.dumps(
        {"type": "subscribe", "task_id": "t" * 12})).task_id == "t" * 12
    with pytest.raises(ProtocolError):
        parse_client_message(json.dumps({"type": "subscribe", "task_id": "t" * 13}))

    # and every other bound of every body, walked from the narrowed document
    await check_boundaries(client)


def test_task_id_rule_is_one_rule() -> None:
    """HTTP and WebSocket refuse the same task ids ('.' and '..' included)."""
    for value in [".", "..", "a\nb", "x" * (contract.LIMITS.task_id + 1)]:
        assert contract.task_id_problem(value) is not None
        with pytest.raises(ProtocolError):
            parse_client_message(json.dumps({"type": "subscribe", "task_id": value}))


# ---- bodies generated from the published schema -------------------------------------------

_DOC: dict[str, Any] = {}


def _schemas() -> dict[str, Schema]:
    """The document the server publishes (the default app's; read once, at collection)."""
    if not _DOC:
        from server.config import Config
        from server.web.openapi import openapi_document
        _DOC.update(json.loads(json.dumps(openapi_document(Config()))))
    return components(_DOC)


def bodies(name: str) -> st.SearchStrategy[Any]:
    """Bodies the schema allows, and the same one bound (or type, or field) outside."""
    schemas = _schemas()
    schema = schemas[name]
    good = schema_gen.from_schema({"$ref": name}, schemas)
    changes: list[tuple[str, Any]] = [
        (prop, value) for prop, sub in schema["properties"].items()
        for value in schema_gen.outside(sub, schemas)]
    changes += [("zz_unknown", 1)] + [(prop, ...) for prop in schema.get("required", ())]

    def mutate(body: dict[str, Any], change: tuple[str, Any]) -> dict[str, Any]:
        prop, value = change
        if value is ...:
            return {k: v for k, v in body.items() if k != prop}
        return {**body, prop: value}

    return st.one_of(good, st.builds(mutate, good, st.sampled_from(changes)))


async def _check(client: TestClient, name: str, body: Any) -> None:
    served = components(await published(client)) if not _DOC else _schemas()
    expected = expected_refusal(name, body, served)
    assert await refused(client, name, body) == expected, (
        f"schema says {'refuse' if expected else 'accept'}", body)


async def test_published_document_is_the_one_generated_from(client: TestClient) -> None:
    assert components(await published(client)) == _schemas()


@PROPERTY
@given(body=bodies("Register"))
async def test_register_accepted_exactly_as_the_schema_allows(client: TestClient,
                                                             body: Any) -> None:
    await _check(client, "Register", body)


@PROPERTY
@given(body=bodies("Event"))
async def test_event_accepted_exactly_as_the_schema_allows(client: TestClient,
                                                          body: Any) -> None:
    await _check(client, "Event", body)


@PROPERTY
@given(body=bodies("BatchEvent"))
async def test_batch_event_accepted_exactly_as_the_schema_allows(client: TestClient,
                                                                body: Any) -> None:
    await _check(client, "BatchEvent", body)


@PROPERTY
@given(events=st.lists(bodies("BatchEvent"), max_size=4))
async def test_batch_results_follow_the_schema_event_by_event(client: TestClient,
                                                              events: list[Any]) -> None:
    schemas = _schemas()
    resp = await client.post("/api/task/events", data=json.dumps({"events": events}),
                             headers=PRODUCER)
    assert resp.status == 200
    results = (await resp.json())["data"]["results"]
    for body, result in zip(events, results, strict=True):
        refused_here = not result["ok"] and result["code"] in REFUSED
        assert refused_here == expected_refusal("BatchEvent", body, schemas), (body, result)


async def test_big_integers_stay_exact_through_validation_and_storage(client: TestClient
                                                                      ) -> None:
    """JSON integers beyond 64 bits are valid JSON: stored and answered digit for digit (not
    as floats), on the fast path and on the field-by-field path alike."""
    big = [2**64 + 1, -(2**63) - 1, 10**30 + 7]
    resp = await client.post("/api/task/tasks", headers=PRODUCER, data=json.dumps(
        {"task_id": "big", "user_id": 1, "task_type": "t", "metadata": big}))
    assert resp.status == 201
    resp = await client.post("/api/task/task/big/events", headers=PRODUCER,
                             data=json.dumps({"status": "completed", "result": {"n": big}}))
    assert resp.status == 200
    resp = await client.get("/api/task/task/big/status", headers=auth(1))
    task = json.loads(await resp.text())["data"]
    assert (task["metadata"], task["result"]) == (big, {"n": big})
    assert validate.event_body("t", validate.json_object(
        json.dumps({"status": "running", "result": big}).encode()), 65536).result == big


async def test_a_user_id_with_a_trailing_newline_is_refused_like_before(client: TestClient
                                                                      ) -> None:
    """msgspec matches the schema's `$` the Python way ("7\\n" passes); the fast path must
    refuse what the field checks refuse, and what the published (ECMA) pattern refuses."""
    resp = await client.post("/api/task/tasks", headers=PRODUCER,
                             data=json.dumps({"user_id": "7\n", "task_type": "job"}))
    assert resp.status == 400
    assert (await resp.json())["data"] is None
