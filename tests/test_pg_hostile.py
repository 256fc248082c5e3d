"""Hostile input against a PostgreSQL node: SQL injection attempts through every field a
client or producer controls are stored verbatim and harmless. (tests/test_hostile.py's REST
and WebSocket examples marked `ON_BOTH_ENGINES` run on PostgreSQL as well.)"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp import web

from server.app import create_app
from server.config import Config
from tests.conftest import PRODUCER, MakeClient, auth, handshake, recv_until, ws_connect


@pytest.fixture
def make_client(aiohttp_client: Any, config: Config, pg_url: str) -> MakeClient:
    """make_client(**config_changes) -> a TestClient on a fresh app serving PostgreSQL."""

    async def factory(**changes: Any) -> Any:
        app: web.Application = create_app(config.replace(db=pg_url, node_name="hostile",
                                                         **changes))
        return await aiohttp_client(app)

    return factory


INJECTIONS = [
    "'; DROP TABLE tasks; --",
    "x' OR '1'='1",
    "x\"; DELETE FROM events; --",
    "$1",
    "$$; TRUNCATE settings; $$",
    "\\'; SELECT pg_sleep(10); --",
    "1); UPDATE seq_counter SET seq = 0; --",
    "E'\\x00'",
    "nul \x00 byte",
    "\uffff0 escape lookalike",
    "' || pg_notify('taskpush', '999999') || '",
]


async def test_sql_injection_through_every_field_is_stored_verbatim(
        make_client: MakeClient, pg_url: str) -> None:
    client = await make_client()
    ws = await ws_connect(client, 5)
    await handshake(ws)
    for n, text in enumerate(INJECTIONS):
        printable = text.isprintable()
        task_id = text if printable else f"injection-{n}"
        task_type = text if printable else "t"
        resp = await client.post("/api/task/tasks", headers=PRODUCER, json={
            "task_id": task_id, "user_id": 5, "task_type": task_type,
            "metadata": {text: text}})
        assert resp.status == 201, await resp.text()
        path = f"/api/task/task/{quote(task_id, safe='')}"
        headers = {**PRODUCER, "Idempotency-Key": f"key-{n}"}
        if printable:
            headers["Idempotency-Key"] = text.encode("ascii", "replace").decode()[:100]
        resp = await client.post(path + "/events", headers=headers, json={
            "status": "failed", "message": text, "step": text, "error": text,
            "error_type": text, "result": [text]})
        assert resp.status in (200, 400), await resp.text()
        if resp.status == 400:  # a key that is not a valid Idempotency-Key: without one
            resp = await client.post(path + "/events", headers=PRODUCER, json={
                "status": "failed", "message": text, "step": text, "error": text,
                "error_type": text, "result": [text]})
            assert resp.status == 200, await resp.text()
        resp = await client.get(path + "/status", headers=auth(5))
        task = (await resp.json())["data"]
        assert (task["task_id"], task["task_type"], task["metadata"]) == (
            task_id, task_type, {text: text})
        assert [task[f] for f in ("message", "step", "error", "error_type")] == [text] * 4
        assert task["result"] == [text]
        pushed = await recv_until(ws, lambda m, t=task_id: m.get("task_id") == t
                                  and m.get("status") == "failed")
        assert pushed[-1]["message"] == text
        for query in (f"?status={quote(text)}", f"?before={quote(text)}"):
            resp = await client.get("/api/task/tasks" + query, headers=auth(5))
            assert resp.status in (200, 400)
    resp = await client.get("/api/task/tasks?limit=100", headers=auth(5))
    assert len((await resp.json())["data"]["tasks"]) == len(INJECTIONS)
    conn = await asyncpg.connect(pg_url)
    try:  # every table is there, holding exactly what was sent, the counter intact
        assert await conn.fetchval("SELECT count(*) FROM tasks") == len(INJECTIONS)
        assert await conn.fetchval("SELECT count(*) FROM events") == 2 * len(INJECTIONS)
        assert await conn.fetchval("SELECT seq FROM seq_counter") == 2 * len(INJECTIONS)
        assert await conn.fetchval("SELECT count(*) FROM settings WHERE key = 'epoch'") == 1
    finally:
        await conn.close()
    await ws.close()
