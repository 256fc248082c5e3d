"""The `connected` message says what was established (a socket, or an event stream) and,
in cluster mode, which node holds it (`node`: the demo page shows it)."""

from __future__ import annotations

from typing import Any

from tests.conftest import MakeClient, handshake, ws_connect
from tests.support import next_event, stream


async def connected_of_both(client: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ws = await ws_connect(client, 1)
    on_socket, _ = await handshake(ws)
    await ws.close()
    events = await stream(client, 1)
    on_stream = (await next_event(events))["data"]
    events.close()
    return on_socket, on_stream


async def test_connected_names_its_transport_and_no_node_outside_a_cluster(
        make_client: MakeClient) -> None:
    on_socket, on_stream = await connected_of_both(await make_client())
    assert on_socket["message"] == "WebSocket connection established"
    assert on_stream["message"] == "Server-Sent Events stream established"
    assert "node" not in on_socket and "node" not in on_stream


async def test_connected_names_the_cluster_node_that_holds_it(make_client: MakeClient,
                                                              pg_url: str) -> None:
    a = await make_client(db=pg_url, node_name="node-a")
    b = await make_client(db=pg_url, node_name="node-b")
    for client, name in ((a, "node-a"), (b, "node-b")):
        on_socket, on_stream = await connected_of_both(client)
        assert on_socket["node"] == on_stream["node"] == name
        assert on_stream["message"] == "Server-Sent Events stream established"
