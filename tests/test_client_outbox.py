"""The client's queue without I/O (taskpush_client.outbox): what is coalesced, what one
request takes, what is retried, how answers are read."""

from __future__ import annotations

import json

from taskpush_client.outbox import (
    MAX_BATCH,
    MAX_BATCH_BYTES,
    Item,
    Outbox,
    batch_body,
    batch_size,
    read_batch,
    retry_after,
)


def item(task: str, status: str | None = None, kind: str = "event", **fields: object) -> Item:
    body = {"status": status, **fields} if status else {"task_id": task, "user_id": 1}
    return Item(kind, task, body, deadline=10.0, queued_at=0.0)


def test_progress_is_merged_latest_wins_field_by_field() -> None:
    box = Outbox()
    first = box.put(item("t", "progress", progress=10, message="a", step="1/3"))
    assert box.put(item("t", "progress", progress=20, message="b")) is first
    assert box.put(item("t", "progress", progress=30)) is first
    assert len(box) == 1 and box.coalesced == 2
    assert first.body == {"status": "progress", "progress": 30, "message": "b", "step": "1/3"}


def test_state_changes_are_never_merged_nor_merged_across() -> None:
    box = Outbox()
    box.put(item("t", "progress", progress=10))
    box.put(item("t", "running", step="retry 1"))
    box.put(item("t", "progress", progress=5))
    box.put(item("t", "completed"))
    box.put(item("t", "progress", progress=100))
    assert [i.body["status"] for i in box.queue] == ["progress", "running", "progress",
                                                     "completed", "progress"]
    assert box.coalesced == 0


def test_other_tasks_do_not_block_coalescing() -> None:
    box = Outbox()
    a = box.put(item("a", "progress", progress=1))
    box.put(item("b", "progress", progress=1))
    assert box.put(item("a", "progress", progress=2)) is a
    assert [i.task_id for i in box.queue] == ["a", "b"]


def test_only_progress_waits_for_more() -> None:
    box = Outbox()
    box.put(Item("event", "t", {"status": "progress"}, deadline=9, queued_at=3.0))
    assert box.oldest_progress_only() == 3.0
    box.put(item("u", "completed"))
    assert box.oldest_progress_only() is None  # a state change flushes at once


def test_a_request_is_a_registration_alone_or_a_run_of_events() -> None:
    box = Outbox()
    box.put(item("t", kind="register"))
    for n in range(MAX_BATCH + 5):
        box.put(item(f"e{n}", "running"))
    box.put(item("z", kind="register"))
    assert [i.kind for i in box.take()] == ["register"]
    assert len(box.take()) == MAX_BATCH
    assert len(box.take()) == 5
    assert [i.kind for i in box.take()] == ["register"]
    assert box.take() == []


def test_a_batch_is_capped_by_its_size_in_order() -> None:
    """40 completed events with 50 KB results: batches of at most MAX_BATCH_BYTES each
    (not one 2 MB request the server would refuse whole), the events in queue order, each
    body exactly what the sender posts; an event larger than the cap goes alone."""
    box = Outbox()
    for n in range(40):
        box.put(item(f"j{n}", "completed", result={"blob": "r" * 50_000}))
    batches = []
    while taken := box.take():
        batches.append(taken)
    assert [i.task_id for b in batches for i in b] == [f"j{n}" for n in range(40)]
    assert len(batches) == 4  # ten 50 KB events fit in 512 KiB, eleven do not
    for batch in batches:
        body = batch_body(batch)
        assert len(body) == batch_size(batch) <= MAX_BATCH_BYTES
        assert json.loads(body) == {"events": [i.wire() for i in batch]}
    box.put(item("small", "running"))
    box.put(item("huge", "completed", result="x" * 3000))
    box.put(item("after", "running"))
    assert [i.task_id for i in box.take(max_bytes=1000)] == ["small"]
    assert [i.task_id for i in box.take(max_bytes=1000)] == ["huge"]  # alone, not stuck
    assert [i.task_id for i in box.take(max_bytes=1000)] == ["after"]


def test_an_event_that_is_not_json_is_taken_alone_in_its_place() -> None:
    """NaN, a lone surrogate or a Python object cannot be sent: such an event is taken with
    `problem` set (the sender drops it with a warning) and adds nothing to the body, so
    it cannot make the server refuse its neighbours' request."""
    box = Outbox()
    box.put(item("a", "running"))
    box.put(item("nan", "progress", progress=float("nan")))
    box.put(item("surrogate", "running", message="\ud800"))
    box.put(item("object", "completed", result=object()))
    box.put(item("b", "completed"))
    taken = box.take()
    assert [i.task_id for i in taken] == ["a", "nan", "surrogate", "object", "b"]
    bad = [i for i in taken if i.problem]
    assert [i.task_id for i in bad] == ["nan", "surrogate", "object"]
    assert all("not JSON" in i.problem and i.task_id in i.problem for i in bad)
    sendable = [i for i in taken if not i.problem]
    assert json.loads(batch_body(sendable)) == {"events": [i.wire() for i in sendable]}


def test_a_merged_progress_event_is_serialized_again() -> None:
    """A take that stopped before an event serialized it; progress merged into it later
    must be what is sent (and a later value may mend one that was not JSON)."""
    box = Outbox()
    first = box.put(item("t", "progress", progress=1))
    first.encode()
    bad = box.put(item("u", "progress", progress=float("nan")))
    bad.encode()
    assert bad.problem
    box.put(item("t", "progress", progress=2))
    box.put(item("u", "progress", progress=3))
    t, u = box.take()
    assert json.loads(t.encoded)["progress"] == 2
    assert u.problem is None and json.loads(u.encoded)["progress"] == 3


def test_what_is_worth_retrying() -> None:
    assert retry_after(None) == 0.0  # no answer at all: connection refused, reset, timeout
    for status in (408, 429, 502, 503, 504):
        assert retry_after(status) == 0.0
    assert retry_after(503, {"retry-after": "2"}) == 2.0
    assert retry_after(503, {"retry-after": "99999"}) == 30.0  # capped
    for status in (200, 400, 401, 403, 404, 409, 413, 500):
        assert retry_after(status) is None


def test_batch_answers_are_read_per_event() -> None:
    items = [item("a", "progress"), item("b", "progress"), item("c", "completed"),
             item("d", "progress")]
    body = {"data": {"results": [
        {"task_id": "a", "ok": True, "seq": 4},
        {"task_id": "b", "ok": False, "code": 409, "message": "final", "cancel_requested": True},
        {"task_id": "c", "ok": False, "code": 409, "message": "already completed"},
        {"task_id": "d", "ok": False, "code": 404, "message": "not found"}]}}
    a, b, c, d = read_batch(items, 200, body)
    assert a.value == {"task_id": "a", "ok": True, "seq": 4} and not a.problem
    assert b.cancelled and not b.problem
    assert not c.cancelled and not c.problem  # the terminal rule, not a problem
    assert d.problem and "404" in d.problem
    assert all(o.problem for o in read_batch(items, 401, {"message": "wrong key"}))


def test_batch_wire_form_carries_the_idempotency_key() -> None:
    one = item("t", "progress", progress=5)
    assert one.wire() == {"task_id": "t", "status": "progress", "progress": 5,
                          "idempotency_key": one.key}
    assert item("t", "progress").key != item("t", "progress").key
