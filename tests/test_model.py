"""server/core/model.py helpers not covered through the store: time formatting, outcome kinds."""

from __future__ import annotations

from typing import Any


def test_utc_iso_matches_datetime_formatting_at_every_rounding_edge() -> None:
    """utc_iso formats each second once and adds the milliseconds: same text as datetime."""
    import datetime as dt
    import random

    from server.core.model import utc_iso

    rng = random.Random(5)
    moments = [0.0, 0.0004999, 0.9999996, 1.9999995, 59.9999999, 1_764_300_000.9995]
    moments += [rng.uniform(0, 4e9) for _ in range(20_000)]
    moments += [round(rng.uniform(1.7e9, 1.8e9), 3) for _ in range(20_000)]
    for moment in moments:
        when = dt.datetime.fromtimestamp(moment, dt.UTC)
        expected = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
        assert utc_iso(moment) == expected, moment


def test_outcome_kind_says_whether_it_is_ok_and_whether_it_is_news() -> None:
    """One table for every reader: hub (push?), metrics (count?), sweeper/tasks (ok?)."""
    from server.core.model import Change, Kind, Outcome

    op = Change("t", "running")
    table = {
        Kind.CREATED: (True, True),
        Kind.CHANGED: (True, True),
        Kind.DELETED: (True, True),
        Kind.UNCHANGED: (True, False),  # already so: nothing to push or count
        Kind.REFUSED: (False, False),
    }
    assert set(table) == set(Kind)
    for kind, (ok, news) in table.items():
        outcome = Outcome(op, kind=kind)
        assert (outcome.ok, outcome.news) == (ok, news), kind
    assert [k.value for k in Kind] == ["created", "changed", "deleted", "unchanged", "refused"]


def test_an_outcome_with_an_error_is_refused_however_it_was_built() -> None:
    from server.core.errors import TaskFinal
    from server.core.model import Change, Kind, Outcome

    op = Change("t", "running")
    built = Outcome(op, error=TaskFinal("x"), kind=Kind.CHANGED)
    assert built.kind is Kind.REFUSED and not built.ok and not built.news
    refused = Outcome(op)
    refused.refuse(TaskFinal("late"))
    assert refused.kind is Kind.REFUSED and isinstance(refused.error, TaskFinal)
    moved = Outcome(op)
    moved.refuse()  # a condition that no longer held: refused with no error
    assert moved.kind is Kind.REFUSED and moved.error is None and not moved.ok


# ---- apply_op: the rules every engine runs, over a dict-backed transaction view --------

class DictView:
    """A `model.TxnView` over dicts: what an engine's transaction offers the rules."""

    def __init__(self) -> None:
        self.tasks: dict[str, Any] = {}
        self.keys: dict[tuple[str, str], tuple[int, str | None]] = {}
        self.writes: list[tuple[str, str, int]] = []  # (what, task_id, seq), in order

    def load(self, task_id: str) -> Any:
        return self.tasks.get(task_id)

    def applied_with_key(self, task_id: str, key: str) -> tuple[int, str | None] | None:
        return self.keys.get((task_id, key))

    def active_count(self, user_id: int) -> int:
        from server.core.model import ACTIVE

        return sum(1 for t in self.tasks.values()
                   if t.user_id == user_id and t.status in ACTIVE)

    def changed(self, task: Any, now: str, key: str | None, digest: str | None = None
                ) -> None:
        self.tasks[task.task_id] = task
        if key is not None:
            self.keys[(task.task_id, key)] = (task.seq, digest)
        self.writes.append(("changed", task.task_id, task.seq))

    def created(self, task: Any, now: str) -> None:
        self.tasks[task.task_id] = task
        self.writes.append(("created", task.task_id, task.seq))

    def deleted(self, task: Any, seq: int, now: str) -> None:
        del self.tasks[task.task_id]
        self.writes.append(("deleted", task.task_id, seq))


NOW = "2026-01-01T00:00:00.000Z"


def _apply(view: DictView, op: Any, seq: int) -> tuple[Any, int]:
    from server.core.model import apply_op

    return apply_op(view, op, seq, NOW)


