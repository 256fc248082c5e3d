from tests.conftest import event, handshake, recv_until, register, ws_connect


async def test_update_reaches_owner_socket(client):
    ws = await ws_connect(client, 1)
    connected, active = await handshake(ws)
    assert active == {"type": "active_tasks", "tasks": [], "count": 0}
    await register(client, "t1", 1)
    await event(client, "t1", "progress", progress=40, message="half")
    seen = await recv_until(ws, lambda m: m.get("progress") == 40)
    assert seen[-1]["type"] == "task_status" and seen[-1]["status"] == "progress"
    assert seen[-1]["seq"] > connected["seq"]
    await ws.close()
