"""Hostile input, generated: whatever a client or producer sends, the server answers it
properly and keeps going.

- WebSocket: arbitrary JSON, wrong types, huge numbers, deep nesting, unicode edge cases
  and binary frames, as the whole message and as the value of every field of ping,
  subscribe, unsubscribe and refresh -> `error` answers, the socket stays open (ping ->
  pong after every example).
- REST: arbitrary bodies and field values for register, one event, a batch, the demo
  login and demo tasks, and weird (URL-encoded) task ids on status/history/cancel/delete
  -> a success or a 4xx envelope `{"code","message","data": null}`, never a 500.
- After each test function, another user's socket still gets its own update.

One app per test function; Hypothesis drives many examples against it (derandomized, so
runs are reproducible; no example database is written).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType, web
from aiohttp.test_utils import TestClient
from hypothesis import (
    HealthCheck,
    currently_in_test_context,
    event,
    example,
    given,
    settings,
)
from hypothesis import strategies as st
from yarl import URL

from server.app import create_app
from server.config import Config
from tests.conftest import PRODUCER, MakeClient, auth, handshake, make_token, ws_connect
from tests.engines import Engine

# Hypothesis imports its patch writer (and with it `black` -> mypy_extensions, which warns)
# only when a test fails; under warnings-as-errors that turns a failure into an INTERNALERROR.
# Import it now with that warning silenced, so a failure is reported as a failure.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

settings.register_profile(
    "taskpush-hostile",
    deadline=None,
    max_examples=60,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
HOSTILE = settings.get_profile("taskpush-hostile")
MANY = settings(HOSTILE, max_examples=100)

ATTACKER = 1
BYSTANDER = 77
VICTIMS = [f"victim{n}" for n in range(12)]
ARENA_CONFIG: dict[str, Any] = {
    # the rate limiter is tested elsewhere; here every message must reach the parser
    "rate_limit": 1e6, "rate_burst": 1_000_000, "flood_strikes": 1_000_000,
    # big enough that deep nesting reaches the JSON parser instead of the size limit
    "max_frame_bytes": 1 << 20,
    "demo_task_seconds": 0.05,
}

# ---- strategies --------------------------------------------------------------------------

EDGE_TEXT = [
    "", " ", "\u0000", "a\u0000b", "\u200b", "\u200d", "\u2060", "\ufeff", "\u202e\u202d",
    "\u200f\u05e9\u05dc\u05d5\u05dd", "\U0001F600", "\U0001F468\u200d\U0001F469\u200d\U0001F467",
    "\U0001F1FA\U0001F1F3", "e\u0301\u0301\u0301", "\uffff", "\U0010ffff", "\ud7ff",
    "\x7f", "\x1b[31m", "\r\n", "\t", "'; DROP TABLE tasks; --", "../../etc/passwd",
    "%00", "%2F", "${jndi:x}", "<script>", "null", "NaN", "-0", "1e999", "x" * 5000,
    "ping", "subscribe", "unsubscribe", "refresh", "completed", "progress", "victim0",
]
HUGE_INTS = [2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**100, -(10**300)]

texts = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(EDGE_TEXT),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from(HUGE_INTS),
    st.integers(min_value=-(10**1000), max_value=10**1000),
    st.floats(),  # NaN and +-Infinity included: Python's json writes them, JSON does not
)



def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is beyond a double")
    return value


def strict_loads(text: str | bytes) -> Any:
    """JSON as RFC 8259 has it: Python's json also reads NaN and Infinity, JSON does not;
    and a number beyond a double (1e999), which would be read as infinity, is refused."""
    return json.loads(text, parse_constant=_no_constants, parse_float=_finite)

def json_of(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=4),
                                   st.dictionaries(texts, children, max_size=4)),
        max_leaves=12,
    )


json_values = json_of(st.one_of(st.none(), st.booleans(), numbers, texts))
# what strict JSON can carry (no NaN/Infinity): the valid form of result and metadata
json_strict = json_of(st.one_of(st.none(), st.booleans(), st.integers(),
                                st.floats(allow_nan=False, allow_infinity=False), texts))


def nested(depth: int, kind: str = "list") -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


# raw text no generator would reach: parser bombs and near-misses
RAW_TEXT = [
    "[" * 100_000,
    "{" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    '{"type":' * 50_000,
    "[" * 900 + "]" * 900,
    "[" * 5000 + "]" * 5000,
    "9" * 5000,
    "1e999999",
    "-" + "9" * 4000,
    '{"type":"ping"',
    '{"type":"ping"}{"type":"ping"}',
    '{"type":"ping","type":"subscribe"}',
    '{"type":"subscribe","task_id":"a","task_id":{}}',
    '{"type":"\\ud800"}',
    '{"type":"ping\\u0000"}',
    '"\\udfff\\ud800"',
    "NaN", "Infinity", "-Infinity", "[NaN]", '{"progress":NaN}',
    "\ufeff{}", "", " ", "\x00", "null", "true", "0", "[]", "{}",
]
RAW_BYTES = [
    b"\xff\xfe\xfd", b"\xc0\xaf", b"\xed\xa0\x80", b"{\"a\": \"\xff\"}", b"\x00" * 10,
    "\ufeff{}".encode(), '{"a":"\u00e9"}'.encode("latin-1"), '{"a":1}'.encode("utf-16"),
]

WS_TYPES = ["ping", "subscribe", "unsubscribe", "refresh"]
FIELDS = {"ping": ["type", "extra"], "subscribe": ["type", "task_id"],
          "unsubscribe": ["type", "task_id"], "refresh": ["type", "token"]}


@st.composite
def field_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed message of one type with one field replaced by anything."""
    kind = draw(st.sampled_from(WS_TYPES))
    message: dict[str, Any] = {"type": kind}
    if kind in ("subscribe", "unsubscribe"):
        message["task_id"] = "t"
    if kind == "refresh":
        message["token"] = "x.y.z"
    name = draw(st.sampled_from(FIELDS[kind]))
    message[name] = draw(json_values)
    return message


