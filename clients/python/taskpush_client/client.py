"""`Client`: reports a worker's tasks to taskpush from any thread or event loop.

Every call only queues (`outbox.Outbox`) and returns a `Report` at once; one sender thread
per process sends the queue in order over one keep-alive `httpx.Client`. Sync code may call
`report.wait()`, async code `await report`; both wait for the server's answer up to
`wait` seconds and then go on (the report keeps being retried in the background). So
taskpush being slow or down never blocks a task for long and never raises into it: the only
exception a report raises is `TaskCancelled`, when the user cancelled the task. The tasks
this process runs (`watch`, called through `api.set_current` by the decorator, the context
and the Celery/RQ/arq integrations) are watched for the user's cancel (`watch.CancelWatcher`),
so the next report after a cancel raises, and `is_cancelled` says so without reporting.

Configuration: arguments, else the `TASKPUSH_URL` and `TASKPUSH_API_KEY` environment
variables. A client with neither logs one warning and drops its reports.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Generator
from typing import Any

import httpx

from .errors import TaskCancelled
from .outbox import (
    MAX_BATCH_BYTES,
    TERMINAL,
    Item,
    Outbox,
    Outcome,
    Ticket,
    batch_body,
    batch_size,
    malformed,
    read_batch,
    read_register,
    retry_after,
)
from .watch import CancelWatcher

log = logging.getLogger("taskpush_client")

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class Report:
    """One queued report. Ignore it, `wait()` for it (sync) or `await` it (async); both
    return the server's answer (or None) and raise TaskCancelled if the user cancelled."""

    __slots__ = ("_immediate", "task_id", "ticket", "timeout")

    def __init__(self, task_id: str, ticket: Ticket | None, timeout: float,
                 immediate: bool = False) -> None:
        self.task_id = task_id
        self.ticket = ticket
        self.timeout = timeout
        self._immediate = immediate or ticket is None

    def _result(self) -> dict[str, Any] | None:
        if self.ticket is None or not self.ticket.done:
            return None
        if self.ticket.cancelled:
            raise TaskCancelled(self.task_id)
        return self.ticket.value

    def wait(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the answer up to `timeout` (default: the client's `wait`)."""
        if self.ticket is not None and not self._immediate:
            self.ticket.wait(self.timeout if timeout is None else timeout)
        return self._result()

    def __await__(self) -> Generator[Any, None, dict[str, Any] | None]:
        if self.ticket is not None and not self._immediate and not self.ticket.done:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()

            def wake(_: Ticket) -> None:
                # The answer may come after this loop was closed (`asyncio.run()` returned
                # while the report was still queued): nobody is waiting there any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_done, future)

            self.ticket.add_callback(wake)
            # still queued: the sender keeps trying. Before Python 3.11 `wait_for` raises
            # asyncio.TimeoutError, which is not the builtin TimeoutError.
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                yield from asyncio.wait_for(asyncio.shield(future), self.timeout).__await__()
        return self._result()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Client:
    """Reports for one taskpush server. Thread-safe; after a fork the child starts afresh
    (a new sender thread on first use), so it can be made before a prefork pool forks.

    `max_delay`: how long a progress event may wait to be coalesced with later ones (a state
    change is sent at once, with the progress queued before it). `wait`: how long
    `wait()`/`await` wait for an answer. `give_up_after`: how long a state change is retried
    while taskpush is unreachable before it is dropped with a warning (progress:
    `progress_give_up_after`). `max_batch_bytes`: the largest batch of events sent as one
    request (keep it below the server's --max-body-bytes; a batch the server still finds
    too large is split and resent). `watch_cancels`: how many of the tasks this process
    runs are watched at once for the user's cancel (0: none; a task beyond it learns of a
    cancel from the answer to its next report)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 max_delay: float = 0.2, wait: float = 5.0, give_up_after: float = 600.0,
                 progress_give_up_after: float = 30.0, timeout: float = 10.0,
                 backoff: float = 0.1, max_backoff: float = 2.0,
                 max_batch_bytes: int = MAX_BATCH_BYTES, watch_cancels: int = 64,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("TASKPUSH_URL") or "").rstrip("/")
        self._api_key = api_key or os.environ.get("TASKPUSH_API_KEY") or ""
        self.max_delay = max_delay
        self.wait = wait
        self.give_up_after = give_up_after
        self.progress_give_up_after = progress_give_up_after
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_batch_bytes = max_batch_bytes
        self.watch_cancels = watch_cancels
        self._transport = transport
        self.stats = {"requests": 0, "events": 0, "coalesced": 0, "dropped": 0}
        self._warned_unconfigured = False
        self._reset()
        _clients.add(self)

    def __repr__(self) -> str:  # never the API key
        return f"Client(url={self.url!r})"

    @property
    def configured(self) -> bool:
        return bool(self.url and self._api_key)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Condition()
        self._outbox = Outbox()
        self._cancelled: set[str] = set()
        self._watched: dict[str, int] = {}  # task id -> how many watch() calls are open
        self._watcher: CancelWatcher | None = None
        self._thread: threading.Thread | None = None
        self._http: httpx.Client | None = None
        self._busy = False
        self._closed = False

    # ---- the calls -------------------------------------------------------------------

    def register(self, task_id: str, user_id: int | str, task_type: str,
                 metadata: Any = None) -> Report:
        body: dict[str, Any] = {"task_id": task_id, "user_id": user_id, "task_type": task_type}
        if metadata is not None:
            body["metadata"] = metadata
        return self._queue("register", task_id, body, None)

    def event(self, task_id: str, status: str, *, key: str | None = None,
              **fields: Any) -> Report:
        """Queue one event. `key`: its idempotency key (default: a fresh one, kept across
        retries); give a stable one to make a redelivered task's report a no-op."""
        body = {"status": status, **{k: v for k, v in fields.items()
                                     if v is not None or k == "result"}}
        return self._queue("event", task_id, body, key)

    def is_cancelled(self, task_id: str) -> bool:
        """Whether the user cancelled `task_id`, as this client learnt it (from the watcher
        or the answer to a report): no request."""
        with self._lock:
            return task_id in self._cancelled

    def wait_cancelled(self, task_id: str, timeout: float | None) -> bool:
        """Wait up to `timeout` for the user's cancel of `task_id` (a watched task learns of
        it as soon as the server records it); whether it was cancelled."""
        with self._lock:
            return self._lock.wait_for(lambda: task_id in self._cancelled, timeout)

    def watch(self, task_id: str) -> None:
        """This process runs `task_id`: watch it for the user's cancel until as many
        `unwatch(task_id)` calls (`api.set_current` / `reset_current` do both)."""
        if os.getpid() != self._pid:
            self._reset()
        if not self.configured or self.watch_cancels <= 0 or self._transport is not None:
            return
        with self._lock:
            self._watched[task_id] = self._watched.get(task_id, 0) + 1
            if self._watcher is None:
                self._watcher = CancelWatcher(
                    self.url, self._api_key, wanted=self._to_watch,
                    on_cancel=self._mark_cancelled, limit=self.watch_cancels,
                    timeout=self.timeout, backoff=self.backoff, max_backoff=self.max_backoff)
            watcher = self._watcher
        watcher.changed()

    def unwatch(self, task_id: str) -> None:
        with self._lock:
            if os.getpid() != self._pid or task_id not in self._watched:
                return
            self._watched[task_id] -= 1
            if self._watched[task_id] <= 0:
                del self._watched[task_id]
            watcher = self._watcher
        if watcher is not None:
            watcher.changed()

    def _to_watch(self) -> list[str]:
        with self._lock:
            return [task for task in self._watched if task not in self._cancelled]

    def _mark_cancelled(self, task_id: str) -> None:
        with self._lock:
            self._cancelled.add(task_id)
            self._lock.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was answered or dropped (True), or
        `timeout` passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if os.getpid() != self._pid:
                return True
            if self._outbox:
                self._start_sender()  # a sender that died would leave them queued for good
            while self._outbox or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush (up to `timeout`), then stop the sender."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            watcher, self._watcher = self._watcher, None
        if watcher is not None and os.getpid() == self._pid:
            watcher.stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # ---- queueing ------------------------------------------------------------------

    def _queue(self, kind: str, task_id: str, body: dict[str, Any], key: str | None
               ) -> Report:
        if os.getpid() != self._pid:
            self._reset()
        if not self.configured:
            if not self._warned_unconfigured:
                self._warned_unconfigured = True
                log.warning("taskpush is not configured (pass url and api_key, or set "
                            "TASKPUSH_URL and TASKPUSH_API_KEY): task reports are dropped")
            return Report(task_id, None, 0)
        now = time.monotonic()
        progress = kind == "event" and body.get("status") == "progress"
        give_up = self.progress_give_up_after if progress else self.give_up_after
        item = Item(kind, task_id, body, deadline=now + give_up, queued_at=now,
                    key=key or uuid.uuid4().hex)
        with self._lock:
            if task_id in self._cancelled and kind == "event" and body["status"] not in TERMINAL:
                raise TaskCancelled(task_id)
            carrier = self._outbox.put(item)
            self.stats["coalesced"] = self._outbox.coalesced
            self._start_sender()
            if carrier is item:
                self._lock.notify_all()
        # A progress report is answered by the next flush; nobody should wait for it.
        return Report(task_id, carrier.ticket, self.wait, immediate=progress)

    def _start_sender(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="taskpush-sender",
                                            daemon=True)
            self._thread.start()

    # ---- the sender thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                items = self._next_request()
                if items is None:
                    http, self._http = self._http, None
                    break
                self._busy = True
            try:
                self._send(items)
            except Exception:  # a bug here must not stop reporting for good (callbacks
                log.exception("taskpush sender")  # cannot raise here: Ticket.resolve)
                for item in items:
                    item.ticket.resolve(None)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()
        if http is not None:
            http.close()

    def _next_request(self) -> list[Item] | None:
        """Under the lock: wait for work (progress alone waits up to max_delay to be
        coalesced), then take it. None when closed and empty."""
        while True:
            if not self._outbox:
                if self._closed:
                    return None
                self._lock.wait(1.0)
                continue
            oldest = self._outbox.oldest_progress_only()
            if oldest is not None and not self._closed:
                left = oldest + self.max_delay - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
            return self._outbox.take(self.max_batch_bytes)

    def _send(self, items: list[Item]) -> None:
        """Send what `take` gave, in order: items that are not JSON are dropped alone; a
        batch the server finds too large (413) is halved and each half sent in turn, until
        an event refused alone is dropped (the producer's bug: a result beyond the
        server's --max-json-bytes or --max-body-bytes)."""
        for item in items:
            if item.problem is not None:
                self._drop(item, item.problem)
        pending = [[item for item in items if item.problem is None]]
        while pending:
            batch = pending.pop(0)
            batch, status, body = self._deliver(batch)
            if not batch:
                continue
            if status == 413 and batch[0].kind == "event":
                if len(batch) > 1:
                    half = len(batch) // 2
                    pending[:0] = [batch[:half], batch[half:]]
                    continue
                self._drop(batch[0], f"{batch[0].describe()} dropped: the server refused it "
                           f"as too large (HTTP 413, {batch_size(batch)} bytes)")
                continue
            self._settle(batch, status, body)

    def _drop(self, item: Item, problem: str) -> None:
        self.stats["dropped"] += 1
        self._resolve(item, Outcome(None, problem=problem))

    def _deliver(self, items: list[Item]) -> tuple[list[Item], int | None, Any]:
        """One request for `items`, retried while it is worth it; items past their deadline
        are dropped with a warning. The items still live and the final answer."""
        delay = self.backoff
        warned = False
        while items:
            status, headers, body = self._post(items)
            wait = retry_after(status, headers)
            why = f"HTTP {status}" if status else "no answer"
            if wait is None:
                assert status is not None
                bad = malformed(items, status, body)
                if bad is None:
                    return items, status, body
                why, wait = bad, 0.0
                (log.info if warned else log.warning)(
                    "taskpush answered %s to %s: retrying", bad, items[0].describe())
                warned = True
            now = time.monotonic()
            for item in items:
                if item.deadline <= now:
                    self._drop(item, f"unanswered ({why}): dropped {item.describe()}")
            items = [item for item in items if item.deadline > now]
            time.sleep(max(wait, delay))
            delay = min(delay * 2, self.max_backoff)
        return items, None, None

    def _post(self, items: list[Item]) -> tuple[int | None, dict[str, str], Any]:
        if self._http is None:
            self._http = httpx.Client(base_url=self.url, timeout=self.timeout,
                                      headers={"X-API-Key": self._api_key},
                                      transport=self._transport)
        if items[0].kind == "register":
            path, payload = "/api/task/tasks", items[0].encoded or b""
        else:
            path, payload = "/api/task/events", batch_body(items)
            self.stats["events"] += len(items)
        self.stats["requests"] += 1
        try:
            resp = self._http.post(path, content=payload,
                                   headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:
            log.info("taskpush %s: %s", path, type(exc).__name__)
            return None, {}, None
        try:
            body = resp.json()
        except ValueError:
            body = None
        return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, body

    def _settle(self, items: list[Item], status: int | None, body: Any) -> None:
        assert status is not None
        if items[0].kind == "register":
            outcomes = [read_register(items[0], status, body)]
        else:
            outcomes = read_batch(items, status, body)
        for item, outcome in zip(items, outcomes):  # as many as items (read_*)
            self._resolve(item, outcome)

    def _resolve(self, item: Item, outcome: Outcome) -> None:
        if outcome.problem:
            log.warning("taskpush: %s", outcome.problem)
        if outcome.cancelled:
            self._mark_cancelled(item.task_id)
        terminal = item.body.get("status") in TERMINAL
        item.ticket.resolve(outcome.value, cancelled=outcome.cancelled and not terminal)


def _close_all() -> None:
    for client in list(_clients):
        if os.getpid() == client._pid:
            client.close(timeout=client.wait)


atexit.register(_close_all)
