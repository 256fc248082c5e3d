"""Which storage engine serves `--db`: a `postgresql://` or `postgres://` URL is PostgreSQL
(`postgres.store`), anything else a SQLite file (`sqlite.store`).

Its own module because it imports the engines, and every engine imports `api` (the
interface, `Snapshot`, the refusals): `api` importing them back would be a cycle.
"""

from __future__ import annotations

from typing import Any

from .api import Store, StoreRefused
from .sqlite.store import DB_TIMEOUT, SqliteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(db: str) -> bool:
    return db.lower().startswith(POSTGRES_SCHEMES)


def make_store(db: str, *, timeout: float = DB_TIMEOUT, **options: Any) -> Store:
    """The store for `db`, not yet opened. `options` are the engine's own settings (the
    PostgreSQL node's name and timeout); SQLite takes none."""
    if not is_postgres(db):
        return SqliteStore(db, timeout=timeout)
    try:
        # imported only when asked for: a SQLite server never loads asyncpg
        from .postgres import store as pg_store
    except ImportError as exc:  # asyncpg is a dependency: only a broken install lacks it
        raise StoreRefused(f"--db is a PostgreSQL URL but {exc.name or 'asyncpg'} cannot be"
                           " imported: reinstall taskpush (pip install asyncpg)") from None

    return pg_store.PgStore(db, timeout=timeout, **options)