def dumps(value: Any) -> str:
    # escaped or raw unicode, varying with the value, so both decoder paths are exercised
    return json.dumps(value, ensure_ascii=len(repr(value)) % 2 == 0)


ws_frames = st.one_of(
    json_values.map(lambda v: ("text", dumps(v))),
    field_messages().map(lambda m: ("text", dumps(m))),
    st.dictionaries(texts, json_values, max_size=4).map(lambda d: ("text", dumps(d))),
    texts.map(lambda t: ("text", t)),
    st.binary(max_size=64).map(lambda b: ("binary", b)),
    st.sampled_from(RAW_BYTES).map(lambda b: ("binary", b)),
)


def with_fields(valid: dict[str, st.SearchStrategy[Any]], required: tuple[str, ...] = ()
                ) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose known fields are each valid or anything (and absent, unless required),
    sometimes with unknown fields too."""
    either = {name: st.one_of(good, good, good, json_values) for name, good in valid.items()}
    no_extra = st.just({})
    return st.builds(
        lambda known, extra: {**extra, **known},
        st.fixed_dictionaries({k: v for k, v in either.items() if k in required},
                              optional={k: v for k, v in either.items() if k not in required}),
        st.one_of(no_extra, no_extra, no_extra, st.dictionaries(texts, json_values,
                                                                max_size=2)),
    )


STATUSES = ["pending", "running", "progress", "completed", "failed", "cancelled"]
event_fields = {
    "status": st.sampled_from(STATUSES),
    "progress": st.one_of(st.integers(0, 100), st.floats(0, 100)),
    "message": texts, "step": texts, "error": texts, "error_type": texts,
    "result": json_strict,
}
register_fields = {
    "task_id": texts,
    "user_id": st.one_of(st.integers(0, 5), st.just(str(ATTACKER))),
    "task_type": st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S")),
                         min_size=1, max_size=20),
    "metadata": json_strict,
}
victims = st.sampled_from(VICTIMS)
task_ids = st.one_of(victims, victims, texts.filter(lambda t: len(t) <= 300))


def body_of(kind: str, payload: Any) -> bytes:
    if kind == "raw":
        return payload if isinstance(payload, bytes) else payload.encode()
    return dumps(payload).encode()


def bodies(objects: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """A request body: a shaped object, any JSON value, raw text or raw bytes."""
    shaped = objects.map(lambda o: body_of("json", o))
    return st.one_of(shaped, st.one_of(
        json_values.map(lambda v: body_of("json", v)),
        st.sampled_from(RAW_TEXT + [b.decode("latin-1") for b in RAW_BYTES]).map(
            lambda t: body_of("raw", t)),
        st.binary(max_size=64),
    ))


# ---- the arena: one app, an attacker and a bystander --------------------------------------


@dataclass
class Arena:
    client: TestClient
    bystander: ClientWebSocketResponse
    attacker: ClientWebSocketResponse
    demo: bool = False
    tokens: dict[int, str] = field(default_factory=dict)
    marker: int = 0

    def headers(self, user: int) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


async def _open_arena(make_client: MakeClient, demo: bool) -> Arena:
    changes = dict(ARENA_CONFIG)
    if demo:
        changes.update(jwt_secret=None, api_key=None)
    client = await make_client(**changes)
    tokens: dict[int, str] = {}
    for user in (ATTACKER, BYSTANDER):
        if demo:
            resp = await client.post("/api/demo/login", json={"user_id": user})
            assert resp.status == 200
            tokens[user] = (await resp.json())["data"]["token"]
        else:
            tokens[user] = make_token(user)
    if not demo:
        for victim in VICTIMS:
            resp = await client.post("/api/task/tasks", headers=PRODUCER,
                                     json={"task_id": victim, "user_id": ATTACKER,
                                           "task_type": "victim"})
            assert resp.status == 201
    bystander = await ws_connect(client, BYSTANDER, token=tokens[BYSTANDER])
    await handshake(bystander)
    attacker = await ws_connect(client, ATTACKER, token=tokens[ATTACKER])
    await handshake(attacker)
    return Arena(client, bystander, attacker, demo, tokens)


async def _bystander_unaffected(arena: Arena) -> None:
    """The end of every test: the other user's socket still gets its own update, and the
    attacker's socket and the server are still fine."""
    client = arena.client
    if arena.demo:
        resp = await client.post("/api/demo/tasks", headers=arena.headers(BYSTANDER),
                                 json={"kind": "success"})
        assert resp.status == 201
        own = (await resp.json())["data"]["task_id"]
    else:
        own = "bystander-final"
        resp = await client.post("/api/task/tasks", headers=PRODUCER,
                                 json={"task_id": own, "user_id": BYSTANDER,
                                       "task_type": "final"})
        assert resp.status == 201
    while True:
        msg = await arena.bystander.receive(timeout=5)
        assert msg.type == WSMsgType.TEXT, (msg.type, msg.data)
        data = json.loads(msg.data)
        assert data["type"] in ("task_status", "task_deleted"), data
        assert data.get("user_id", BYSTANDER) == BYSTANDER, data
        if data.get("task_id") == own:
            assert data["status"] == "pending"
            break
    await exchange(arena, None)  # the attacker's socket still answers
    resp = await client.get("/healthz")
    assert resp.status == 200


