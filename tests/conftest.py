"""Shared fixtures: real apps on real SQLite files under tmp_path, real sockets through
aiohttp's test server. No mocks of the store or the network.

Declared once here for every module: `servers` (server processes, tests/procs.py), `engine`
(each test that takes it runs on SQLite and on PostgreSQL, tests/engines.py; the PostgreSQL
run is marked `slow`), `browser` (a headless Chromium, tests/jsenv.py), `pg_server` and
`pg_url` (tests/pg.py); and, one per test module, `workdir` (a directory of its own), `server`
(a `python run.py` process on it, tests/workers_support.py) and `redis` (a private Redis
server) for the client and worker tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType, web
from aiohttp.test_utils import TestClient

from server.app import create_app
from server.config import Config, Secret
from tests.engines import ENGINES, Engine, engine_fixture
from tests.jsenv import chromium
from tests.procs import Servers, servers_fixture

SECRET = "test-secret-0123456789-abcdefghijklmnop"
API_KEY = "test-producer-key-0123456789"


def make_token(user_id: int | str, *, secret: str = SECRET, ttl: float | None = 3600,
               admin: bool = False, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": str(user_id), **claims}
    if ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    if admin:
        payload["role"] = "admin"
    return jwt.encode(payload, secret, algorithm="HS256")


def auth(user_id: int | str, **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user_id, **kw)}"}


PRODUCER = {"X-API-Key": API_KEY}


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Token mode with a producer key; tests adjust it with config.replace(...)."""
    return Config(db=str(tmp_path / "taskpush.db"), jwt_secret=Secret(SECRET),
                  api_key=Secret(API_KEY), access_log=False)


Client = TestClient
MakeClient = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_client(aiohttp_client: Any, config: Config) -> MakeClient:
    """make_client(**config_changes) -> a TestClient on a fresh app."""

    async def factory(**changes: Any) -> TestClient:
        app: web.Application = create_app(config.replace(**changes))
        return await aiohttp_client(app)

    return factory


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient:
    return await make_client()


async def register(client: TestClient, task_id: str, user_id: int = 1,
                   task_type: str = "interview_generation", **extra: Any) -> dict[str, Any]:
    resp = await client.post("/api/task/tasks", headers=PRODUCER,
                             json={"task_id": task_id, "user_id": user_id,
                                   "task_type": task_type, **extra})
    assert resp.status in (200, 201), await resp.text()
    return (await resp.json())["data"]


async def event(client: TestClient, task_id: str, status: str = "progress",
                **fields: Any) -> dict[str, Any]:
    resp = await client.post(f"/api/task/task/{task_id}/events", headers=PRODUCER,
                             json={"status": status, **fields})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]


async def ws_connect(client: TestClient, user_id: int | str = 1, token: str | None = None,
                     query: str = "", **kw: Any) -> ClientWebSocketResponse:
    token = make_token(user_id) if token is None else token
    url = f"/api/task/ws/task/{user_id}?token={token}" + (f"&{query}" if query else "")
    return await client.ws_connect(url, **kw)


async def recv(ws: ClientWebSocketResponse, timeout: float = 5.0) -> dict[str, Any]:
    """The next JSON message; fails the test on a close or a timeout."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type == WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return json.loads(msg.data)


async def recv_until(ws: ClientWebSocketResponse, predicate: Callable[[dict[str, Any]], bool],
                     timeout: float = 5.0) -> list[dict[str, Any]]:
    """Messages up to and including the first that matches; fails on timeout."""
    seen: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"no matching message; saw {seen}"
        message = await recv(ws, remaining)
        seen.append(message)
        if predicate(message):
            return seen


async def handshake(ws: ClientWebSocketResponse) -> tuple[dict[str, Any], dict[str, Any]]:
    """connected + active_tasks, as every socket starts."""
    connected = await recv(ws)
    assert connected["type"] == "connected", connected
    active = await recv(ws)
    assert active["type"] == "active_tasks", active
    return connected, active


async def expect_close(ws: ClientWebSocketResponse, timeout: float = 5.0
                       ) -> tuple[int | None, str]:
    """Read until the server closes; return (code, reason). Fails on a data message."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), (msg.type,
                                                                                   msg.data)
    return ws.close_code, msg.extra or ""


# ---- PostgreSQL (cluster mode) -------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server() -> Any:
    """One real PostgreSQL server for the whole run (tests/pg.py). Skips on a developer
    machine without PostgreSQL; fails in CI, where .ci/run installs it."""
    import os

    from tests.pg import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI (.ci/run installs it): {exc}")
        pytest.skip(f"PostgreSQL is not available on this machine: {exc}")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """The URL of a fresh, empty database on the shared server."""
    return str(pg_server.create_database())


# ---- server processes, both engines, a browser -----------------------------------------------

@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    yield from servers_fixture(tmp_path)


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.slow] if name == "postgresql"
                                     else [])
                        for name in ENGINES])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The storage engine a test runs on: every test that takes it runs once per engine."""
    return engine_fixture(request)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless system Chromium with a fresh temporary profile (tests/jsenv.py: skipped on
    a developer machine without it, a failure in CI)."""
    async for launched in chromium():
        yield launched


# ---- the inner loop: `python -m pytest -m "not slow"` ------------------------------------------

# A test that takes one of these needs a real external server (server processes, PostgreSQL,
# Chromium): it is `slow` wherever it is. Modules that start other processes on their own
# (workers, Redis, venv installs, Node) say `pytestmark = pytest.mark.slow`.
SLOW_FIXTURES = frozenset({"servers", "pg_server", "pg_url", "browser"})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[Any]:
    from tests.workers_support import taskpush_server  # it imports this module

    proc = taskpush_server(workdir)
    yield proc
    proc.cleanup()


@pytest.fixture(scope="module")
def redis(workdir: Path) -> Iterator[Any]:
    from tests.workers_support import redis_server  # it imports this module

    yield from redis_server(workdir)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
