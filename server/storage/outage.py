"""A storage outage, the same for every engine: the state /healthz reports, the one log
line when it begins and the one when it ends, the 503 its callers get, and (for an engine
that asks for it) a background write probe that ends it when a write commits again.

Each dialect says what a failure is (`classify(exc) -> Failure | None`: None for a bug,
raised as is); this module decides what follows from it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..core.errors import StorageUnavailable

log = logging.getLogger(__name__)

PROBE_INTERVAL = 0.5  # seconds between background write probes while storage is unavailable


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the storage failed a call: `reason` (the 503's words), `retry` (callers with
    time left are tried again: the cause may end by itself within seconds), `outage`
    (False: one transaction lost, the database is fine, so no outage begins)."""

    reason: str
    retry: bool = False
    outage: bool = True


class Outage:
    """The outage state of one store. `where` names the database in the log (never a
    password); `refused()` counts the callers answered 503 so far (the writer's count);
    `probe()`, if given, is a small write tried every PROBE_INTERVAL while it lasts."""

    def __init__(self, where: str, timeout: Callable[[], float],
                 refused: Callable[[], int],
                 probe: Callable[[], Awaitable[object]] | None = None) -> None:
        self.where = where
        self.reason: str | None = None  # why writes are refused now; None: they are not
        self._timeout = timeout
        self._refused = refused
        self._probe = probe
        self._since = 0.0
        self._refused_then = 0  # the writer's refusal count when the outage began
        self._prober: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def retry_after(self) -> int:
        """The Retry-After of a 503: the store's timeout, in whole seconds."""
        return max(1, math.ceil(self._timeout()))

    def error(self, failure: Failure) -> StorageUnavailable:
        """The 503 for `failure`, beginning an outage (unless it is not one)."""
        if failure.outage:
            if self.reason is None:
                log.warning("storage unavailable: %s (%s); writes answer 503 until it"
                            " recovers", failure.reason, self.where)
                self._since = time.monotonic()
                self._refused_then = self._refused()
                if self._probe is not None and self._prober is None and not self._closed:
                    self._prober = asyncio.get_running_loop().create_task(
                        self._probe_until_recovered(), name="taskpush-storage-probe")
            self.reason = failure.reason
        exc = StorageUnavailable(f"storage unavailable: {failure.reason}", self.retry_after)
        exc.retry_until_deadline = failure.retry
        return exc

    def recovered(self) -> None:
        """A write committed: the outage, if any, is over."""
        if self.reason is not None:
            log.warning("storage available again after %.1f s (%d write(s) refused"
                        " meanwhile)", time.monotonic() - self._since,
                        self._refused() - self._refused_then)
            self.reason = None

    def unavailable(self) -> str | None:
        return None if self.reason is None else f"storage unavailable: {self.reason}"

    async def _probe_until_recovered(self) -> None:
        """While the outage lasts, try a small write now and then, so health recovers by
        itself when the lock, the disk or the server frees, even if nobody writes."""
        assert self._probe is not None
        try:
            while self.reason is not None:
                await asyncio.sleep(PROBE_INTERVAL)
                if self.reason is None:
                    break
                with contextlib.suppress(StorageUnavailable):
                    await self._probe()
        finally:
            self._prober = None

    async def close(self) -> None:
        """Stop the probe (and start no other)."""
        self._closed = True
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
