"""Cluster mode in one process: two `create_app(config)` apps on one PostgreSQL database
are two nodes, each served through aiohttp's test server (real sockets, a real
PostgreSQL server from tests/pg.py). What SPEC's "Cluster mode" promises across nodes:
changes made through one node reach sockets on the other in seq order with no gap, resume
and long polls work on any node, cancels reach the node running the task, the shared
settings and the cluster-wide jobs, gone nodes, and the database failing under them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from server import keys
from server.app import create_app
from server.config import Config
from tests.conftest import (
    event,
    handshake,
    recv_until,
    register,
    ws_connect,
)

Node = Any  # an aiohttp TestClient
MakeNode = Callable[..., Awaitable[Node]]


@pytest.fixture
def make_node(aiohttp_client: Any, config: Config, pg_url: str) -> MakeNode:
    """make_node(name, **config_changes) -> a TestClient on a fresh app (a node) serving
    the test's PostgreSQL database."""

    async def factory(name: str, **changes: Any) -> Node:
        app: web.Application = create_app(config.replace(db=pg_url, node_name=name,
                                                         **changes))
        return await aiohttp_client(app)

    return factory


async def two_nodes(make_node: MakeNode, **changes: Any) -> tuple[Node, Node]:
    return await make_node("node-a", **changes), await make_node("node-b", **changes)


def statuses(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["task_id"], m["status"]) for m in messages if m["type"] == "task_status"]


# ---- fan-out --------------------------------------------------------------------------------


async def test_a_socket_on_b_receives_a_change_made_through_a_over_http(make_node):
    a, b = await two_nodes(make_node)
    ws = await ws_connect(b, 1)
    await handshake(ws)
    await register(a, "cross-1")
    created = await recv_until(ws, lambda m: m["type"] == "task_status")
    assert created[-1]["task_id"] == "cross-1"
    await event(a, "cross-1", "progress", progress=40, message="through A")
    got = await recv_until(ws, lambda m: m.get("progress") == 40)
    assert got[-1]["message"] == "through A"
    assert got[-1]["seq"] > created[-1]["seq"]
    await ws.close()


async def test_a_socket_on_b_receives_an_in_process_change_made_on_a(make_node):
    a, b = await two_nodes(make_node)
    ws = await ws_connect(b, 7)
    await handshake(ws)
    tasks_a = a.app[keys.TASKS]
    from server.model import Change, Register

    await tasks_a.register(Register("inproc-1", 7, "job", origin="inprocess"))
    await tasks_a.change(Change("inproc-1", "running", message="on A, in-process"))
    got = await recv_until(ws, lambda m: m.get("status") == "running")
    assert got[-1]["message"] == "on A, in-process"
    assert ("inproc-1", "pending") in statuses(got)
    await ws.close()
