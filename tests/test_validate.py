"""Plain unit tests of body validation (server/core/validate.py) and the task state rules
(server/core/model.py): no server, no database."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from server.core import model, validate
from server.core.errors import BadRequest, TaskFinal, TooLarge
from server.core.model import Change, Kind, Outcome, Register, new_task, next_state, public

LIMIT = 1000


# ---- parse_json / json_object ----------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"",
    b"not json",
    b"{",
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": -Infinity}',
    b'{"a": 1e400}',  # beyond a double: read as infinity, it would be stored as null
    b'{"a": [-1E309]}',
    b'{"a": 123456789e999}',
    b"[" * 100_000,
    b'{"a":' * 100_000,
])
def test_parse_json_refuses_malformed(body: bytes) -> None:
    with pytest.raises(BadRequest, match="JSON"):
        validate.parse_json(body)


def test_parse_json_keeps_the_largest_and_tiniest_doubles() -> None:
    assert validate.parse_json(b'{"a": 1.7976931348623157e308, "b": 1e-400}') == {
        "a": 1.7976931348623157e308, "b": 0.0}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, {"a": [1, math.inf]},
                                   (1.0, math.nan)])
def test_bounded_json_refuses_non_finite_numbers(value: object) -> None:
    """An in-process producer's value never went through the parser: same rule."""
    with pytest.raises(BadRequest, match="not finite"):
        validate.bounded_json(value, "result", LIMIT)


def test_parse_json_refuses_invalid_utf8() -> None:
    with pytest.raises(BadRequest, match="UTF-8"):
        validate.parse_json(b'{"message": "\xff\xfe"}')


def test_parse_json_accepts_utf8_and_nesting_within_reason() -> None:
    assert validate.parse_json('{"m": "héllo ✓"}'.encode()) == {"m": "héllo ✓"}
    assert validate.parse_json(b"[" * 50 + b"]" * 50) is not None


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"null", b"true"])
def test_json_object_requires_an_object(body: bytes) -> None:
    with pytest.raises(BadRequest, match="object"):
        validate.json_object(body)


def test_json_object_returns_the_dict() -> None:
    assert validate.json_object(b'{"a": 1}') == {"a": 1}


# ---- task_id ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "", 5, ["a"], "x" * 201, "a\nb", "a\x00b"])
def test_task_id_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="task_id"):
        validate.task_id(value)


def test_task_id_accepted() -> None:
    assert validate.task_id("report_1") == "report_1"
    assert validate.task_id("x" * 200) == "x" * 200
    assert validate.task_id("ünïcode-id") == "ünïcode-id"


def test_task_id_names_where() -> None:
    with pytest.raises(BadRequest, match=r"events\[3\]\.task_id"):
        validate.task_id(None, "events[3].task_id")


# ---- progress --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, False, "50", -1, 101, -0.5, 100.01, math.nan,
                                   math.inf, -math.inf, float("1e309"), [50], {"p": 1}])
def test_progress_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="progress"):
        validate.progress(value)


def test_progress_accepted_and_normalised() -> None:
    assert validate.progress(None) is None
    assert validate.progress(0) == 0
    assert validate.progress(100) == 100
    assert validate.progress(12.5) == 12.5
    fifty = validate.progress(50.0)
    assert fifty == 50 and isinstance(fifty, int)


# ---- bounded_json ----------------------------------------------------------------------

def test_bounded_json_limits_serialized_size() -> None:
    assert validate.bounded_json({"a": "x" * 10}, "result", LIMIT) == {"a": "x" * 10}
    with pytest.raises(TooLarge, match="result"):
        validate.bounded_json({"a": "x" * LIMIT}, "result", LIMIT)
    # measured in UTF-8 bytes, not characters
    with pytest.raises(TooLarge):
        validate.bounded_json("é" * 600, "metadata", LIMIT)


# ---- register_body ---------------------------------------------------------------------

def test_register_body_ok() -> None:
    op = validate.register_body({"task_id": "t1", "user_id": "12", "task_type": "report",
                                 "metadata": {"k": [1, 2]}}, LIMIT)
    assert op == Register("t1", 12, "report", {"k": [1, 2]}, origin="http")
    default = validate.register_body({"user_id": 3, "task_type": "report"}, LIMIT)
    assert default.task_id is None and default.metadata is None


