"""A token's time claims against a running app: the same rule for REST, a new socket and a
`refresh` on an open one (a numeric-string `exp` is refused everywhere), and an `exp` past
year 9999 served everywhere without a traceback (held to 9999-12-31T23:59:59Z)."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest

from tests.conftest import (
    SECRET,
    Client,
    expect_close,
    handshake,
    make_token,
    recv,
    register,
    ws_connect,
)


def token(**claims: Any) -> str:
    return jwt.encode({"sub": "1", **claims}, SECRET, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


STRING_EXP = pytest.param(lambda: token(exp=str(int(time.time()) + 3600)), id="exp-string")
STRING_NBF = pytest.param(lambda: token(exp=int(time.time()) + 3600, nbf="0"), id="nbf-string")


@pytest.mark.parametrize("make", [STRING_EXP, STRING_NBF])
async def test_a_non_numeric_time_claim_is_refused_everywhere(client: Client, make: Any
                                                              ) -> None:
    bad = make()
    await register(client, "t1", 1)
    resp = await client.get("/api/task/task/t1/status", headers=bearer(bad))
    assert resp.status == 401
    assert (await resp.json())["message"] == "token invalid"

    ws = await ws_connect(client, 1, token=bad)
    code, reason = await expect_close(ws)
    assert (code, reason) == (4401, "token invalid")

    ws = await ws_connect(client, 1)
    await handshake(ws)
    await ws.send_str(json.dumps({"type": "refresh", "token": bad}))
    answer = await recv(ws)
    assert answer["type"] == "error" and answer["code"] == "invalid_token"
    await ws.send_str(json.dumps({"type": "ping"}))
    assert (await recv(ws))["type"] == "pong"  # the socket stays open
    await ws.close()


@pytest.mark.parametrize("exp", [10**20, 10**400], ids=["1e20", "1e400-int"])
async def test_an_exp_beyond_year_9999_is_served_without_a_traceback(
        client: Client, exp: int) -> None:
    far = token(exp=exp)
    await register(client, "t1", 1)
    resp = await client.get("/api/task/task/t1/status", headers=bearer(far))
    assert resp.status == 200

    ws = await ws_connect(client, 1, token=far)
    await handshake(ws)
    await ws.send_str(json.dumps({"type": "refresh", "token": far}))
    answer = await recv(ws)
    assert answer == {"type": "refreshed", "expires_at": "9999-12-31T23:59:59.000Z"}
    await ws.send_str(json.dumps({"type": "refresh", "token": make_token(1)}))
    assert (await recv(ws))["type"] == "refreshed"
    await ws.close()
