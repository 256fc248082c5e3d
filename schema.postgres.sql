-- taskpush schema for PostgreSQL (cluster mode). Idempotent: every node applies it at
-- start, inside a transaction holding an advisory lock, so nodes starting together do not
-- race on CREATE. Read it with psql; README.md lists useful queries.
-- Times of tasks are ISO-8601 UTC text, as in schema.sql (the API shows them verbatim);
-- times the cluster itself keeps (nodes, feed) are the database's own clock.

-- One row per task: its current state and the seq of its latest change. The columns are
-- model.Task's fields in their order (rows are read and written whole), then `node`.
CREATE TABLE IF NOT EXISTS tasks (
    task_id          text PRIMARY KEY,
    user_id          bigint NOT NULL,
    task_type        text NOT NULL,
    status           text NOT NULL,
    progress         double precision NOT NULL DEFAULT 0,
    message          text,
    step             text,
    result           text,               -- JSON
    error            text,
    error_type       text,
    metadata         text,               -- JSON
    created_at       text NOT NULL,
    updated_at       text NOT NULL,
    seq              bigint NOT NULL,    -- seq of the latest change
    cancel_requested boolean NOT NULL DEFAULT false,
    origin           text NOT NULL,      -- 'inprocess' | 'http'
    created_seq      bigint NOT NULL,    -- seq of the registration; stable paging cursor
    node             text                -- the node running an in-process task
);

-- One row per change of a task: the full history, seq is the global event number.
CREATE TABLE IF NOT EXISTS events (
    seq        bigint PRIMARY KEY,
    task_id    text NOT NULL,
    status     text NOT NULL,
    progress   double precision NOT NULL,
    message    text,
    step       text,
    result     text,
    error      text,
    error_type text,
    timestamp  text NOT NULL,
    idem_key   text,                 -- producer's Idempotency-Key: a retry is not a new event
    idem_digest text                 -- what that key's event asked for (model.event_digest)
);
-- schema version 1 had no idem_digest: its keys replay as they did
ALTER TABLE events ADD COLUMN IF NOT EXISTS idem_digest text;

-- A deleted task leaves a tombstone so a client resuming with `since` learns of it.
CREATE TABLE IF NOT EXISTS tombstones (
    seq        bigint PRIMARY KEY,
    task_id    text NOT NULL,
    user_id    bigint NOT NULL,
    deleted_at text NOT NULL
);

-- Key/value settings shared by every node: schema_version, epoch, demo secret, resume
-- horizon (the seq of the newest purged tombstone).
CREATE TABLE IF NOT EXISTS settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- The last seq allocated. A write transaction locks this row first (FOR UPDATE) and
-- updates it last: writers of every node are serialized by it, so seq follows commit order.
CREATE TABLE IF NOT EXISTS seq_counter (
    id  integer PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL
);
INSERT INTO seq_counter VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

-- The cluster's feed: one row per allocated seq, written in the committing transaction.
-- Every node reads it after the last seq it delivered (NOTIFY is only a wake-up), so its
-- sockets get every node's changes in seq order. kind: created | changed | deleted; task:
-- the task's JSON after the change (before it, for a deletion). Kept for an hour.
CREATE TABLE IF NOT EXISTS feed (
    seq          bigint PRIMARY KEY,
    kind         text NOT NULL,
    task         text NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now()
);

-- One row per node: a heartbeat (seen_at). A node not seen for --node-timeout is gone;
-- another node ends its in-process tasks.
CREATE TABLE IF NOT EXISTS nodes (
    name       text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- Indexes mirror schema.sql.
CREATE INDEX IF NOT EXISTS tasks_user_seq ON tasks (user_id, seq);
CREATE INDEX IF NOT EXISTS tasks_user_created ON tasks (user_id, created_seq);
CREATE INDEX IF NOT EXISTS tasks_active_by_user ON tasks (user_id)
    WHERE status IN ('pending', 'running', 'progress');
CREATE INDEX IF NOT EXISTS tasks_active_updated ON tasks (updated_at)
    WHERE status IN ('pending', 'running', 'progress');
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (updated_at)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS tasks_inprocess_by_node ON tasks (node)
    WHERE origin = 'inprocess' AND status IN ('pending', 'running', 'progress');
CREATE INDEX IF NOT EXISTS events_task ON events (task_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS events_idem ON events (task_id, idem_key)
    WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tombstones_user ON tombstones (user_id, seq);
CREATE INDEX IF NOT EXISTS feed_committed ON feed (committed_at);

INSERT INTO settings VALUES ('schema_version', '2')
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;
