"""What a PostgreSQL failure means: the reason a 503 gives for each error asyncpg raises,
which of them are worth retrying, and what a log line may show of a database URL."""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg

from ..outage import Failure

LOST = "connection to the database lost"
_UNREACHABLE = "database server unreachable"
_SLOW = "the database does not answer in time"
_STARTING = "database server is starting up or shutting down"
_FULL = "too many connections to the database"
_RESOURCES = "database server out of resources (disk or memory)"
_READ_ONLY = "database is read-only (a standby?)"
_AUTH = "the database refuses our credentials"
# a batch that failed for one of these before COMMIT was sent never reached the database:
# a caller with time left is tried again (the server may be back within it)
CONFLICT = "a transaction conflict (deadlock or serialization failure)"
_RETRYABLE = frozenset({LOST, _UNREACHABLE, _STARTING, _FULL, CONFLICT})


def unavailable_reason(exc: BaseException) -> str | None:
    """Why the database cannot serve us, if `exc` says it cannot (not a bug); else None."""
    if isinstance(exc, TimeoutError | asyncpg.QueryCanceledError):
        return _SLOW
    if isinstance(exc, asyncpg.TransactionRollbackError):  # SQLSTATE class 40
        return CONFLICT
    if isinstance(exc, asyncpg.PostgresConnectionError):  # SQLSTATE class 08
        return LOST
    if isinstance(exc, asyncpg.InterfaceError):
        text = str(exc)
        return LOST if "closed" in text or "closing" in text else None
    if isinstance(exc, asyncpg.InternalClientError):
        # a pooled connection the server ended while idle, used before its end was read:
        # the protocol meets the server's FATAL mid-statement (connections are never
        # shared here, so nothing else confuses it)
        return LOST
    if isinstance(exc, asyncpg.CannotConnectNowError | asyncpg.AdminShutdownError
                  | asyncpg.CrashShutdownError):
        return _STARTING
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return _FULL
    if isinstance(exc, asyncpg.InsufficientResourcesError):
        return _RESOURCES
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return _READ_ONLY
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError
                  | asyncpg.InvalidPasswordError):
        return _AUTH
    if isinstance(exc, ConnectionRefusedError):
        return _UNREACHABLE
    if isinstance(exc, ConnectionError | EOFError):
        return LOST
    if isinstance(exc, OSError):
        return _UNREACHABLE
    return None


def classify(exc: BaseException) -> Failure | None:
    """A failure of the database as the outage sees it (None: a bug). A conflict is no
    outage (one transaction lost a race, the database is fine)."""
    reason = unavailable_reason(exc)
    if reason is None:
        return None
    return Failure(reason, retry=reason in _RETRYABLE, outage=reason != CONFLICT)


def describe_url(url: str) -> str:
    """`host:port/database` of a PostgreSQL URL: what a log line may show of it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return "(unparsable URL)"
    return f"{host}:{port}{parts.path or '/'}"