def _view_with(*tasks: tuple[str, int, str]) -> tuple[DictView, int]:
    """A view holding tasks (id, user, status), registered then moved; and the last seq."""
    from server.core.model import Change, Register

    view, seq = DictView(), 0
    for task_id, user_id, status in tasks:
        outcome, seq = _apply(view, Register(task_id, user_id, "job"), seq)
        assert outcome.ok
        if status != "pending":
            outcome, seq = _apply(view, Change(task_id, status), seq)
            assert outcome.ok
    view.writes.clear()
    return view, seq


def test_apply_register_creates_a_pending_task_with_the_next_seq() -> None:
    from server.core.model import Kind, Register

    view, seq = _view_with()
    outcome, seq = _apply(view, Register("t", 7, "job", {"k": 1}, origin="inprocess"), 41)
    assert (outcome.kind, outcome.seq, seq) == (Kind.CREATED, 42, 42)
    task = view.tasks["t"]
    assert (task.status, task.user_id, task.metadata, task.origin,
            task.created_seq, task.created_at) == ("pending", 7, {"k": 1}, "inprocess",
                                                         42, NOW)
    assert view.writes == [("created", "t", 42)]


def test_apply_register_again_is_unchanged_and_a_different_body_conflicts() -> None:
    from server.core.errors import Conflict
    from server.core.model import Kind, Register

    view, seq = _view_with(("t", 1, "running"))
    outcome, after = _apply(view, Register("t", 1, "job"), seq)
    assert (outcome.kind, outcome.seq, after) == (Kind.UNCHANGED, seq, seq)
    outcome, after = _apply(view, Register("t", 1, "other"), seq)
    assert outcome.kind is Kind.REFUSED and isinstance(outcome.error, Conflict)
    assert after == seq and view.writes == []


def test_apply_register_names_a_task_after_its_type_and_seq_avoiding_a_taken_id() -> None:
    from server.core.model import Register

    view, seq = _view_with(("job_3", 1, "pending"))  # the id generated at seq 3, taken
    outcome, seq = _apply(view, Register(None, 1, "job"), seq)
    assert outcome.task.task_id == "job_2"
    outcome, seq = _apply(view, Register(None, 1, "job"), seq)
    taken = outcome.task.task_id
    assert taken.startswith("job_3_") and taken != "job_3" and len(view.tasks) == 3


def test_apply_register_over_the_quota_is_refused_counting_the_batch_so_far() -> None:
    from server.core.errors import TooMany
    from server.core.model import Register

    view, seq = _view_with(("a", 1, "running"), ("done", 1, "completed"), ("b", 2, "running"))
    outcome, seq = _apply(view, Register("c", 1, "job", max_active=2), seq)
    assert outcome.ok  # 1 active (the completed one does not count, nor user 2's)
    outcome, after = _apply(view, Register("d", 1, "job", max_active=2), seq)
    assert not outcome.ok and isinstance(outcome.error, TooMany) and after == seq
    outcome, _ = _apply(view, Register("d", 1, "job"), seq)  # no quota asked: no limit
    assert outcome.ok


def test_apply_change_of_another_users_or_a_missing_task_is_not_found() -> None:
    from server.core.errors import NotFound
    from server.core.model import Change

    view, seq = _view_with(("t", 1, "running"))
    for op in (Change("t", "progress", progress=5, owner=2), Change("nope", "running")):
        outcome, after = _apply(view, op, seq)
        assert isinstance(outcome.error, NotFound) and after == seq
    outcome, _ = _apply(view, Change("t", "progress", progress=5, owner=1), seq)
    assert outcome.ok and outcome.task.progress == 5


def test_apply_change_with_an_applied_idempotency_key_changes_nothing() -> None:
    from server.core.errors import KeyReused
    from server.core.model import Change, Kind

    view, seq = _view_with(("t", 1, "running"))
    first, seq = _apply(view, Change("t", "progress", progress=5, idem_key="k1"), seq)
    again, after = _apply(view, Change("t", "progress", progress=5.0, idem_key="k1"), seq)
    assert (again.kind, again.seq, after) == (Kind.UNCHANGED, first.seq, seq)
    reused, after = _apply(view, Change("t", "progress", progress=9, idem_key="k1"), seq)
    assert isinstance(reused.error, KeyReused) and after == seq
    assert view.tasks["t"].progress == 5 and len(view.writes) == 1
    other, after = _apply(view, Change("t", "progress", progress=9, idem_key="k2"), seq)
    assert other.kind is Kind.CHANGED and after == seq + 1


