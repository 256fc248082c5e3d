"""SQLite's write-ahead log: how every connection is set up (WAL, durability across a
process crash, no automatic checkpoint) and the `Checkpointer`, which copies the WAL into
the database file in the background, on a thread and connection of its own: a large
write batch or a snapshot read never waits behind a checkpoint, and no checkpoint runs
inside a COMMIT on the loop's thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

# A WAL checkpoint after CHECKPOINT_EVERY_COMMITS commits or CHECKPOINT_EVERY_OPS operations
# (each about 30 MB of WAL, from the WAL bytes per commit and per batched event measured in
# docs/performance.md, "Figures behind the store's constants"), or CHECKPOINT_EVERY_S after
# a commit, whichever is first
CHECKPOINT_EVERY_COMMITS = 2_000
CHECKPOINT_EVERY_OPS = 12_000
CHECKPOINT_EVERY_S = 2.0
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is cut back to this after a checkpoint


def connect_sync(conn: sqlite3.Connection, busy_ms: int) -> None:
    """Connection setup: WAL, a busy timeout, and durability that survives a process crash.

    No automatic checkpoint: it would run inside a COMMIT, on the loop's thread, with an
    fsync; the `Checkpointer` runs it on its own thread instead."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: durable across process crashes
    conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    conn.execute("PRAGMA foreign_keys=ON")


def _checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database file without waiting on readers or the writer."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


class Checkpointer:
    """Checkpoints of one database file: soon after a burst of commits, at the latest
    CHECKPOINT_EVERY_S after one; `due` is the armed timer (None: none armed)."""

    def __init__(self) -> None:
        self.due: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self._ops = 0  # since the last checkpoint
        self._commits = 0
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    def open(self, path: str, busy_ms: int) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="taskpush-checkpoint")
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout={busy_ms}")

    def committed(self, ops: int) -> None:
        """A commit of `ops` operations: schedule a checkpoint."""
        self._ops += ops
        self._commits += 1
        if self._ops >= CHECKPOINT_EVERY_OPS or self._commits >= CHECKPOINT_EVERY_COMMITS:
            self._start()
        elif self.due is None:
            self.due = asyncio.get_running_loop().call_later(CHECKPOINT_EVERY_S,
                                                             self._on_timer)

    def _on_timer(self) -> None:
        self.due = None  # fired: a commit from now on may arm the next one
        self._start()

    def _start(self) -> None:
        if self._running is not None or self._thread is None:
            return  # the running one will be followed by a timer if more was written
        if self.due is not None:
            self.due.cancel()
            self.due = None
        self._ops = self._commits = 0
        self._running = asyncio.create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            await self._run()
        except Exception:
            log.exception("WAL checkpoint failed")
        finally:
            self._running = None
        if self._ops and self.due is None and self._thread is not None:
            self.due = asyncio.get_running_loop().call_later(CHECKPOINT_EVERY_S,
                                                             self._on_timer)

    async def _run(self) -> None:
        assert self._thread is not None and self._conn is not None
        await asyncio.get_running_loop().run_in_executor(self._thread, _checkpoint,
                                                         self._conn)

    async def close(self) -> None:
        """Finish a running checkpoint, run a last one, stop."""
        if self.due is not None:
            self.due.cancel()
            self.due = None
        if self._running is not None:
            await self._running
        if self.due is not None:  # set again by the checkpoint that just ended
            self.due.cancel()
            self.due = None
        if self._thread is not None and self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._run()
            self._thread.shutdown()
            self._conn.close()
            self._thread = self._conn = None
