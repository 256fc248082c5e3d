"""Integers a client sends (a resume point, a cursor, a page size), past what a 64-bit
column holds, on both engines: every path answers as SQLite always did (a resync for a
point beyond the latest seq, a 400 or `invalid_since` for a parameter out of its declared
range), never a 500 nor a traceback in the log (PostgreSQL's bigint would raise
OverflowError if such a value reached a query)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.config import Config
from server.web import keys
from tests.conftest import auth, handshake, recv, register, ws_connect
from tests.support import events_until, stream

HUGE = "9999999999999999999"  # 19 digits, past 2**63 - 1
INT64_MAX = str(2**63 - 1)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
async def node(request: pytest.FixtureRequest, aiohttp_client: Any, config: Config) -> Any:
    if request.param == "postgresql":
        config = config.replace(db=request.getfixturevalue("pg_url"), node_name="n1")
    app: web.Application = create_app(config)
    return await aiohttp_client(app)


def no_trouble_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == [], [r.getMessage() for r in errors]
    assert "Traceback" not in caplog.text and "OverflowError" not in caplog.text


async def test_integers_past_their_range_on_every_path(node: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await register(node, "t", 1)
    epoch = node.app[keys.STORE].epoch
    # Last-Event-ID: any point beyond the latest seq (whatever its length) is a resync
    for last_id in (f"{epoch}:{HUGE}", f"x:{HUGE}", f"{epoch}:{INT64_MAX}",
                    f"{epoch}:{'9' * 5000}"):
        resp = await stream(node, Last_Event_ID=last_id)
        assert resp.status == 200
        got = await events_until(resp, "active_tasks")
        assert [e["event"] for e in got] == ["connected", "resync", "active_tasks"], \
            last_id[:60]
        assert [t["task_id"] for t in got[-1]["data"]["tasks"]] == ["t"]
        assert got[-1]["id"] == f"{epoch}:{got[0]['data']['seq']}"  # a fresh point
        resp.close()
    # WebSocket: `since` out of range is invalid (after the handshake); its top, a resync
    ws = await ws_connect(node, 1, query=f"since={HUGE}&epoch={epoch}")
    await handshake(ws)
    assert (await recv(ws))["code"] == "invalid_since"
    await ws.close()
    ws = await ws_connect(node, 1, query=f"since={INT64_MAX}&epoch={epoch}")
    assert (await recv(ws))["type"] == "connected"
    assert await recv(ws) == {"type": "resync"}
    await ws.close()
    # Server-Sent Events: the same through the URL
    resp = await stream(node, query=f"&since={HUGE}&epoch={epoch}")
    got = await events_until(resp, "error")
    assert got[-1]["data"]["code"] == "invalid_since"
    resp.close()
    # REST: 400 for any parameter past its range; the top of `since`, a resync
    for path in (f"/api/task/tasks?since={HUGE}", f"/api/task/tasks?before={HUGE}",
                 f"/api/task/tasks?limit={HUGE}", f"/api/task/task/t/history?after={HUGE}",
                 f"/api/task/task/t/history?limit={HUGE}",
                 f"/api/task/task/t/status?wait={HUGE}"):
        resp = await node.get(path, headers=auth(1))
        assert resp.status == 400, (path, resp.status)
    resp = await node.get(f"/api/task/tasks?since={INT64_MAX}", headers=auth(1))
    assert resp.status == 200
    assert (await resp.json())["data"]["resync"] is True
    for path in (f"/api/task/tasks?before={INT64_MAX}",
                 f"/api/task/task/t/history?after={INT64_MAX}"):
        resp = await node.get(path, headers=auth(1))
        assert resp.status == 200, path
    no_trouble_logged(caplog)