@pytest.mark.parametrize("body, fragment", [
    ({"user_id": 1, "task_type": "t", "owner": 2}, "unknown field"),
    ({"task_type": "t"}, "user_id"),
    ({"user_id": -1, "task_type": "t"}, "user_id"),
    ({"user_id": True, "task_type": "t"}, "user_id"),
    ({"user_id": 1.5, "task_type": "t"}, "user_id"),
    ({"user_id": "abc", "task_type": "t"}, "user_id"),
    ({"user_id": "١٢", "task_type": "t"}, "user_id"),
    ({"user_id": 2**63, "task_type": "t"}, "user_id"),
    ({"user_id": 1}, "task_type"),
    ({"user_id": 1, "task_type": ""}, "task_type"),
    ({"user_id": 1, "task_type": 5}, "task_type"),
    ({"user_id": 1, "task_type": "x" * 101}, "task_type"),
    ({"user_id": 1, "task_type": "a\tb"}, "task_type"),
    ({"user_id": 1, "task_type": "t", "task_id": ""}, "task_id"),
    ({"user_id": 1, "task_type": "t", "task_id": 7}, "task_id"),
])
def test_register_body_refused(body: dict, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        validate.register_body(body, LIMIT)


def test_register_metadata_too_large() -> None:
    with pytest.raises(TooLarge, match="metadata"):
        validate.register_body({"user_id": 1, "task_type": "t", "metadata": "x" * LIMIT},
                               LIMIT)


# ---- event_body ------------------------------------------------------------------------

@pytest.mark.parametrize("status", model.STATUSES)
def test_event_body_every_status(status: str) -> None:
    change = validate.event_body("t", {"status": status}, LIMIT)
    assert change.task_id == "t" and change.status == status
    assert change.result is model._UNSET  # absent result keeps the task's result


def test_event_body_fields() -> None:
    change = validate.event_body("t", {"status": "progress", "progress": 40.0, "message": "m",
                                       "step": "s", "result": None}, LIMIT)
    assert change.progress == 40 and change.message == "m" and change.step == "s"
    assert change.result is None  # an explicit null is a value, not "absent"
    failed = validate.event_body("t", {"status": "failed", "error": "boom",
                                       "error_type": "ValueError"}, LIMIT)
    assert (failed.error, failed.error_type) == ("boom", "ValueError")


@pytest.mark.parametrize("body, fragment", [
    ({}, "status"),
    ({"status": "done"}, "status"),
    ({"status": 3}, "status"),
    ({"status": "progress", "extra": 1}, "unknown field"),
    ({"status": "progress", "task_id": "x"}, "unknown field"),
    ({"status": "progress", "message": 5}, "message"),
    ({"status": "failed", "error": ["x"]}, "error"),
    ({"status": "progress", "progress": "10"}, "progress"),
])
def test_event_body_refused(body: dict, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        validate.event_body("t", body, LIMIT)


@pytest.mark.parametrize("name", sorted(validate.TEXT_LIMITS))
def test_event_text_caps(name: str) -> None:
    limit = validate.TEXT_LIMITS[name]
    ok = validate.event_body("t", {"status": "failed", name: "x" * limit}, LIMIT)
    assert getattr(ok, name) == "x" * limit
    with pytest.raises(TooLarge, match=name):
        validate.event_body("t", {"status": "failed", name: "x" * (limit + 1)}, LIMIT)


def test_event_result_too_large_and_where_prefix() -> None:
    with pytest.raises(TooLarge, match=r"^events\[2\]\.result"):
        validate.event_body("t", {"status": "completed", "result": "x" * LIMIT}, LIMIT,
                            "events[2].")


# ---- batch_body ------------------------------------------------------------------------

def test_batch_body() -> None:
    assert validate.batch_body({"events": []}) == []
    assert len(validate.batch_body({"events": [{}] * 1000})) == 1000
    with pytest.raises(TooLarge, match="1000"):
        validate.batch_body({"events": [{}] * 1001})
    with pytest.raises(BadRequest, match="list"):
        validate.batch_body({"events": {"a": 1}})
    with pytest.raises(BadRequest, match="list"):
        validate.batch_body({})
    with pytest.raises(BadRequest, match="unknown field"):
        validate.batch_body({"events": [], "more": 1})


# ---- query parameters ------------------------------------------------------------------

def test_int_param() -> None:
    assert validate.int_param(None, "limit", low=1, high=10, default=5) == 5
    assert validate.int_param("", "limit", low=1, high=10, default=5) == 5
    assert validate.int_param("7", "limit", low=1, high=10) == 7
    for raw in ("0", "11", "-1", "abc", "1.5", "٣", " 3", "9" * 20, "0x1"):
        with pytest.raises(BadRequest, match="limit"):
            validate.int_param(raw, "limit", low=1, high=10)


def test_status_param() -> None:
    assert validate.status_param(None) is None
    assert validate.status_param("") is None
    for status in model.STATUSES:
        assert validate.status_param(status) == status
    with pytest.raises(BadRequest, match="status"):
        validate.status_param("done")


# ---- model: next_state and friends -----------------------------------------------------

def a_task(status: str = "pending", **fields: Any) -> model.Task:
    task = new_task(Register("t", 1, "report", {"m": 1}), "t", 5, "2024-01-01T00:00:00.000Z")
    return msgspec.structs.replace(task, status=status, **fields)


def test_new_task_is_pending_with_every_public_field() -> None:
    task = a_task()
    assert set(model.TASK_FIELDS) <= set(task.__struct_fields__)
    assert task.status == "pending" and task.progress == 0
    assert task.seq == 5 and task.created_at == task.updated_at
    assert task.cancel_requested is False and task.metadata == {"m": 1}


@pytest.mark.parametrize("status", sorted(model.TERMINAL))
@pytest.mark.parametrize("target", model.STATUSES)
def test_terminal_states_are_final(status: str, target: str) -> None:
    task = a_task(status)
    before = msgspec.structs.replace(task)
    with pytest.raises(TaskFinal, match=status) as info:
        next_state(task, Change("t", target, progress=10), 6, "now")
    assert task == before
    assert info.value.status == 409
    assert "cancel_requested" not in info.value.extra


def test_refusal_after_user_cancel_tells_the_producer() -> None:
    task = a_task("cancelled", cancel_requested=True)
    with pytest.raises(TaskFinal) as info:
        next_state(task, Change("t", "progress", progress=50), 6, "now")
    assert info.value.extra == {"cancel_requested": True}


@pytest.mark.parametrize("status", sorted(model.ACTIVE))
@pytest.mark.parametrize("target", model.STATUSES)
def test_active_states_move_anywhere(status: str, target: str) -> None:
    new = next_state(a_task(status), Change("t", target), 6, "later")
    assert new.status == target and new.seq == 6 and new.updated_at == "later"


def test_next_state_keeps_unset_fields_and_does_not_mutate() -> None:
    task = a_task("progress", progress=30, message="m1", step="s1", result={"r": 1})
    before = msgspec.structs.replace(task)
    new = next_state(task, Change("t", "progress", progress=60), 9, "t9")
    assert task == before
    assert new.progress == 60
    assert (new.message, new.step, new.result) == ("m1", "s1", {"r": 1})
    assert new.created_at == task.created_at
    cleared = next_state(task, Change("t", "progress", result=None), 10, "t10")
    assert cleared.result is None and cleared.progress == 30


def test_completed_defaults_progress_to_100() -> None:
    done = next_state(a_task("progress", progress=30), Change("t", "completed", result=[1]),
                      7, "t")
    assert done.progress == 100 and done.result == [1]
    partial = next_state(a_task("progress", progress=30),
                         Change("t", "completed", progress=80), 7, "t")
    assert partial.progress == 80
    failed = next_state(a_task("progress", progress=30),
                        Change("t", "failed", error="e", error_type="X"), 7, "t")
    assert failed.progress == 30 and (failed.error, failed.error_type) == ("e", "X")


def test_cancel_sets_cancel_requested() -> None:
    new = next_state(a_task("running"), Change("t", "cancelled", cancel_requested=True), 7, "t")
    assert new.cancel_requested is True
    assert next_state(a_task("running"), Change("t", "cancelled"), 7, "t"
                      ).cancel_requested is False


def test_same_registration() -> None:
    task = a_task()
    assert model.same_registration(task, Register("t", 1, "report", {"m": 1}))
    assert not model.same_registration(task, Register("t", 2, "report", {"m": 1}))
    assert not model.same_registration(task, Register("t", 1, "other", {"m": 1}))
    assert not model.same_registration(task, Register("t", 1, "report", {"m": 2}))


def test_public_drops_internal_columns_in_documented_order() -> None:
    task = a_task(origin="http", created_seq=5)
    shown = public(task)
    assert tuple(shown) == model.TASK_FIELDS
    assert "origin" not in shown and "created_seq" not in shown


def test_outcome_ok() -> None:
    op = Change("t", "running")
    assert Outcome(op).ok
    assert not Outcome(op, error=TaskFinal("x")).ok
    assert not Outcome(op, kind=Kind.REFUSED).ok


def test_utc_now_is_iso_utc_and_sorts() -> None:
    stamp = model.utc_now()
    assert stamp.endswith("Z") and stamp[10] == "T" and len(stamp) == 24
    assert model.utc_iso(0) == "1970-01-01T00:00:00.000Z"
    assert model.utc_iso(1.5) > model.utc_iso(0)
