"""`CancelWatcher`: learns of a user's cancel while a task runs, without waiting for the
task's next report.

One thread per client with an event loop of its own long-polls the status of the tasks this
process is running (`GET /api/task/task/{id}/status` with the producer key, `?wait=` and
`If-None-Match`, one keep-alive connection each, at most `limit` tasks at once): when one
turns `cancelled`, `on_cancel(task_id)` is called at once, so the task's next `progress()`
raises `TaskCancelled` and `is_cancelled()` says so. A finished task stops being watched.
Errors only slow it down (backoff); a server that refuses the producer's read (401/403: an
older taskpush) turns it off with one warning, and cancels are then learnt from the answer
to the task's next report, as before. It never raises into a worker's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from .outbox import TERMINAL

log = logging.getLogger("taskpush_client")

POLL_WAIT = 25  # seconds one long poll is held (the server's limit is 30)


class CancelWatcher:
    def __init__(self, url: str, api_key: str, *, wanted: Callable[[], list[str]],
                 on_cancel: Callable[[str], None], limit: int, timeout: float,
                 backoff: float, max_backoff: float) -> None:
        self.url, self._api_key = url, api_key
        self._wanted, self._on_cancel = wanted, on_cancel
        self.limit, self.timeout = limit, timeout
        self.backoff, self.max_backoff = backoff, max_backoff
        self.refused = False  # the server does not let the producer key read a status
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="taskpush-watcher",
                                        daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """The set of tasks to watch changed (any thread)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended
                loop.call_soon_threadsafe(wake.set)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stopped = True
        self.changed()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception:  # a bug here must not reach anyone; reports still work
            log.exception("taskpush cancel watcher")

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        polls: dict[str, asyncio.Task[None]] = {}
        timeout = httpx.Timeout(self.timeout, read=POLL_WAIT + self.timeout)
        limits = httpx.Limits(max_connections=self.limit, max_keepalive_connections=self.limit)
        async with httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits,
                                     headers={"X-API-Key": self._api_key}) as http:
            try:
                while not self._stopped:
                    wanted = [] if self.refused else self._wanted()[:self.limit]
                    for task_id in set(polls) - set(wanted):
                        polls.pop(task_id).cancel()
                    for task_id in wanted:
                        if task_id not in polls:
                            polls[task_id] = asyncio.ensure_future(self._poll(http, task_id))
                    await self._wake.wait()
                    self._wake.clear()
            finally:
                for poll in polls.values():
                    poll.cancel()
                await asyncio.gather(*polls.values(), return_exceptions=True)

    async def _poll(self, http: httpx.AsyncClient, task_id: str) -> None:
        """Watch one task until it is cancelled (then tell), finished, or unwatched."""
        path = f"/api/task/task/{quote(task_id, safe='')}/status"
        etag: str | None = None
        delay = self.backoff
        while True:
            headers = {} if etag is None else {"If-None-Match": etag}
            params = {} if etag is None else {"wait": str(POLL_WAIT)}
            asked = asyncio.get_running_loop().time()
            try:
                resp = await http.get(path, headers=headers, params=params)
            except httpx.HTTPError as exc:
                log.info("taskpush status of %s: %s", task_id, type(exc).__name__)
                resp = None
            status = None if resp is None else resp.status_code
            # a 304 before the wait ended: something between ignores it; do not spin
            if status == 304 and asyncio.get_running_loop().time() - asked > POLL_WAIT / 2:
                delay = self.backoff  # the wait ended with no change: ask again
                continue
            if resp is not None and status == 200:
                task = _task(resp)
                if task is not None:
                    if task.get("status") == "cancelled":
                        self._on_cancel(task_id)
                        return
                    if task.get("status") in TERMINAL:
                        return
                    new = resp.headers.get("etag")
                    if new and new != etag:  # else a proxy answered at once: slow down
                        etag, delay = new, self.backoff
                        continue
            elif status in (401, 403):
                if not self.refused:
                    self.refused = True
                    log.warning("taskpush refused the producer key a task's status (HTTP %s):"
                                " a cancel is learnt from the task's next report only", status)
                return
            # 404: not registered yet (its registration may still be queued); 429, 5xx,
            # no answer, or an answer that is not taskpush's: again, later
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)


def _task(resp: httpx.Response) -> dict[str, Any] | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    return data if isinstance(data, dict) else None