@pytest.fixture
def make_client(request: pytest.FixtureRequest, aiohttp_client: Any,
                config: Config) -> MakeClient:
    """make_client(**config_changes) -> a TestClient on a fresh app: on SQLite, or for a test
    marked `ON_BOTH_ENGINES`, on each engine in turn (on PostgreSQL, a node of its own
    database)."""
    database: dict[str, Any] = {}
    if "engine" in request.fixturenames:
        engine: Engine = request.getfixturevalue("engine")
        if engine.postgres:
            database = {"db": engine.database(), "node_name": "hostile"}

    async def factory(**changes: Any) -> TestClient:
        app: web.Application = create_app(config.replace(**database, **changes))
        return await aiohttp_client(app)

    return factory


# the examples that also run with the app on PostgreSQL (SQL injection there:
# tests/test_pg_hostile.py)
ON_BOTH_ENGINES = pytest.mark.usefixtures("engine")


@pytest.fixture
async def arena(make_client: MakeClient) -> AsyncIterator[Arena]:
    a = await _open_arena(make_client, demo=False)
    yield a
    await _bystander_unaffected(a)


@pytest.fixture
async def demo_arena(make_client: MakeClient) -> AsyncIterator[Arena]:
    a = await _open_arena(make_client, demo=True)
    yield a
    await _bystander_unaffected(a)


