"""The database file under a real server process: deleted, replaced or corrupt.

Deleted or replaced while the server runs: the server notices that the path no longer names
the file it opened, stops acknowledging writes (503, saying why), /healthz answers 503, and
one line is logged. A corrupt file at start: a one-line message and a non-zero exit.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from server.core.model import Register
from server.storage.sqlite.store import SqliteStore as Store
from tests.procs import Servers, free_port, run_cli

SECRET = "db-file-secret-0123456789-abcdefghijklmnop"
API_KEY = "db-file-producer-key-0123456789"
PRODUCER = {"X-API-Key": API_KEY}
TIMEOUT = aiohttp.ClientTimeout(total=15)  # catches a hang; no speed is asserted
MOVED = "storage unavailable: database file was deleted or replaced"


def start(servers: Servers) -> Any:
    return servers("--jwt-secret", SECRET, "--api-key", API_KEY, "--db-timeout", "1").start()


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]
               ) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with session.post(url, json=body, headers=PRODUCER) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def refuses_writes(server: Any) -> None:
    """An event answers 503 saying why, /healthz answers 503, one line in the log."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for progress in (20, 30):
            status, body, headers = await post(
                session, f"{server.url}/api/task/task/t/events",
                {"status": "progress", "progress": progress})
            assert status == 503, body
            assert body == {"code": 503, "message": MOVED, "data": None}
            assert int(headers["Retry-After"]) >= 1
        async with session.get(f"{server.url}/healthz") as resp:
            assert resp.status == 503
            assert (await resp.json())["message"] == MOVED
    lines = [line for line in server.stderr().splitlines() if "storage unavailable" in line]
    assert len(lines) == 1 and "deleted or replaced" in lines[0], server.stderr()
    assert "Traceback" not in server.stderr()


async def register_and_move(server: Any) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        status, body, _ = await post(session, f"{server.url}/api/task/tasks",
                                     {"task_id": "t", "user_id": 1, "task_type": "job"})
        assert status == 201, body
        status, body, _ = await post(session, f"{server.url}/api/task/task/t/events",
                                     {"status": "progress", "progress": 10})
        assert status == 200, body


async def test_a_deleted_database_file_stops_acknowledging(servers: Servers) -> None:
    server = start(servers)
    await register_and_move(server)
    os.unlink(server.db)
    await refuses_writes(server)
    assert server.stop() == 0


async def test_a_replaced_database_file_stops_acknowledging(servers: Servers,
                                                             tmp_path: Path) -> None:
    server = start(servers)
    await register_and_move(server)
    copy = tmp_path / "copy.db"  # a consistent copy, the way a backup is taken
    source, target = sqlite3.connect(str(server.db)), sqlite3.connect(str(copy))
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    os.replace(copy, server.db)
    await refuses_writes(server)
    assert server.stop() == 0
    conn = sqlite3.connect(str(server.db))
    try:  # the restored copy is sound, with what it held
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT progress FROM tasks WHERE task_id = 't'").fetchall() \
            == [(10,)]
    finally:
        conn.close()
    server.start()  # and a server starts on it
    assert server.health()["status"] == "ok"


def corrupt_an_index(path: Path) -> None:
    """Overwrite the root page of an index with garbage: the tables stay readable, the
    b-tree of the index does not."""
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master"
                               " WHERE name = 'tasks_user_seq'").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with open(path, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\xff" * page_size)


async def test_a_corrupt_database_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "taskpush.db"
    store = Store(str(path))
    await store.open()
    outcomes = await store.submit_many([Register(f"t{n}", n % 40, "job") for n in range(2000)])
    assert all(o.ok for o in outcomes)
    await store.close()
    corrupt_an_index(path)
    done = run_cli("--db", str(path), "--port", str(free_port()), "--jwt-secret", SECRET)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("taskpush: error: ") and "is corrupt" in lines[0]
    assert "restore it from a backup" in lines[0]
