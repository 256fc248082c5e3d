"""One batch on both engines (SQLite file, PostgreSQL database), at the store's API: the
rules of each operation see the changes of the operations before it in the same batch,
as they would had each been committed alone. Here: the active-task quota."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.core.errors import TooMany
from server.core.model import Change, Register
from server.storage.postgres.store import PgStore
from server.storage.sqlite.store import SqliteStore


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "postgresql":
        s: Any = PgStore(request.getfixturevalue("pg_url"), node_name="n1")
    else:
        s = SqliteStore(str(tmp_path / "store.db"))
    await s.open()
    yield s
    await s.close()


def refused(outcomes: list[Any]) -> list[bool]:
    return [isinstance(o.error, TooMany) for o in outcomes]


async def test_the_quota_counts_the_tasks_and_changes_earlier_in_the_same_batch(
        store: Any) -> None:
    # registered together past the quota: the ones past it are refused
    outcomes = await store.submit_many([Register(f"a{i}", 1, "job", max_active=2)
                                        for i in range(4)])
    assert refused(outcomes) == [False, False, True, True]
    # a task finished earlier in the batch frees its slot for a later one; another user's
    # tasks count for that user only
    outcomes = await store.submit_many([
        Register("a4", 1, "job", max_active=2), Change("a0", "completed"),
        Register("a5", 1, "job", max_active=2), Register("a6", 1, "job", max_active=2),
        Register("b0", 2, "job", max_active=1), Register("b1", 2, "job", max_active=1)])
    assert refused(outcomes) == [True, False, False, True, False, True]
    active = [t.task_id for t in await store.list_tasks(1, status="pending", limit=10,
                                                        before=None)]
    assert sorted(active) == ["a1", "a5"]
