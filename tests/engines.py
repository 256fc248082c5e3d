"""Run a process-level test on both storage engines: SQLite (a file) and PostgreSQL.

tests/conftest.py declares the `engine` fixture with `engine_fixture`: each test that takes
it runs once per engine (ids `[sqlite]` and `[postgresql]`). The SQLite run is
the test as it always was: `engine.database()` is None, so `servers(...)` keeps its default
file. The PostgreSQL run gets a fresh database on the session's server (tests/conftest.py's
`pg_server`: skipped on a developer machine without PostgreSQL, a failure in CI), and reads
rows back with psql where the SQLite run reads the file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ENGINES = ("sqlite", "postgresql")


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Engine:
    """Which engine a test runs on, and how to read what a server left in its database."""

    def __init__(self, name: str, pg: Any = None) -> None:
        self.name = name
        self.pg = pg

    def __repr__(self) -> str:
        return f"Engine({self.name})"

    @property
    def postgres(self) -> bool:
        return self.name == "postgresql"

    def database(self) -> str | None:
        """A fresh PostgreSQL database URL, or None for the server's default SQLite file."""
        return str(self.pg.create_database()) if self.postgres else None

    @staticmethod
    def _dbname(url: str) -> str:
        return urlsplit(url).path.lstrip("/")

    def query(self, db: Path | str, statement: str) -> list[tuple[str, ...]]:
        """Rows of a read-only query, every value as text ('' for NULL)."""
        if self.postgres:
            out = self.pg.sql(statement, database=self._dbname(str(db)))
            return [tuple(line.split("|")) for line in out.splitlines() if line]
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return [tuple("" if v is None else str(v) for v in row)
                    for row in conn.execute(statement).fetchall()]
        finally:
            conn.close()

    def task_row(self, db: Path | str, task_id: str) -> tuple[str, str | None]:
        """(status, error_type) of a task, read straight from the database."""
        # psql takes no bind parameters here: the id is quoted as a SQL literal.
        rows = self.query(db, "SELECT status, error_type FROM tasks WHERE task_id = "  # noqa: S608
                          + _literal(task_id))
        assert rows, task_id
        status, error_type = rows[0]
        return status, (error_type or None)

    def stored_events(self, db: Path | str) -> set[tuple[str, int]]:
        """Every recorded change as (task_id, seq)."""
        return {(task_id, int(seq))
                for task_id, seq in self.query(db, "SELECT task_id, seq FROM events")}

    def check_integrity(self, db: Path | str) -> None:
        """SQLite: PRAGMA integrity_check. PostgreSQL keeps its own consistency (WAL);
        what we check there is that seq is unique in the history."""
        if self.postgres:
            dupes = self.query(db, "SELECT seq FROM events GROUP BY seq HAVING count(*) > 1")
            assert dupes == [], dupes
            return
        assert self.query(db, "PRAGMA integrity_check") == [("ok",)]


def engine_fixture(request: pytest.FixtureRequest) -> Engine:
    """Body of the `engine` fixture (tests/conftest.py), parametrized with ENGINES."""
    if request.param == "postgresql":
        return Engine("postgresql", request.getfixturevalue("pg_server"))
    return Engine("sqlite")
