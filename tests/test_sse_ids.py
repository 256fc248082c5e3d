"""SSE ids never claim more than was sent: a task's state read out of order (an admin's
subscription) carries the stream's current point, not its own seq, so a resume with
`Last-Event-ID` never skips a change of the stream's own user."""

from __future__ import annotations

from typing import Any

from server.web import keys, sse
from tests.cluster_support import eventually
from tests.conftest import Client, event, make_token, register
from tests.support import events_until, next_event, stream


async def test_a_subscribed_state_read_ahead_carries_the_streams_point(client: Client
                                                                       ) -> None:
    await register(client, "theirs", user_id=2)
    await register(client, "own", user_id=9)
    admin = await stream(client, 9, token=make_token(9, admin=True))
    got = await events_until(admin, "active_tasks")
    point = got[-1]["id"]
    epoch, _, seq = point.partition(":")
    assert int(seq) == got[0]["data"]["seq"]
    # a change the stream does not carry (another user's task, not subscribed yet)
    ahead = await event(client, "theirs", "progress", progress=40)
    assert ahead["seq"] > int(seq)
    streams: list[Any] = []

    def the_stream() -> bool:
        streams[:] = [s for s in client.server.app[keys.SOCKETS] if isinstance(s, sse.Stream)]
        return len(streams) == 1

    await eventually(the_stream, 5, "the admin's stream attached")
    # what `&task_id=theirs` does after the snapshot, done now: the state read is ahead
    await streams[0].subscribe("theirs", client.server.app[keys.STORE])
    got = await events_until(admin, "task_status")
    current = got[-1]
    assert (current["data"]["task_id"], current["data"]["seq"]) == ("theirs", ahead["seq"])
    assert current["id"] == point  # not f"{epoch}:{ahead['seq']}": nothing of user 9 after
    # the stream's own user's next change moves the point on, in order
    mine = await event(client, "own", "running")
    live = await next_event(admin)
    assert (live["data"]["task_id"], live["id"]) == ("own", f"{epoch}:{mine['seq']}")
