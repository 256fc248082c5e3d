"""Secrets never leak: not into any log record (every logger at DEBUG, the access log on,
with the server's own RedactingAccessLogger), not into any error answer, not into a repr.

A whole session runs in-process: WebSocket with good, bad, expired and foreign tokens,
refresh, REST with Bearer (good and bad), producers with the right and a wrong API key,
assorted errors, and demo mode (whose generated secret lives in the database).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from server.accesslog import RedactingAccessLogger, redact
from server.app import create_app
from server.config import Config, Secret, parse_config
from tests.conftest import API_KEY, SECRET, make_token

ACCESS_LOGGER = "taskpush.access"
OTHER_SECRET = "some-other-secret-that-signs-forged-tokens-0123"
WRONG_KEY = "wrong-producer-key-abcdefghijklmnop"


async def start(aiohttp_client: Any, config: Config) -> TestClient:
    """An app served exactly as run.py serves it: RedactingAccessLogger on the access log."""
    server = TestServer(create_app(config))
    await server.start_server(access_log_class=RedactingAccessLogger,
                              access_log=logging.getLogger(ACCESS_LOGGER))
    return await aiohttp_client(server)


class Recorder:
    """Every response body and every WebSocket text the session saw."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.bodies: list[tuple[int, str]] = []

    async def request(self, method: str, path: Any, **kw: Any) -> tuple[int, Any]:
        resp = await self.client.request(method, path, **kw)
        text = await resp.text()
        self.bodies.append((resp.status, text))
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text

    async def ws(self, path: Any, sends: Sequence[Any] = ()) -> tuple[list[str], int | None]:
        """Connect, send each message (then a ping), read until pong or a close."""
        ws = await self.client.ws_connect(path)
        texts: list[str] = []
        for message in [*sends, {"type": "ping"}]:
            if ws.closed:
                break
            await ws.send_str(json.dumps(message))
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type != WSMsgType.TEXT:
                break
            texts.append(msg.data)
            if json.loads(msg.data)["type"] == "pong":
                break
        await ws.close()
        self.bodies.extend((0, t) for t in texts)
        return texts, ws.close_code


def log_text(records: list[logging.LogRecord]) -> str:
    """Everything a handler could write for these records, and their raw arguments."""
    parts = []
    for record in records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        parts.append(repr(record.__dict__))
        if record.exc_info and record.exc_info[1] is not None:
            parts.extend(traceback.format_exception(record.exc_info[1]))
    return "\n".join(parts)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger propagates here
    for name in ("aiohttp", "aiohttp.access", "aiohttp.server", "aiohttp.web", ACCESS_LOGGER,
                 "server", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def assert_absent(secrets: list[str], text: str, where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:6]}...) appears in {where}"


