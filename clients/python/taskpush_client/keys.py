"""Idempotency keys the task-queue integrations derive from a task id.

A redelivered or retried task must send the same key for the same state change, so the
keys are computed, not random. The server takes any printable task id of up to 200
characters (Unicode included) but only 1-200 printable ASCII characters as a key, so a
key never carries the task id itself: it carries a digest of it (128 bits of SHA-256 in
hex) and then the change's own parts, e.g. `<32 hex digits>:running:0`
(`api.TaskNotificationService.finish` with `key_prefix=task_digest(task_id)` makes the
same keys for final states). Keys are scoped to their task on the server; the digest
keeps them distinct across tasks anyway.
"""

from __future__ import annotations

import hashlib


def task_digest(task_id: str) -> str:
    """32 hex digits naming `task_id` (any string, lone surrogates included)."""
    return hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def event_key(task_id: str, *parts: object) -> str:
    """The key of one state change of `task_id`: the task's digest, then the change's
    parts (the state, a retry count). Printable ASCII for any task id; parts are the caller's
    constants and counters (ASCII), so the key stays far below the server's 200."""
    return ":".join([task_digest(task_id), *(str(part) for part in parts)])
