-- taskpush schema. Idempotent: applied at every start.
-- Read it with the sqlite3 shell; README.md lists useful queries.
-- The schema version is the file's user_version (last line): taskpush refuses a database
-- whose version is higher than the one below (written by a newer taskpush).

-- One row per task: its current state and the seq of its latest change.
CREATE TABLE IF NOT EXISTS tasks (
    task_id          TEXT PRIMARY KEY,
    user_id          INTEGER NOT NULL,
    task_type        TEXT NOT NULL,
    status           TEXT NOT NULL,
    progress         REAL NOT NULL DEFAULT 0,
    message          TEXT,
    step             TEXT,
    result           TEXT,               -- JSON
    error            TEXT,
    error_type       TEXT,
    metadata         TEXT,               -- JSON
    origin           TEXT NOT NULL,      -- 'inprocess' | 'http'
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at       TEXT NOT NULL,      -- ISO-8601 UTC
    updated_at       TEXT NOT NULL,
    created_seq      INTEGER NOT NULL,   -- seq of the registration; stable paging cursor
    seq              INTEGER NOT NULL    -- seq of the latest change
) WITHOUT ROWID;

-- One row per change of a task: the full history, seq is the global event number.
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY,
    task_id    TEXT NOT NULL,
    status     TEXT NOT NULL,
    progress   REAL NOT NULL,
    message    TEXT,
    step       TEXT,
    result     TEXT,
    error      TEXT,
    error_type TEXT,
    timestamp  TEXT NOT NULL,
    idem_key   TEXT,                 -- producer's Idempotency-Key: a retry is not a new event
    idem_digest TEXT                 -- what that key's event asked for (model.event_digest)
);

-- A deleted task leaves a tombstone so a client resuming with `since` learns of it.
CREATE TABLE IF NOT EXISTS tombstones (
    seq        INTEGER PRIMARY KEY,
    task_id    TEXT NOT NULL,
    user_id    INTEGER NOT NULL,
    deleted_at TEXT NOT NULL
);

-- Key/value settings: epoch, demo secret, resume horizon (the seq of the newest purged
-- tombstone). The next seq is not stored: it follows the largest seq in events, tombstones
-- and the horizon.
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Active tasks of a user (connect), a user's changes after a seq (resume), paging.
CREATE INDEX IF NOT EXISTS tasks_user_seq ON tasks (user_id, seq);
CREATE INDEX IF NOT EXISTS tasks_user_created ON tasks (user_id, created_seq);
-- Active tasks by user (connect) and all active tasks (stale sweep). Only user_id is
-- indexed, so a progress update (same status, new seq) does not touch this index.
DROP INDEX IF EXISTS tasks_user_active;
DROP INDEX IF EXISTS tasks_active_updated;
CREATE INDEX IF NOT EXISTS tasks_active_by_user ON tasks (user_id)
    WHERE status IN ('pending', 'running', 'progress');
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS events_task ON events (task_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS events_idem ON events (task_id, idem_key)
    WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tombstones_user ON tombstones (user_id, seq);

PRAGMA user_version = 1;
