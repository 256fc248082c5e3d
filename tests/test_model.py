"""server/model.py helpers not covered through the store: time formatting."""

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
