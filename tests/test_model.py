"""server/model.py helpers not covered through the store: time formatting, outcome kinds."""

from __future__ import annotations


def test_utc_iso_matches_datetime_formatting_at_every_rounding_edge() -> None:
    """utc_iso formats each second once and adds the milliseconds: same text as datetime."""
    import datetime as dt
    import random

    from server.model import utc_iso

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
    from server.model import Change, Kind, Outcome

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
    from server.errors import TaskFinal
    from server.model import Change, Kind, Outcome

    op = Change("t", "running")
    built = Outcome(op, error=TaskFinal("x"), kind=Kind.CHANGED)
    assert built.kind is Kind.REFUSED and not built.ok and not built.news
    refused = Outcome(op)
    refused.refuse(TaskFinal("late"))
    assert refused.kind is Kind.REFUSED and isinstance(refused.error, TaskFinal)
    moved = Outcome(op)
    moved.refuse()  # a condition that no longer held: refused with no error
    assert moved.kind is Kind.REFUSED and moved.error is None and not moved.ok
