"""server/protocol.py without sockets: client message parsing, the Outbox rules
(coalescing, dedupe, bound) and the RateLimiter."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from server import protocol
from server.protocol import ClientMessage, Outbox, ProtocolError, RateLimiter, Update, text_frame

# ---- parse_client_message -----------------------------------------------------------------

def parse(obj: Any) -> ClientMessage:
    return protocol.parse_client_message(obj if isinstance(obj, str) else json.dumps(obj))


def code_of(obj: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        parse(obj)
    assert info.value.message  # always a human-readable message too
    return info.value.code


def test_ping():
    assert parse({"type": "ping"}) == ClientMessage("ping")


def test_ping_ignores_extra_fields():
    assert parse({"type": "ping", "id": 7, "task_id": []}) == ClientMessage("ping")


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_task_messages(kind):
    assert parse({"type": kind, "task_id": "interview_123"}) == ClientMessage(kind, "interview_123")


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_task_id_int_is_accepted_as_string(kind):
    assert parse({"type": kind, "task_id": 42}).task_id == "42"


def test_task_id_at_limit_is_accepted():
    assert parse({"type": "subscribe", "task_id": "x" * 200}).task_id == "x" * 200


def test_refresh():
    assert parse({"type": "refresh", "token": "abc.def.ghi"}) == ClientMessage(
        "refresh", token="abc.def.ghi")


@pytest.mark.parametrize("text", ["", "{", "not json", "{'type': 'ping'}", "[1,", "\x00",
                                  "[" * 100000 + "]" * 100000])
def test_bad_json(text):
    assert code_of(text) == "invalid_json"


@pytest.mark.parametrize("value", [[], [{"type": "ping"}], "ping", 1, 1.5, None, True])
def test_non_object(value):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_client_message(json.dumps(value))
    assert info.value.code == "invalid_message"


@pytest.mark.parametrize("obj", [{}, {"task_id": "t"}, {"type": None}, {"type": 1},
                                 {"type": ["ping"]}, {"type": {"x": 1}}, {"Type": "ping"}])
def test_missing_or_non_string_type(obj):
    assert code_of(obj) == "missing_type"


@pytest.mark.parametrize("kind", ["", "PING", "pong", "hello", "subscribe ", "x" * 10000])
def test_unknown_type(kind):
    with pytest.raises(ProtocolError) as info:
        parse({"type": kind})
    assert info.value.code == "unknown_type"
    assert len(info.value.message) < 100  # an enormous type is not echoed back whole


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
@pytest.mark.parametrize("task_id", [None, "", [], {}, ["t1"], 1.5, True, False])
def test_task_id_missing_or_wrong_type(kind, task_id):
    obj: dict[str, Any] = {"type": kind}
    if task_id is not None:
        obj["task_id"] = task_id
    assert code_of(obj) == "missing_field"


@pytest.mark.parametrize("task_id", ["x" * 201, "a\nb", "tab\there", "\x00", "\u200bzw"])
def test_task_id_too_long_or_unprintable(task_id):
    assert code_of({"type": "subscribe", "task_id": task_id}) == "invalid_field"


@pytest.mark.parametrize("token", [None, "", 1, ["a"], {"t": 1}, True])
def test_refresh_without_token(token):
    obj: dict[str, Any] = {"type": "refresh"}
    if token is not None:
        obj["token"] = token
    assert code_of(obj) == "missing_field"


# ---- server messages ----------------------------------------------------------------------

def test_connected_message_shape():
    cid = str(uuid.uuid4())
    msg = json.loads(protocol.connected(cid, "epoch1", 17))
    assert msg["type"] == "connected" and msg["connection_id"] == cid
    assert msg["epoch"] == "epoch1" and msg["seq"] == 17
    assert msg["timestamp"].endswith("Z") and msg["message"]


def test_error_and_pong_shapes():
    assert json.loads(protocol.error("bad", "why")) == {"type": "error", "code": "bad",
                                                        "message": "why"}
    pong = json.loads(protocol.pong())
    assert pong["type"] == "pong" and pong["timestamp"].endswith("Z")


def test_task_deleted_shape():
    assert json.loads(protocol.task_deleted("t1")) == {"type": "task_deleted", "task_id": "t1"}


def test_dumps_keeps_unicode_readable():
    assert protocol.dumps({"m": "正在生成"}) == '{"m":"正在生成"}'


# ---- Outbox --------------------------------------------------------------------------------

def upd(task_id: str, seq: int, status: str = "progress") -> Update:
    return Update(task_id, 1, seq, status, f"{task_id}:{seq}:{status}")


def drain(box: Outbox) -> list[tuple[str, int, str]]:
    out = []
    while (u := box.pop()) is not None:
        out.append((u.task_id, u.seq, u.status))
    return out


def live(limit: int = 100) -> Outbox:
    box = Outbox(limit)
    box.end_replay()
    return box


def test_outbox_fifo_by_seq():
    box = live()
    for seq, task in enumerate(["a", "b", "c"], start=1):
        assert box.push(upd(task, seq, "running"))
    assert drain(box) == [("a", 1, "running"), ("b", 2, "running"), ("c", 3, "running")]
    assert box.pop() is None and len(box) == 0


def test_outbox_coalesces_progress_of_same_task():
    box = live()
    for seq in range(1, 11):
        box.push(upd("a", seq))
    assert len(box) == 1 and box.merged == 9
    assert drain(box) == [("a", 10, "progress")]


def test_outbox_coalesced_update_moves_to_its_new_seq():
    box = live()
    box.push(upd("a", 1))
    box.push(upd("b", 2))
    box.push(upd("a", 3))
    assert drain(box) == [("b", 2, "progress"), ("a", 3, "progress")]


def test_outbox_keeps_status_changes():
    box = live()
    box.push(upd("a", 1, "pending"))
    box.push(upd("a", 2, "running"))
    box.push(upd("a", 3, "progress"))
    box.push(upd("a", 4, "progress"))
    assert drain(box) == [("a", 1, "pending"), ("a", 2, "running"), ("a", 4, "progress")]


@pytest.mark.parametrize("terminal", ["completed", "failed", "cancelled"])
def test_outbox_never_merges_terminal(terminal):
    box = live()
    box.push(upd("a", 1))
    box.push(upd("a", 2, terminal))
    box.push(upd("a", 3, terminal))  # (cannot happen in practice; still never merged)
    assert drain(box) == [("a", 1, "progress"), ("a", 2, terminal), ("a", 3, terminal)]


def test_outbox_never_merges_deletion():
    box = live()
    box.push(upd("a", 1, "deleted"))
    box.push(upd("a", 2, "deleted"))
    assert drain(box) == [("a", 1, "deleted"), ("a", 2, "deleted")]


def test_outbox_drops_older_or_equal_seq_of_queued_task():
    box = live()
    box.push(upd("a", 5))
    assert box.push(upd("a", 5))
    assert box.push(upd("a", 3))
    assert drain(box) == [("a", 5, "progress")]


def test_outbox_bound_counts_after_merge():
    box = live(limit=2)
    assert box.push(upd("a", 1))
    assert box.push(upd("b", 2))
    for seq in range(3, 50):  # all merge into b's slot
        assert box.push(upd("b", seq))
    assert not box.push(upd("c", 50))  # a third distinct task: over the bound


def test_outbox_bound_counts_unmergeable():
    box = live(limit=3)
    assert box.push(upd("a", 1, "pending"))
    assert box.push(upd("a", 2, "running"))
    assert box.push(upd("a", 3, "progress"))
    assert not box.push(upd("a", 4, "completed"))


def test_outbox_bound_frees_as_popped():
    box = live(limit=1)
    assert box.push(upd("a", 1, "running"))
    assert box.pop() is not None
    assert box.push(upd("b", 2, "running"))


def test_outbox_snapshot_dedupe_during_replay():
    """Live updates queued before the snapshot was read are dropped if it covered them."""
    box = Outbox(100)
    box.push(upd("a", 3))  # committed while the snapshot was being read
    box.push(upd("b", 4))
    box.mark_sent("a", 3)  # the snapshot already carried a@3
    box.mark_sent("b", 2)  # ...but b only at 2
    box.end_replay()
    assert drain(box) == [("b", 4, "progress")]


def test_outbox_replay_drops_later_push_at_or_below_sent():
    box = Outbox(100)
    box.mark_sent("a", 7)
    box.end_replay()  # a is not queued: no longer remembered
    assert box.push(upd("a", 8))
    assert drain(box) == [("a", 8, "progress")]
    box2 = Outbox(100)
    box2.push(upd("a", 9))
    box2.mark_sent("a", 7)
    box2.end_replay()  # a is queued: remembered until its queued update goes
    assert box2.push(upd("a", 6))
    assert box2.push(upd("a", 7))
    assert drain(box2) == [("a", 9, "progress")]


def test_outbox_mark_sent_keeps_the_highest_seq_and_refuses_an_older_one():
    """`active_tasks` carried a@9 (a commit landed between two page reads), the replay then
    holds a@5: that older state is refused (not sent), and the live a@9 queued meanwhile
    is not sent again."""
    box = Outbox(100)
    box.push(upd("a", 9))  # the live update of the commit, queued while snapshotting
    assert box.mark_sent("a", 9)  # active_tasks
    assert not box.mark_sent("a", 5)  # the replay's older state: skipped
    assert box.mark_sent("a", 9)  # the same state again is the SPEC's replay: written
    box.end_replay()
    assert drain(box) == []


def test_outbox_pop_is_none_when_empty():
    assert live().pop() is None


def test_update_mergeable():
    assert upd("a", 1, "progress").mergeable
    assert upd("a", 1, "running").mergeable
    assert upd("a", 1, "pending").mergeable
    for status in ("completed", "failed", "cancelled", "deleted"):
        assert not upd("a", 1, status).mergeable


def test_outbox_many_tasks_keep_every_terminal():
    """Coalescing never loses a terminal state, whatever the interleaving."""
    box = live(limit=10_000)
    seq = 0
    for round_ in range(20):
        for task in "abcde":
            seq += 1
            box.push(upd(task, seq, "progress"))
            if round_ == 19:
                seq += 1
                box.push(upd(task, seq, "completed"))
    out = drain(box)
    terminals = [(t, s) for t, _, s in out if s == "completed"]
    assert sorted(t for t, _ in terminals) == list("abcde")
    seqs = [s for _, s, _ in out]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    for task in "abcde":  # the last thing of each task is its terminal state
        assert [s for t, _, s in out if t == task][-1] == "completed"


# ---- RateLimiter ---------------------------------------------------------------------------

def test_rate_limiter_burst_then_refuse():
    rl = RateLimiter(rate=1.0, burst=3, strikes=5)
    t = rl.stamp
    assert [rl.allow(t) for _ in range(4)] == [True, True, True, False]
    assert rl.strikes == 1 and not rl.flooding


def test_rate_limiter_refills_at_rate():
    rl = RateLimiter(rate=2.0, burst=2, strikes=5)
    t = rl.stamp
    assert rl.allow(t) and rl.allow(t) and not rl.allow(t)
    assert rl.allow(t + 0.5)  # 0.5 s * 2/s = one token
    assert not rl.allow(t + 0.5)


def test_rate_limiter_refill_capped_at_burst():
    rl = RateLimiter(rate=100.0, burst=2, strikes=5)
    t = rl.stamp
    assert [rl.allow(t + 1000) for _ in range(3)] == [True, True, False]


def test_rate_limiter_flooding_after_strikes_in_a_row():
    rl = RateLimiter(rate=1.0, burst=1, strikes=3)
    t = rl.stamp
    assert rl.allow(t)
    for _ in range(2):
        assert not rl.allow(t)
    assert not rl.flooding
    assert not rl.allow(t)
    assert rl.flooding


def test_rate_limiter_allowed_message_resets_strikes():
    rl = RateLimiter(rate=1.0, burst=1, strikes=3)
    t = rl.stamp
    rl.allow(t)
    rl.allow(t)
    rl.allow(t)
    assert rl.strikes == 2
    assert rl.allow(t + 1.0)
    assert rl.strikes == 0 and not rl.flooding


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frame_is_an_unmasked_final_text_frame_with_each_length_form(size: int) -> None:
    text = "é" * (size // 2) + "x" * (size % 2)  # multi-byte UTF-8: length is in bytes
    payload = text.encode()
    frame = text_frame(text)
    assert frame[0] == 0x81  # FIN + text opcode, no RSV bits
    assert frame[1] & 0x80 == 0  # a server never masks
    code = frame[1] & 0x7F
    if len(payload) < 126:
        assert code == len(payload) and frame[2:] == payload
    elif len(payload) < 65536:
        assert code == 126 and int.from_bytes(frame[2:4], "big") == len(payload)
        assert frame[4:] == payload
    else:
        assert code == 127 and int.from_bytes(frame[2:10], "big") == len(payload)
        assert frame[10:] == payload


def test_update_carries_its_frame() -> None:
    update = upd("t1", 3)
    assert update.frame == text_frame(update.text)


def test_outbox_floor_drops_older_states_of_a_task_sent_out_of_band() -> None:
    """A subscribe may read a task's newest state before the commit's own pushes arrive:
    those older pushes must not take the client back."""
    box = Outbox(10)
    box.end_replay()
    assert box.push(upd("t1", 9, "completed"))  # what the subscribe read and sent
    box.raise_floor("t1", 9)
    assert box.pop().seq == 9
    for seq, status in ((7, "progress"), (8, "progress"), (9, "completed")):
        assert box.push(upd("t1", seq, status))  # the commit's pushes, late
    assert box.pop() is None
    assert box.push(upd("t2", 3))  # other tasks are not affected
    assert box.push(upd("t1", 10, "failed"))  # newer than the floor: sent (and floor gone)
    assert [box.pop().seq, box.pop().seq] == [3, 10]
