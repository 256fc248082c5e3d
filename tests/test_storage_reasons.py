"""sqlite_store.storage_reason: SQLite's extended result codes (the primary code in the
low byte, the detail above it) are storage failures (503 with a reason), never bugs (500).
Each error is SQLite's own, raised by the sqlite3 module on a real file."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
from pathlib import Path

from server.storage.sqlite.store import storage_reason


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (randomblob(1000))")
    return conn


def busy_snapshot(tmp_path: Path) -> sqlite3.Error:
    """WAL: a read transaction cannot become a write once another connection committed."""
    reader = _connect(tmp_path / "snapshot.db")
    reader.execute("PRAGMA journal_mode = WAL")
    writer = sqlite3.connect(str(tmp_path / "snapshot.db"), isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchall()
        writer.execute("INSERT INTO t VALUES (2)")
        try:
            reader.execute("INSERT INTO t VALUES (3)")
        except sqlite3.Error as exc:
            return exc
        raise AssertionError("no error")
    finally:
        reader.close()
        writer.close()


def readonly_dbmoved(tmp_path: Path) -> sqlite3.Error:
    """The file was renamed under an open connection; the next write is refused."""
    conn = _connect(tmp_path / "moved.db")
    try:
        os.rename(tmp_path / "moved.db", tmp_path / "elsewhere.db")
        try:
            conn.execute("INSERT INTO t VALUES (2)")
        except sqlite3.Error as exc:
            return exc
        raise AssertionError("no error")
    finally:
        conn.close()


def ioerr_write(tmp_path: Path) -> sqlite3.Error:
    """write() fails (EFBIG: the file size limit, SIGXFSZ ignored), not for want of space."""
    conn = _connect(tmp_path / "limited.db")
    conn.execute("INSERT INTO t VALUES (randomblob(4000000))")
    limit = os.path.getsize(tmp_path / "limited.db")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        conn.execute("INSERT INTO t VALUES (randomblob(100000))")
    except sqlite3.Error as exc:
        return exc
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
        conn.close()
    raise AssertionError("no error")


def test_extended_result_codes_are_storage_failures(tmp_path: Path) -> None:
    cases = [(busy_snapshot(tmp_path), "SQLITE_BUSY_SNAPSHOT", "locked by another process"),
             (readonly_dbmoved(tmp_path), "SQLITE_READONLY_DBMOVED", "read-only"),
             (ioerr_write(tmp_path), "SQLITE_IOERR_WRITE", "disk I/O error")]
    for exc, name, reason in cases:
        assert exc.sqlite_errorname == name
        assert exc.sqlite_errorcode > 0xFF  # an extended code
        found = storage_reason(exc)
        assert found is not None and reason in found, (name, found)