# ---- checks ------------------------------------------------------------------------------

ANSWER_TYPES = {"error", "pong", "subscribed", "unsubscribed", "refreshed", "task_status"}


async def exchange(arena: Arena, frame: tuple[str, Any] | None) -> list[dict[str, Any]]:
    """Send the frame, then a ping and a marker; return the answers to the frame.

    Fails if the socket closes, a message is not JSON, an `error` lacks its code/message,
    or the ping is not answered with a pong right before the marker's answer."""
    ws = arena.attacker
    arena.marker += 1
    marker = f"sync-{arena.marker}"
    if frame is not None:
        kind, payload = frame
        if kind == "text":
            await ws.send_str(payload)
        else:
            await ws.send_bytes(payload)
    await ws.send_str('{"type":"ping"}')
    await ws.send_str(json.dumps({"type": "unsubscribe", "task_id": marker}))
    seen: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=10)
        assert msg.type == WSMsgType.TEXT, ("socket closed", msg.type, msg.data, msg.extra)
        data = json.loads(msg.data)
        assert isinstance(data, dict) and data.get("type") in ANSWER_TYPES, data
        if data["type"] == "error":
            assert isinstance(data["code"], str) and data["code"]
            assert isinstance(data["message"], str) and data["message"]
        if data == {"type": "unsubscribed", "task_id": marker}:
            break
        seen.append(data)
    answers = [m for m in seen if m["type"] != "task_status"]
    assert answers and answers[-1]["type"] == "pong", seen
    assert not ws.closed
    return answers[:-1]


def check_envelope(status: int, text: str) -> dict[str, Any]:
    """A success envelope or a 4xx error envelope; never a 5xx, never a non-JSON body."""
    assert status < 500, (status, text[:300])
    body = json.loads(text)
    assert isinstance(body, dict), text[:300]
    if status < 300:
        assert body["code"] == 0 and body["message"] == "success" and "data" in body, body
    else:
        assert 400 <= status < 500, status
        assert body["code"] == status and body["data"] is None, body
        assert isinstance(body["message"], str) and body["message"], body
        assert set(body) <= {"code", "message", "data", "cancel_requested"}, body
    return body


