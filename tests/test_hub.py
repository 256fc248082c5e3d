"""server/push/hub.py without sockets: routing of committed outcomes to owners and subscribers,
attach/detach bookkeeping and long-poll waiters. `Recorder` stands in for a socket."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from server.core.model import TASK_FIELDS, Change, Delete, Kind, Outcome, Register, Task
from server.push.hub import Hub, update_for
from server.push.messages import Update, status_update


class Recorder:
    """A test double of a socket: records what the hub delivers to it."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        self.got: list[Update] = []
        self.flushed_after: list[int] = []  # how many updates had arrived at each flush

    def deliver(self, update: Update) -> None:
        self.got.append(update)

    def flush(self) -> None:
        self.flushed_after.append(len(self.got))

    def seqs(self) -> list[int]:
        return [u.seq for u in self.got]


def task(task_id: str, user_id: int, seq: int, status: str = "progress", **kw: Any) -> Task:
    fields: dict[str, Any] = {name: None for name in TASK_FIELDS}
    fields.update(task_id=task_id, user_id=user_id, task_type="x", status=status, progress=0,
                  seq=seq, cancel_requested=False, created_at="c", updated_at="u", **kw)
    return Task(**fields)


def changed(task_id: str, user_id: int, seq: int, status: str = "progress") -> Outcome:
    return Outcome(Change(task_id, status), task=task(task_id, user_id, seq, status), seq=seq)


def test_owner_sockets_all_get_update_and_others_do_not():
    hub = Hub()
    a1, a2, b = Recorder(1), Recorder(1), Recorder(2)
    for conn in (a1, a2, b):
        hub.attach(conn)
    hub.publish([changed("t1", 1, 5)])
    assert a1.seqs() == [5] and a2.seqs() == [5] and b.got == []
    assert hub.updates_published == 1


def test_update_text_is_the_task_status_message():
    hub = Hub()
    a = Recorder(1)
    hub.attach(a)
    hub.publish([changed("t1", 1, 5)])
    msg = json.loads(a.got[0].text)
    assert msg["type"] == "task_status" and msg["task_id"] == "t1" and msg["seq"] == 5
    assert set(TASK_FIELDS) <= set(msg)


def test_one_update_object_shared_by_all_recipients():
    """Serialized once per change, not once per socket."""
    hub = Hub()
    conns = [Recorder(1) for _ in range(5)]
    for c in conns:
        hub.attach(c)
    hub.publish([changed("t1", 1, 1)])
    assert all(c.got[0] is conns[0].got[0] for c in conns)


def test_subscriber_of_other_user_gets_update():
    hub = Hub()
    admin = Recorder(9)
    hub.attach(admin)
    hub.subscribe(admin, "t1")
    hub.publish([changed("t1", 1, 3), changed("t2", 1, 4)])
    assert admin.seqs() == [3]


def test_owner_who_also_subscribed_gets_update_once():
    hub = Hub()
    a = Recorder(1)
    hub.attach(a)
    hub.subscribe(a, "t1")
    hub.publish([changed("t1", 1, 3)])
    assert a.seqs() == [3]


def test_unsubscribe_stops_updates():
    hub = Hub()
    admin = Recorder(9)
    hub.attach(admin)
    hub.subscribe(admin, "t1")
    hub.unsubscribe(admin, "t1")
    hub.unsubscribe(admin, "t1")  # twice is harmless
    hub.publish([changed("t1", 1, 3)])
    assert admin.got == []


def test_detach_removes_sockets_and_subscriptions():
    hub = Hub()
    a, admin = Recorder(1), Recorder(9)
    hub.attach(a)
    hub.attach(admin)
    hub.subscribe(admin, "t1")
    assert hub.connection_count == 2
    hub.detach(a)
    hub.detach(admin, ["t1"])
    hub.detach(admin, ["t1"])  # twice is harmless
    assert hub.connection_count == 0 and hub.connections_of(1) == []
    hub.publish([changed("t1", 1, 3)])
    assert a.got == [] and admin.got == []


def test_connections_of_is_oldest_first():
    hub = Hub()
    conns = [Recorder(1) for _ in range(4)]
    for c in conns:
        hub.attach(c)
    hub.detach(conns[1])
    assert hub.connections_of(1) == [conns[0], conns[2], conns[3]]
    assert hub.connections_of(2) == []


def test_publish_keeps_commit_order():
    hub = Hub()
    a = Recorder(1)
    hub.attach(a)
    hub.publish([changed("t1", 1, 1), changed("t2", 1, 2), changed("t1", 1, 3, "completed")])
    assert a.seqs() == [1, 2, 3]
    assert [u.status for u in a.got] == ["progress", "progress", "completed"]