def test_apply_change_with_a_stale_expect_seq_is_refused_without_error() -> None:
    from server.core.model import Change, Kind

    view, seq = _view_with(("t", 1, "running"))
    outcome, after = _apply(view, Change("t", "failed", expect_seq=seq - 1), seq)
    assert (outcome.kind, outcome.error, after) == (Kind.REFUSED, None, seq)
    assert outcome.task.status == "running" and view.writes == []
    outcome, after = _apply(view, Change("t", "failed", expect_seq=seq), seq)
    assert outcome.kind is Kind.CHANGED and after == seq + 1


def test_apply_change_of_a_finished_task_is_refused_and_allocates_no_seq() -> None:
    from server.core.errors import TaskFinal
    from server.core.model import Change

    view, seq = _view_with(("t", 1, "completed"))
    outcome, after = _apply(view, Change("t", "running"), seq)
    assert isinstance(outcome.error, TaskFinal) and after == seq and view.writes == []


def test_apply_delete_needs_a_finished_task_of_the_owner() -> None:
    from server.core.errors import NotFound, TaskActive
    from server.core.model import Delete, Kind

    view, seq = _view_with(("run", 1, "running"), ("done", 1, "completed"))
    outcome, after = _apply(view, Delete("run"), seq)
    assert isinstance(outcome.error, TaskActive) and after == seq
    outcome, after = _apply(view, Delete("done", owner=2), seq)
    assert isinstance(outcome.error, NotFound) and after == seq
    assert view.writes == []
    outcome, after = _apply(view, Delete("done", owner=1), seq)
    assert (outcome.kind, outcome.seq, after) == (Kind.DELETED, seq + 1, seq + 1)
    outcome, after = _apply(view, Delete("run", allow_active=True), after)
    assert outcome.kind is Kind.DELETED and view.tasks == {}
    assert view.writes == [("deleted", "done", seq + 1), ("deleted", "run", seq + 2)]


def test_a_task_is_declared_once_and_its_public_json_drops_internal_fields() -> None:
    """Task's fields give the public JSON (in order), the columns and what a change moves."""
    from server.core.model import (
        CHANGING_FIELDS,
        INTERNAL_FIELDS,
        TASK_COLUMNS,
        TASK_FIELDS,
        Register,
        Task,
        new_task,
        public,
    )

    assert Task.__struct_fields__ == TASK_COLUMNS
    assert TASK_FIELDS + INTERNAL_FIELDS == TASK_COLUMNS
    assert INTERNAL_FIELDS == ("origin", "created_seq")
    assert set(CHANGING_FIELDS) == {"status", "progress", "message", "step", "result",
                                    "error", "error_type", "updated_at", "seq",
                                    "cancel_requested"}
    task = new_task(Register("t", 1, "job", {"m": 1}, origin="inprocess"), "t", 3, NOW)
    shown = public(task)
    assert tuple(shown) == TASK_FIELDS and shown["metadata"] == {"m": 1}
    assert (task.origin, task.created_seq) == ("inprocess", 3)


def test_event_digest_is_the_validated_fields_not_the_request() -> None:
    """The same event (another key order, 40.0 for 40) digests alike; any field that the
    change would apply differently, a result given as null included, does not."""
    from server.core.model import Change, event_digest

    base = Change("t", "progress", 40, "m", "s", {"a": 1, "b": [2]}, idem_key="k")
    assert event_digest(base) == event_digest(
        Change("t", "progress", 40.0, "m", "s", {"b": [2], "a": 1}, idem_key="other"))
    variants = [Change("t", "running", 40, "m", "s", {"a": 1, "b": [2]}),
                Change("t", "progress", 41, "m", "s", {"a": 1, "b": [2]}),
                Change("t", "progress", None, "m", "s", {"a": 1, "b": [2]}),
                Change("t", "progress", 40, None, "s", {"a": 1, "b": [2]}),
                Change("t", "progress", 40, "m", "x", {"a": 1, "b": [2]}),
                Change("t", "progress", 40, "m", "s", {"a": 1}),
                Change("t", "progress", 40, "m", "s", None),
                Change("t", "progress", 40, "m", "s"),
                Change("t", "progress", 40, "m", "s", {"a": 1, "b": [2]}, error="e"),
                Change("t", "progress", 40, "m", "s", {"a": 1, "b": [2]}, error_type="e")]
    digests = {event_digest(change) for change in variants}
    assert len(digests) == len(variants) and event_digest(base) not in digests