async def test_a_full_session_leaks_no_secret(aiohttp_client: Any, config: Config,
                                              captured: pytest.LogCaptureFixture) -> None:
    client = await start(aiohttp_client, config.replace(access_log=True, log_level="debug"))
    rec = Recorder(client)
    good = make_token(1)
    fresh = make_token(1, ttl=7200)
    admin = make_token(9, admin=True)
    forged = make_token(1, secret=OTHER_SECRET)
    expired = make_token(1, ttl=-3600)
    foreign = make_token(2)
    producer = {"X-API-Key": API_KEY}

    # producers: right key, wrong key, no key, bad bodies
    status, body = await rec.request("POST", "/api/task/tasks", headers=producer,
                                     json={"task_id": "t1", "user_id": 1, "task_type": "job"})
    assert status == 201
    status, _ = await rec.request("POST", "/api/task/task/t1/events", headers=producer,
                                  json={"status": "progress", "progress": 10})
    assert status == 200
    status, body = await rec.request("POST", "/api/task/events", headers=producer,
                                     json={"events": [{"task_id": "t1", "status": "running"},
                                                      {"task_id": "zz", "status": "nope"}]})
    assert status == 200 and [r["ok"] for r in body["data"]["results"]] == [True, False]
    for headers in ({"X-API-Key": WRONG_KEY}, {"X-API-Key": API_KEY + "x"}, {}):
        status, body = await rec.request("POST", "/api/task/tasks", headers=headers,
                                         json={"user_id": 1, "task_type": "job"})
        assert status == 401 and body["data"] is None
    status, _ = await rec.request("POST", "/api/task/tasks", headers=producer, data=b"{nope")
    assert status == 400
    status, _ = await rec.request("POST", f"/api/task/tasks?api_key={API_KEY}",
                                  headers=producer, json={"user_id": 1, "task_id": "t1",
                                                          "task_type": "other"})
    assert status == 409

    # users over REST: good, forged, expired, foreign, malformed, and a token in the query
    status, body = await rec.request("GET", "/api/task/task/t1/status",
                                     headers={"Authorization": f"Bearer {good}"})
    assert status == 200 and body["data"]["status"] == "running"
    for token in (forged, expired, good + "x", "not.a.jwt", f"{SECRET}"):
        status, body = await rec.request("GET", "/api/task/tasks",
                                         headers={"Authorization": f"Bearer {token}"})
        assert status == 401 and body["data"] is None
    status, _ = await rec.request("GET", "/api/task/task/t1/status",
                                  headers={"Authorization": f"Bearer {foreign}"})
    assert status == 404
    status, _ = await rec.request("GET", f"/api/task/tasks?token={good}&access_token={good}")
    assert status == 401
    status, _ = await rec.request("DELETE", "/api/task/task/t1",
                                  headers={"Authorization": f"Bearer {good}"})
    assert status == 409
    status, _ = await rec.request("POST", "/api/task/task/t1/cancel",
                                  headers={"Authorization": f"Bearer {good}"})
    assert status == 200
    status, body = await rec.request("POST", "/api/task/task/t1/events", headers=producer,
                                     json={"status": "progress", "progress": 20})
    assert status == 409 and body["cancel_requested"] is True
    status, _ = await rec.request("GET", f"/no/such/path?token={good}")
    assert status == 404

    # WebSockets: good token with refreshes, then bad, expired, foreign, missing
    texts, code = await rec.ws(
        f"/api/task/ws/task/1?token={good}",
        [{"type": "refresh", "token": fresh},
         {"type": "refresh", "token": forged},
         {"type": "refresh", "token": expired},
         {"type": "refresh", "token": foreign},
         {"type": "refresh", "token": SECRET},
         {"type": "subscribe", "task_id": "t1"},
         {"type": "nonsense", "token": good}])
    kinds = [json.loads(t)["type"] for t in texts]
    assert kinds[:2] == ["connected", "active_tasks"] and kinds[-1] == "pong"
    assert kinds.count("refreshed") == 1 and kinds.count("error") == 5
    texts, code = await rec.ws(f"/api/task/ws/task/9?token={admin}",
                               [{"type": "subscribe", "task_id": "t1"}])
    assert "subscribed" in [json.loads(t)["type"] for t in texts]
    for token, expected in ((forged, 4401), (expired, 4401), (foreign, 4403),
                            (good + "x", 4401)):
        texts, code = await rec.ws(f"/api/task/ws/task/1?token={token}")
        assert texts == [] and code == expected
    texts, code = await rec.ws("/api/task/ws/task/1")
    assert code == 4401
    # the query key percent-encoded still reaches the server as `token`
    texts, code = await rec.ws(URL(f"/api/task/ws/task/1?%74oken={good}", encoded=True))
    assert texts and json.loads(texts[0])["type"] == "connected"

    await client.close()  # shutdown logs too
    secrets = [SECRET, API_KEY, good, fresh, admin, forged, expired, foreign,
               # the signature alone is the part that must never be seen
               good.rsplit(".", 1)[1], fresh.rsplit(".", 1)[1]]
    records = captured.records
    assert_absent(secrets, log_text(records), "a log record")
    assert_absent(secrets, captured.text, "the formatted log")
    for status, text in rec.bodies:
        assert_absent(secrets, text, f"a response ({status}): {text[:80]}")

    # the access log did run, and did see the requests that carried a token in the query
    access = [r.getMessage() for r in records if r.name == ACCESS_LOGGER]
    assert len(access) >= 20
    assert any("/api/task/ws/task/1?token=[redacted]" in line for line in access)
    assert any("access_token=[redacted]" in line for line in access)
    assert any("api_key=[redacted]" in line for line in access)