def test_refused_skipped_and_idempotent_outcomes_are_not_pushed():
    hub = Hub()
    a = Recorder(1)
    hub.attach(a)
    refused = Outcome(Change("t1", "progress"), task=task("t1", 1, 1), seq=1,
                      error=ValueError("no"))
    skipped = Outcome(Change("t1", "progress"), task=task("t1", 1, 1), seq=1, kind=Kind.REFUSED)
    no_task = Outcome(Change("t1", "progress"), seq=2)
    no_seq = Outcome(Change("t1", "progress"), task=task("t1", 1, 1))
    # the same registration again: the task is unchanged (its seq is older than the outcome's)
    again = Outcome(Register("t1", 1, "x"), task=task("t1", 1, 1, "pending"), seq=7,
                    kind=Kind.UNCHANGED)
    hub.publish([refused, skipped, no_task, no_seq, again])
    assert a.got == [] and hub.updates_published == 0


def test_deletion_is_pushed_as_task_deleted():
    hub = Hub()
    a = Recorder(1)
    hub.attach(a)
    gone = Outcome(Delete("t1"), task=task("t1", 1, 4, "completed"), seq=5,
                   kind=Kind.DELETED)
    hub.publish([gone])
    assert len(a.got) == 1
    update = a.got[0]
    assert (update.task_id, update.seq, update.status) == ("t1", 5, "deleted")
    assert json.loads(update.text) == {"type": "task_deleted", "task_id": "t1"}


def test_each_socket_is_flushed_once_after_the_whole_commit_is_queued():
    """So a socket's queue sees every update of a commit before anything is written:
    progress of one task within one commit is coalesced (latest wins)."""
    hub = Hub()
    a, b, watcher, idle = Recorder(1), Recorder(2), Recorder(3), Recorder(1)
    for conn in (a, b, watcher):
        hub.attach(conn)
    hub.subscribe(watcher, "t1")
    hub.publish([changed("t1", 1, 1), changed("t2", 2, 2), changed("t1", 1, 3)])
    assert a.flushed_after == [2] and watcher.flushed_after == [2]
    assert b.flushed_after == [1]
    assert idle.flushed_after == []  # never attached: not touched
    hub.publish([changed("t9", 1, 4, "failed")])
    assert a.flushed_after == [2, 3] and b.flushed_after == [1]


def test_update_for_registration():
    created = Outcome(Register("t1", 1, "x"), task=task("t1", 1, 1, "pending"), seq=1,
                      kind=Kind.CREATED)
    update = update_for(created)
    assert update is not None and update.status == "pending" and update.user_id == 1


def test_owner_sockets_served_in_attach_order():
    hub = Hub()
    order: list[str] = []

    class Named(Recorder):
        def __init__(self, name: str) -> None:
            super().__init__(1)
            self.name = name

        def deliver(self, update: Update) -> None:
            order.append(self.name)

    for name in "abc":
        hub.attach(Named(name))
    hub.publish([changed("t1", 1, 1)])
    assert order == ["a", "b", "c"]


def test_delivery_during_publish_may_detach_safely():
    """A socket closing itself while being delivered to (too slow) does not break the loop."""
    hub = Hub()

    class Quitter(Recorder):
        def deliver(self, update: Update) -> None:
            super().deliver(update)
            hub.detach(self, ["t1"])

    q, other, admin = Quitter(1), Recorder(1), Quitter(9)
    hub.attach(q)
    hub.attach(other)
    hub.attach(admin)
    hub.subscribe(admin, "t1")
    hub.publish([changed("t1", 1, 1)])
    assert q.seqs() == [1] and other.seqs() == [1] and admin.seqs() == [1]
    assert hub.connections_of(1) == [other]


async def test_watching_resolves_on_change_of_that_task_only():
    hub = Hub()
    with hub.watching("t1") as f1, hub.watching("t2") as f2:
        hub.publish([changed("t1", 1, 1)])
        assert f1.done() and not f2.done()
        await asyncio.wait_for(f1, 1)
    assert hub._waiters == {}  # cleaned up on exit


async def test_watching_ignores_refused_changes():
    hub = Hub()
    refused = Outcome(Change("t1", "progress"), task=task("t1", 1, 1), seq=1,
                      error=ValueError("no"))
    with hub.watching("t1") as f:
        hub.publish([refused])
        assert not f.done()


async def test_several_waiters_on_one_task():
    hub = Hub()
    with hub.watching("t1") as f1, hub.watching("t1") as f2:
        hub.publish([changed("t1", 1, 1)])
        assert f1.done() and f2.done()
    with hub.watching("t1") as f3:  # a new watch after the change waits for the next one
        assert not f3.done()
    assert hub._waiters == {}


def test_status_updates():
    ups = [status_update(t) for t in (task("a", 1, 2), task("b", 1, 3, "running"))]
    assert [(u.task_id, u.seq, u.status) for u in ups] == [("a", 2, "progress"),
                                                         ("b", 3, "running")]
    assert json.loads(ups[0].text)["type"] == "task_status"