async def call(client: TestClient, method: str, path: str | URL, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    resp = await client.request(method, path, data=body, headers=all_headers)
    text = await resp.text()
    if currently_in_test_context():
        event(f"HTTP {resp.status}")  # shown by --hypothesis-show-statistics
    return resp.status, check_envelope(resp.status, text)


def task_path(task_id: str, suffix: str = "") -> URL:
    return URL(f"/api/task/task/{quote(task_id, safe='')}{suffix}", encoded=True)


# ---- WebSocket -----------------------------------------------------------------------------


@MANY
@given(frame=ws_frames)
async def test_ws_any_frame_gets_an_answer_and_the_socket_stays_open(
        arena: Arena, frame: tuple[str, Any]) -> None:
    answers = await exchange(arena, frame)
    assert answers, "every frame is answered"
    kind, payload = frame
    if kind == "binary":
        assert [a["code"] for a in answers] == ["binary_frame"]
    else:
        try:
            parsed = strict_loads(payload)
        except (ValueError, RecursionError):
            assert [a["code"] for a in answers] == ["invalid_json"]
        else:
            if not isinstance(parsed, dict):
                assert [a["code"] for a in answers] == ["invalid_message"]
            elif not isinstance(parsed.get("type"), str):
                assert [a["code"] for a in answers] == ["missing_type"]
            elif parsed["type"] not in WS_TYPES:
                assert [a["code"] for a in answers] == ["unknown_type"]


@ON_BOTH_ENGINES
@HOSTILE
@given(message=field_messages())
async def test_ws_every_field_of_every_message_type(arena: Arena,
                                                    message: dict[str, Any]) -> None:
    text = dumps(message)
    answers = await exchange(arena, ("text", text))
    assert len(answers) == 1, answers
    answer = answers[0]
    kind = message["type"]
    try:
        strict_loads(text)
    except ValueError:  # Python wrote Infinity/NaN for a float: that is not JSON
        assert answer["code"] == "invalid_json", answer
        return
    if kind == "ping":
        assert answer["type"] == "pong"
    elif kind == "unsubscribe" and answer["type"] == "unsubscribed":
        assert answer["task_id"] == str(message["task_id"])
    elif kind == "subscribe":
        # the attacker has no tasks: whatever the id, the answer reveals nothing
        assert answer["type"] == "error" and answer["code"] in (
            "forbidden", "missing_field", "invalid_field"), answer
    elif kind == "refresh":
        assert answer["type"] == "error" and answer["code"] in (
            "invalid_token", "missing_field"), answer
    else:
        assert answer["type"] == "error", answer


@pytest.mark.parametrize("raw", RAW_TEXT, ids=lambda r: repr(r[:16]) + f"...{len(r)}")
async def test_ws_parser_bombs(arena: Arena, raw: str) -> None:
    answers = await exchange(arena, ("text", raw))
    assert answers and all(a["type"] in ("error", "pong") for a in answers), answers
    try:
        strict_loads(raw)
    except (ValueError, RecursionError):
        assert [a["code"] for a in answers] == ["invalid_json"]


async def test_ws_a_burst_of_garbage_then_normal_service(arena: Arena) -> None:
    ws = arena.attacker
    for raw in RAW_TEXT[:4] + ["{}", "[]", "nope"] * 10:
        await ws.send_str(raw)
    for raw in RAW_BYTES:
        await ws.send_bytes(raw)
    await exchange(arena, None)
    # the attacker still gets its own updates
    resp = await arena.client.post("/api/task/task/victim0/events", headers=PRODUCER,
                                   json={"status": "running", "message": "still here"})
    assert resp.status == 200
    while True:
        msg = await ws.receive(timeout=5)
        data = json.loads(msg.data)
        if data.get("type") == "task_status" and data["task_id"] == "victim0":
            assert data["message"] == "still here"
            break


# ---- REST: producers -----------------------------------------------------------------------


@HOSTILE
@given(body=bodies(with_fields(register_fields, ("user_id", "task_type"))))
async def test_rest_register_any_body(arena: Arena, body: bytes) -> None:
    status, envelope = await call(arena.client, "POST", "/api/task/tasks", body, PRODUCER)
    if status in (200, 201):
        task = envelope["data"]
        assert task["status"] == "pending" and isinstance(task["task_id"], str)
        parsed = json.loads(body)
        assert task["user_id"] == int(parsed["user_id"])
        assert task["metadata"] == parsed.get("metadata")


@ON_BOTH_ENGINES
@HOSTILE
@given(task_id=task_ids, body=bodies(with_fields(event_fields, ("status",))))
async def test_rest_single_event_any_body(arena: Arena, task_id: str, body: bytes) -> None:
    status, envelope = await call(arena.client, "POST", task_path(task_id, "/events"), body,
                                  PRODUCER)
    if status == 200:
        task = envelope["data"]
        assert task["task_id"] == task_id and 0 <= task["progress"] <= 100
        assert isinstance(task["progress"], int | float) and math.isfinite(task["progress"])


batch_items = st.one_of(
    json_values,
    st.builds(lambda fields, tid: {**fields, "task_id": tid},
              with_fields(event_fields, ("status",)), st.one_of(task_ids, task_ids, json_values)),
)


@ON_BOTH_ENGINES
@HOSTILE
@given(body=bodies(st.one_of(
    st.builds(lambda events: {"events": events}, st.lists(batch_items, max_size=6)),
    with_fields({"events": st.lists(batch_items, max_size=3)}),
)))
async def test_rest_batch_any_body(arena: Arena, body: bytes) -> None:
    status, envelope = await call(arena.client, "POST", "/api/task/events", body, PRODUCER)
    if status == 200:
        events = json.loads(body)["events"]
        results = envelope["data"]["results"]
        assert len(results) == len(events)
        for item, result in zip(events, results, strict=True):
            assert isinstance(result["ok"], bool)
            if result["ok"]:
                assert result["task_id"] == item["task_id"] and isinstance(result["seq"], int)
            else:
                assert 400 <= result["code"] < 500 and result["message"], result


def _valid_name(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit and value.isprintable()


printable = st.text(st.characters(categories=("L", "M", "N", "P", "S", "Zs")), min_size=1,
                    max_size=40).filter(str.isprintable)


@ON_BOTH_ENGINES
@HOSTILE
@given(task_id=st.one_of(texts, printable), task_type=st.one_of(texts, printable),
       metadata=json_strict)
@example(task_id="${jndi:x}", task_type="t", metadata={"a": "{}"})
@example(task_id="a/b?c#d", task_type="t", metadata=None)
@example(task_id="%2F%00%", task_type="t", metadata=None)
@example(task_id="{}", task_type="{}", metadata=None)
@example(task_id=" x ", task_type="שלום 😀", metadata="‮")
async def test_rest_register_hostile_values_round_trip(arena: Arena, task_id: str,
                                                       task_type: str, metadata: Any) -> None:
    """Well-formed registrations carrying hostile text: stored exactly, or refused with a
    400 that names the field; never mangled."""
    body = {"task_id": task_id, "user_id": ATTACKER, "task_type": task_type,
            "metadata": metadata}
    status, envelope = await call(arena.client, "POST", "/api/task/tasks",
                                  dumps(body).encode(), PRODUCER)
    valid = _valid_name(task_id, 200) and _valid_name(task_type, 100)
    if not valid:
        assert status == 400, (status, envelope)
        return
    assert status in (200, 201, 409), (status, envelope)  # 409: the id was used already
    if status == 409:
        return
    stored = envelope["data"]
    assert (stored["task_id"], stored["task_type"], stored["metadata"]) == \
        (task_id, task_type, metadata)
    status, envelope = await call(arena.client, "GET", task_path(task_id, "/status"), None,
                                  arena.headers(ATTACKER))
    assert status == 200, (task_id, envelope)
    assert envelope["data"]["metadata"] == metadata
    assert envelope["data"]["task_id"] == task_id


@ON_BOTH_ENGINES
@HOSTILE
@given(message=texts, step=texts, error=texts, error_type=texts, result=json_strict,
       progress=st.one_of(st.integers(-5, 105), st.floats(-1, 101), st.sampled_from(
           [0, 100, 0.0, 100.0, 1e-300, 99.99999999999999, -0.0, 2**63])))
async def test_rest_event_hostile_values_round_trip(
        arena: Arena, message: str, step: str, error: str, error_type: str, result: Any,
        progress: float) -> None:
    arena.marker += 1
    task_id = f"ev-{arena.marker}"
    status, _ = await call(arena.client, "POST", "/api/task/tasks", dumps(
        {"task_id": task_id, "user_id": ATTACKER, "task_type": "ev"}).encode(), PRODUCER)
    assert status == 201
    body = {"status": "progress", "progress": progress, "message": message, "step": step,
            "error": error, "error_type": error_type, "result": result}
    status, envelope = await call(arena.client, "POST", task_path(task_id, "/events"),
                                  dumps(body).encode(), PRODUCER)
    progress_ok = not isinstance(progress, bool) and 0 <= progress <= 100
    if not progress_ok:
        assert status == 400, (status, envelope)
        return
    if status != 200:
        assert status == 413, (status, envelope)  # a text over its limit
        return
    status, envelope = await call(arena.client, "GET", task_path(task_id, "/status"), None,
                                  arena.headers(ATTACKER))
    task = envelope["data"]
    assert (task["message"], task["step"], task["error"], task["error_type"]) == \
        (message, step, error, error_type)
    assert task["result"] == result and task["progress"] == progress


# ---- REST: users ---------------------------------------------------------------------------


@ON_BOTH_ENGINES
@HOSTILE
@given(task_id=st.one_of(task_ids, st.sampled_from(["%", "%2", "%ZZ", "%FF", "%C0%AF",
                                                    "%00", "..", ".", "a/b", "%2e%2e"])),
       op=st.sampled_from(["status", "history", "cancel", "delete"]),
       raw=st.booleans())
async def test_rest_weird_task_ids(arena: Arena, task_id: str, op: str, raw: bool) -> None:
    path = (URL(f"/api/task/task/{task_id}", encoded=True) if raw and "%" in task_id
            else task_path(task_id))
    method, suffix = {"status": ("GET", "/status"), "history": ("GET", "/history"),
                      "cancel": ("POST", "/cancel"), "delete": ("DELETE", "")}[op]
    path = URL(str(path) + suffix, encoded=True)
    headers = arena.headers(BYSTANDER)  # the victims are not the bystander's: always 404
    status, envelope = await call(arena.client, method, path, None, headers)
    assert status in (404, 405), (status, envelope)


@ON_BOTH_ENGINES
@HOSTILE
@given(params=st.dictionaries(
    st.sampled_from(["status", "limit", "before", "since", "wait"]),
    st.one_of(texts, st.sampled_from(HUGE_INTS).map(str), st.integers(-5, 600).map(str)),
    max_size=3))
async def test_rest_list_and_status_with_any_query(arena: Arena,
                                                   params: dict[str, str]) -> None:
    query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items())
    if "wait" not in params:
        status, envelope = await call(arena.client, "GET",
                                      URL(f"/api/task/tasks?{query}", encoded=True),
                                      None, arena.headers(ATTACKER))
        if status == 200:
            assert envelope["data"]["count"] == len(envelope["data"]["tasks"])
    path = URL(f"/api/task/task/victim1/status?{query}", encoded=True)
    resp = await arena.client.get(path, headers={**arena.headers(ATTACKER),
                                                 "If-None-Match": '"0"'})
    text = await resp.text()
    if resp.status != 200 or text:
        check_envelope(resp.status, text)


# ---- REST: demo mode -------------------------------------------------------------------------


@HOSTILE
@given(body=bodies(with_fields({"user_id": st.integers(0, 10)})))
async def test_demo_login_any_body(demo_arena: Arena, body: bytes) -> None:
    status, envelope = await call(demo_arena.client, "POST", "/api/demo/login", body)
    if status == 200:
        assert envelope["data"]["user_id"] == int(json.loads(body)["user_id"])
        assert isinstance(envelope["data"]["token"], str)


@HOSTILE
@given(body=bodies(with_fields({"kind": st.sampled_from(["success", "fail", "long"])})))
async def test_demo_tasks_any_body(demo_arena: Arena, body: bytes) -> None:
    status, envelope = await call(demo_arena.client, "POST", "/api/demo/tasks", body,
                                  demo_arena.headers(ATTACKER))
    if status == 201:
        assert envelope["data"]["user_id"] == ATTACKER


# ---- REST: parser bombs on every body ------------------------------------------------------

ENDPOINTS = [
    ("/api/task/tasks", PRODUCER),
    ("/api/task/task/victim2/events", PRODUCER),
    ("/api/task/events", PRODUCER),
]


@pytest.mark.parametrize("raw", RAW_TEXT + RAW_BYTES,
                         ids=lambda r: repr(r[:16]) + f"...{len(r)}")
async def test_rest_parser_bombs(arena: Arena, raw: str | bytes) -> None:
    body = raw if isinstance(raw, bytes) else raw.encode()
    for path, headers in ENDPOINTS:
        status, _ = await call(arena.client, "POST", path, body, headers)
        assert 400 <= status < 500, (path, status)
    status, _ = await call(arena.client, "POST", "/api/task/task/victim2/cancel", body,
                           arena.headers(BYSTANDER))
    assert status == 404


def raw_nested(depth: int, kind: str) -> str:
    """Nesting as JSON text, built without recursion (the client side has limits too)."""
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


async def deepest_parsed(send: Any) -> int:
    """Binary search: the deepest nesting the server's JSON parser still accepts for this
    request (it depends on the stack depth, so it is measured, not assumed)."""
    lo, hi = 1, 4000
    while hi - lo > 1:
        mid = (lo + hi) // 2
        status, envelope = await send(mid)
        if status == 400 and "not valid JSON" in envelope["message"]:
            hi = mid
        else:
            lo = mid
    return lo


@ON_BOTH_ENGINES
@pytest.mark.parametrize("kind", ["list", "dict"])
async def test_deeply_nested_values_are_stored_or_refused_cleanly(arena: Arena,
                                                                  kind: str) -> None:
    """At the depth where the parser gives up, a value it barely accepted used to be
    committed and then fail to serialize in the answer (a 500). Every depth must be either
    stored and readable back, or refused with a 400."""
    client = arena.client
    count = 0

    async def register_with(depth: int) -> tuple[int, dict[str, Any]]:
        nonlocal count
        count += 1
        body = (f'{{"task_id":"deep-{kind}-{count}","user_id":{ATTACKER},"task_type":"d",'
                f'"metadata":{raw_nested(depth, kind)}}}')
        return await call(client, "POST", "/api/task/tasks", body.encode(), PRODUCER)

    target = f"deep-{kind}-target"
    status, _ = await call(client, "POST", "/api/task/tasks", json.dumps(
        {"task_id": target, "user_id": ATTACKER, "task_type": "d"}).encode(), PRODUCER)
    assert status == 201

    async def event_with(depth: int) -> tuple[int, dict[str, Any]]:
        body = f'{{"status":"progress","result":{raw_nested(depth, kind)}}}'
        return await call(client, "POST", f"/api/task/task/{target}/events", body.encode(),
                          PRODUCER)

    async def batch_with(depth: int) -> tuple[int, dict[str, Any]]:
        body = (f'{{"events":[{{"task_id":"{target}","status":"progress",'
                f'"result":{raw_nested(depth, kind)}}}]}}')
        status, envelope = await call(client, "POST", "/api/task/events", body.encode(),
                                      PRODUCER)
        if status == 200:
            result = envelope["data"]["results"][0]
            assert result["ok"] or result["code"] == 400, result
        return status, envelope

    for send, ok_status in ((register_with, 201), (event_with, 200), (batch_with, 200)):
        for depth in (1, 50, 100):
            assert (await send(depth))[0] == ok_status, (send.__name__, depth)
        edge = await deepest_parsed(send)
        for depth in (101, *range(max(102, edge - 5), edge + 6)):
            status, _ = await send(depth)  # `call` already refuses any 5xx
            assert status in (ok_status, 400), (send.__name__, depth, status)
    resp = await client.get(f"/api/task/task/{target}/status", headers=auth(ATTACKER))
    check_envelope(resp.status, await resp.text())
    assert resp.status == 200
    await exchange(arena, None)