async def test_demo_mode_secret_and_tokens_stay_out_of_logs(
        aiohttp_client: Any, config: Config, captured: pytest.LogCaptureFixture) -> None:
    client = await start(aiohttp_client, config.replace(jwt_secret=None, api_key=None,
                                                        demo_task_seconds=0.05))
    resp = await client.post("/api/demo/login", json={"user_id": 3})
    assert resp.status == 200
    token = (await resp.json())["data"]["token"]
    headers = {"Authorization": f"Bearer {token}"}
    ws = await client.ws_connect(f"/api/task/ws/task/3?token={token}")
    assert json.loads((await ws.receive(timeout=5)).data)["type"] == "connected"
    resp = await client.post("/api/demo/tasks", headers=headers, json={"kind": "fail"})
    assert resp.status == 201
    while True:  # the demo job fails part way: its failure is logged, nothing else
        msg = json.loads((await ws.receive(timeout=5)).data)
        if msg.get("status") == "failed":
            break
    resp = await client.get("/api/task/tasks", headers={"Authorization": "Bearer nope"})
    error_body = await resp.text()
    await ws.close()
    await client.close()
    conn = sqlite3.connect(config.db)
    try:
        (demo_secret,) = conn.execute(
            "SELECT value FROM settings WHERE key = 'demo_secret'").fetchone()
    finally:
        conn.close()
    secrets = [demo_secret, token, token.rsplit(".", 1)[1]]
    assert_absent(secrets, log_text(captured.records), "a log record")
    assert_absent(secrets, error_body, "an error response")
    assert any("token=[redacted]" in r.getMessage() for r in captured.records
               if r.name == ACCESS_LOGGER)


# ---- unit: the redaction and the reprs ---------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("/ws/1?token=abc.def.ghi", "/ws/1?token=[redacted]"),
    ("/ws/1?since=5&token=abc.def&epoch=e", "/ws/1?since=5&token=[redacted]&epoch=e"),
    ("/ws/1?TOKEN=abc&x=1", "/ws/1?TOKEN=[redacted]&x=1"),
    ("/p?access_token=abc#frag", "/p?access_token=[redacted]#frag"),
    ("/p?api_key=k1&api_key=k2", "/p?api_key=[redacted]&api_key=[redacted]"),
    ("/p?a=1;token=abc", "/p?a=1;token=[redacted]"),
    ("/p?token=", "/p?token=[redacted]"),
    ("token=abc", "token=[redacted]"),
    ("/p?mytoken=keep&tokens=keep", "/p?mytoken=keep&tokens=keep"),
    ("/api/task/tasks?limit=5", "/api/task/tasks?limit=5"),
])
def test_redact(raw: str, expected: str) -> None:
    assert redact(raw) == expected


@pytest.mark.parametrize("raw", [
    "/ws/1?%74oken=SECRETVALUE",
    "/ws/1?x=1&%74%6F%6B%65%6E=SECRETVALUE",
    "/ws/1?api%5Fkey=SECRETVALUE",
    "/ws/1?Access_Token=SECRETVALUE&y=2",
])
def test_redact_sees_through_percent_encoded_keys(raw: str) -> None:
    assert "SECRETVALUE" not in redact(raw)


def test_config_repr_never_shows_secrets() -> None:
    config = Config(jwt_secret=Secret(SECRET), api_key=Secret(API_KEY))
    for shown in (repr(config), str(config), f"{config}", repr(dataclasses.asdict(config)),
                  repr(config.jwt_secret), str(config.api_key)):
        assert SECRET not in shown and API_KEY not in shown
    assert config.jwt_secret is not None and config.jwt_secret.reveal() == SECRET

    parsed = parse_config(["--jwt-secret", SECRET], {"TASKPUSH_API_KEY": API_KEY})
    assert SECRET not in repr(parsed) and API_KEY not in repr(parsed)
    assert parsed.api_key == Secret(API_KEY) and parsed.jwt_secret == Secret(SECRET)
