"""server/push/ (messages, frames, outbox, session) without sockets: client message
parsing, the Outbox rules (coalescing, dedupe, bound), the RateLimiter, and the per-socket
Session's decisions (rate limit and flood, token expiry, pings and dead peers, stuck sends,
subscribe rules)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from server.core.auth import Identity
from server.core.model import Task
from server.push import messages
from server.push.frames import text_frame
from server.push.messages import (
    TOO_SLOW,
    ClientMessage,
    ProtocolError,
    Update,
    connected,
    dumps,
    error,
    parse_client_message,
    pong,
    status_update,
    task_deleted,
)
from server.push.outbox import Outbox
from server.push.session import (
    EXPIRY_NOTICE,
    OP_BINARY,
    OP_BROKEN,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    STOP,
    Close,
    Pong,
    RateLimiter,
    Refresh,
    Session,
    SessionLimits,
    Subscribe,
    Tick,
    Unsubscribe,
)

# ---- parse_client_message -----------------------------------------------------------------

def parse(obj: Any) -> ClientMessage:
    return parse_client_message(obj if isinstance(obj, str) else json.dumps(obj))


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
        parse_client_message(json.dumps(value))
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
    msg = json.loads(connected(cid, "epoch1", 17))
    assert msg["type"] == "connected" and msg["connection_id"] == cid
    assert msg["epoch"] == "epoch1" and msg["seq"] == 17
    assert msg["timestamp"].endswith("Z") and msg["message"]


def test_error_and_pong_shapes():
    assert json.loads(error("bad", "why")) == {"type": "error", "code": "bad",
                                                        "message": "why"}
    pong = json.loads(messages.pong())
    assert pong["type"] == "pong" and pong["timestamp"].endswith("Z")


def test_task_deleted_shape():
    assert json.loads(task_deleted("t1")) == {"type": "task_deleted", "task_id": "t1"}


def test_dumps_keeps_unicode_readable():
    assert dumps({"m": "正在生成"}) == '{"m":"正在生成"}'


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
    box.end_replay()
    assert box.push(upd("a", 8))
    assert drain(box) == [("a", 8, "progress")]
    box2 = Outbox(100)
    box2.push(upd("a", 9))
    box2.mark_sent("a", 7)
    box2.end_replay()  # a is queued: remembered until its queued update goes
    assert box2.push(upd("a", 6))
    assert box2.push(upd("a", 7))
    assert drain(box2) == [("a", 9, "progress")]


def test_outbox_a_state_the_snapshot_sent_ahead_of_live_updates_is_not_sent_again():
    """A node behind the database: its snapshot read a@9 and b@11 while its live updates
    had reached seq 8 only. When they come, they are not sent a second time; once live
    updates have passed them, nothing more is remembered."""
    box = Outbox(100)
    box.push(upd("z", 8))
    assert box.mark_sent("a", 9) and box.mark_sent("b", 11) and box.mark_sent("c", 3)
    box.end_replay()
    assert drain(box) == [("z", 8, "progress")]
    assert box.push(upd("a", 9))
    assert box.push(upd("x", 10))
    assert box.push(upd("b", 11))
    assert box.push(upd("a", 12))
    assert drain(box) == [("x", 10, "progress"), ("a", 12, "progress")]
    assert box._mark == {}


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


# ---- Session: one socket's state and decisions, no I/O -------------------------------------

LIMITS = SessionLimits(send_queue=4, rate=20.0, burst=40, strikes=3, max_subscriptions=2,
                       control=3)


def session(user_id: int = 1, *, admin: bool = False, expires_at: float | None = None,
            limits: SessionLimits = LIMITS, live: bool = True) -> Session:
    """A session; `live`: its snapshot is written (live updates flow)."""
    s = Session(Identity(user_id, admin, expires_at), limits)
    if live:
        s.snapshot_written()
    return s


def text(obj: Any) -> str:
    return json.dumps(obj)


def kinds(actions: tuple[Any, ...]) -> list[str]:
    """The `type` of each message the actions ask to send (a str is a message)."""
    return [json.loads(a)["type"] for a in actions if isinstance(a, str)]


def task(task_id: str, user_id: int, seq: int = 1, status: str = "running") -> Task:
    return Task(task_id=task_id, user_id=user_id, task_type="x", status=status, progress=0,
                message=None, step=None, result=None, error=None, error_type=None,
                metadata=None, created_at="", updated_at="", seq=seq, cancel_requested=False)


def test_session_answers_text_messages_and_frames() -> None:
    s = session()
    assert kinds(s.receive(OP_TEXT, text({"type": "ping"}))) == ["pong"]
    assert s.receive(OP_PING, b"hi") == (Pong(b"hi"),)
    assert kinds(s.receive(OP_BINARY, b"x")) == ["error"]
    assert json.loads(s.receive(OP_BINARY, b"x")[0])["code"] == "binary_frame"
    bad = s.receive(OP_TEXT, "{nope")
    assert kinds(bad) == ["error"] and json.loads(bad[0])["code"] == "invalid_json"
    assert s.receive(OP_TEXT, text({"type": "subscribe", "task_id": "t1"})) == (
        Subscribe("t1"),)
    assert s.receive(OP_TEXT, text({"type": "refresh", "token": "j.w.t"})) == (
        Refresh("j.w.t"),)
    assert s.receive(OP_PONG, b"") == ()
    assert s.receive(OP_BROKEN, None) == (STOP,)
    s.close(1000, "bye")
    assert s.receive(OP_TEXT, text({"type": "ping"})) == (STOP,)  # closing: read no more


def test_session_rate_limit_warns_once_then_closes_1008() -> None:
    s = session(limits=SessionLimits(send_queue=4, rate=1e-9, burst=2, strikes=3,
                                     max_subscriptions=2))
    ping = text({"type": "ping"})
    assert kinds(s.receive(OP_TEXT, ping)) == ["pong"]
    assert s.receive(OP_PING, b"") == (Pong(b""),)  # control frames count too
    refused = s.receive(OP_TEXT, ping)  # the first refusal says so, once
    assert json.loads(refused[0])["code"] == "rate_limited"
    assert s.receive(OP_TEXT, ping) == ()  # then silence
    assert s.receive(OP_BINARY, b"x") == (Close(1008, "message rate limit exceeded"),)


def test_session_the_pong_answering_our_ping_is_free() -> None:
    s = session(limits=SessionLimits(send_queue=4, rate=1e-9, burst=1, strikes=2,
                                     max_subscriptions=2))
    assert s.clock(10.0, backed_up=False, send_timeout=10, ping_timeout=5, ping=True) is (
        Tick.PING)
    s.pinged(10.0)
    assert s.receive(OP_PONG, b"") == ()  # answers our ping: not counted
    assert s.ping_sent_at == 0.0  # alive
    assert kinds(s.receive(OP_TEXT, text({"type": "ping"}))) == ["pong"]  # the one token
    assert s.receive(OP_PONG, b"") != ()  # an unsolicited pong is counted


def test_session_pings_once_until_answered_and_a_silent_peer_is_dead() -> None:
    s = session()
    tick = dict(send_timeout=10, ping_timeout=5)
    assert s.clock(10.0, backed_up=False, ping=False, **tick) is None  # not due
    assert s.clock(10.0, backed_up=False, ping=True, **tick) is Tick.PING
    s.pinged(10.0)
    assert s.clock(12.0, backed_up=False, ping=True, **tick) is None  # one ping at a time
    assert s.clock(15.5, backed_up=False, ping=True, **tick) is Tick.DEAD
    s.receive(OP_TEXT, text({"type": "ping"}))  # any frame answers it
    assert s.clock(16.0, backed_up=False, ping=True, **tick) is Tick.PING


def test_session_is_not_pinged_nor_dead_while_writing_its_snapshot() -> None:
    s = session(live=False)
    s.pinged(1.0)
    for now in (10.0, 100.0):
        assert s.clock(now, backed_up=False, send_timeout=10, ping_timeout=5,
                       ping=True) is None
    s.snapshot_written()
    assert s.clock(101.0, backed_up=False, send_timeout=10, ping_timeout=5,
                   ping=True) is Tick.DEAD


def test_session_a_stuck_send_or_backlog_is_closed_4408() -> None:
    s = session()
    s.send_began(1.0)
    assert s.clock(5.0, backed_up=False, send_timeout=10, ping_timeout=5, ping=True) is None
    assert s.clock(11.5, backed_up=False, send_timeout=10, ping_timeout=5,
                   ping=True) == Close(4408, TOO_SLOW)
    s = session(live=False)  # a snapshot page left unread in the transport
    assert s.clock(10.0, backed_up=True, send_timeout=10, ping_timeout=5, ping=True) is None
    assert s.backed_up_since == 10.0
    assert s.clock(20.5, backed_up=True, send_timeout=10, ping_timeout=5,
                   ping=True) == Close(4408, TOO_SLOW)
    s = session()  # a backlog that drains in time is forgiven
    s.clock(10.0, backed_up=True, send_timeout=10, ping_timeout=5, ping=False)
    s.clock(15.0, backed_up=False, send_timeout=10, ping_timeout=5, ping=False)
    assert s.clock(21.0, backed_up=True, send_timeout=10, ping_timeout=5, ping=False) is None


def test_session_token_notice_then_4401_and_a_refresh_lapses_the_old_clock() -> None:
    s = session(expires_at=1000.0)
    generation = s.restart_token_clock()
    assert s.token_deadlines(leeway=5.0) == (1000.0 - EXPIRY_NOTICE, 1005.0)
    assert s.token_due(generation, final=False) is Tick.NOTICE
    notice = json.loads(s.expiry_notice(970.2))
    assert notice == {"type": "token_expiring", "expires_in": 30}
    assert s.token_due(generation, final=True) == Close(4401, "token expired")
    answer = json.loads(s.refreshed(Identity(1, expires_at=2000.0)))
    assert answer["type"] == "refreshed" and answer["expires_at"].startswith("1970-01-01T00:33")
    newer = s.restart_token_clock()
    assert s.token_due(generation, final=True) is None  # the old deadlines lapse
    assert s.token_due(newer, final=True) == Close(4401, "token expired")
    with pytest.raises(ProtocolError) as info:
        s.refreshed(Identity(2, expires_at=3000.0))
    assert info.value.code == "forbidden" and s.identity.expires_at == 2000.0
    s.close(4401, "token expired")
    assert s.token_due(newer, final=True) is None  # a closing socket is not touched
    assert session().token_deadlines(leeway=5.0) is None  # no exp: no deadline


def test_session_subscribe_own_task_answers_and_sends_its_current_state() -> None:
    s = session(user_id=1)
    assert s.subscribe("t1") is True
    answer, current = s.subscribe_read("t1", task("t1", 1, seq=7))
    assert json.loads(answer) == {"type": "subscribed", "task_id": "t1"}
    assert current is not None and current.seq == 7 and "t1" in s.subscriptions
    assert s.subscribe("t1") is False  # already: not new, not counted twice


def test_session_a_non_admin_cannot_subscribe_to_another_users_or_a_missing_task() -> None:
    s = session(user_id=1)
    for found in (task("t2", 2), None):  # the same answer for both
        new = s.subscribe("t2")
        with pytest.raises(ProtocolError) as info:
            s.subscribe_read("t2", found)
        assert info.value.code == "forbidden"
        assert s.subscribe_failed("t2", new) == Unsubscribe("t2")  # the hub is told
        assert "t2" not in s.subscriptions


def test_session_an_admin_subscribes_to_any_task_even_a_missing_one() -> None:
    s = session(user_id=1, admin=True)
    s.subscribe("t2")
    assert s.subscribe_read("t2", task("t2", 2))[1] is not None
    s.subscribe("later")
    answer, current = s.subscribe_read("later", None)
    assert json.loads(answer)["type"] == "subscribed" and current is None


def test_session_subscription_limit_and_an_existing_one_kept_on_failure() -> None:
    s = session()
    s.subscribe("a")
    s.subscribe("b")
    with pytest.raises(ProtocolError) as info:
        s.subscribe("c")
    assert info.value.code == "too_many_subscriptions"
    assert s.subscribe("a") is False  # at the limit, an existing one is not refused
    assert s.subscribe_failed("a", False) is None and "a" in s.subscriptions
    acts = s.receive(OP_TEXT, text({"type": "unsubscribe", "task_id": "a"}))
    assert acts[0] == Unsubscribe("a") and kinds(acts) == ["unsubscribed"]
    assert "a" not in s.subscriptions
    acts = s.receive(OP_TEXT, text({"type": "unsubscribe", "task_id": "zz"}))
    assert kinds(acts) == ["unsubscribed"] and len(acts) == 1  # nothing for the hub


def test_session_a_non_admin_never_queues_another_users_update() -> None:
    s = session(user_id=1)
    assert s.deliver(Update("theirs", 2, 5, "running", "{}"))  # dropped, not "too slow"
    assert s.next_item() is None
    admin = session(user_id=1, admin=True)
    admin.deliver(Update("theirs", 2, 5, "running", "{}"))
    assert admin.next_item().task_id == "theirs"


def test_session_coalesces_progress_and_sends_control_first() -> None:
    s = session()
    for seq in (1, 2, 3):
        assert s.deliver(upd("t1", seq))
    assert s.send(pong()) is None
    assert json.loads(s.next_item())["type"] == "pong"  # answers go before updates
    update = s.next_item()
    assert (update.task_id, update.seq) == ("t1", 3) and s.outbox.merged == 2
    assert s.next_item() is None and s.control is None  # no empty queue kept


def test_session_live_updates_wait_for_the_snapshot() -> None:
    s = session(live=False)
    assert not s.writable
    s.deliver(upd("t1", 5))
    s.send(pong())
    assert json.loads(s.next_item())["type"] == "pong"
    assert s.next_item() is None  # the update waits: no overtaking the snapshot
    s.snapshot_written()
    assert s.writable and s.next_item().seq == 5


def test_session_too_slow_when_a_queue_is_over_its_bound() -> None:
    s = session()
    for n in range(LIMITS.send_queue):
        assert s.deliver(upd(f"t{n}", n + 1, "completed"))
    assert not s.deliver(upd("one-too-many", 99, "completed"))  # close with TOO_SLOW
    s = session()
    for _ in range(LIMITS.control):
        assert s.send(pong()) is None
    assert s.send(pong()) == Close(4408, TOO_SLOW)


def test_session_is_closed_once() -> None:
    s = session()
    assert s.close(4408, "x") is True
    assert s.close(1001, "y") is False
    assert s.deliver(upd("t1", 1)) and s.next_item() is None  # closing: nothing queued
    assert s.send(pong()) is None and s.control is None
    assert s.clock(100.0, backed_up=True, send_timeout=1, ping_timeout=1, ping=True) is None


def test_session_a_subscribe_read_older_than_a_push_meanwhile_is_not_sent_after_it() -> None:
    """The subscribe's read of the task returns after a newer commit was pushed: the state
    read is dropped, so the client never sees the task's seq go back."""
    s = session(user_id=1, admin=True)
    s.subscribe("t9")
    s.deliver(status_update(task("t9", 2, seq=3)))  # pushed while reading...
    assert s.outbox.pop().seq == 3  # ... and already written to the socket
    _, current = s.subscribe_read("t9", task("t9", 2, seq=2))  # the read saw seq 2
    assert current is not None
    s.deliver_current(current)
    assert s.outbox.pop() is None
    # a later subscribe of the same task, with no push meanwhile, sends its state again
    s.subscribe("t9")
    _, current = s.subscribe_read("t9", task("t9", 2, seq=3))
    assert current is not None and s.deliver_current(current)
    assert [s.outbox.pop().seq] == [3]
