"""Long polls (`GET .../status?wait=S`) held open, counted per authenticated user: at most
`--max-polls-per-user` at once (each costs a file descriptor for up to 30 s), a poll
beyond that answers 429 with Retry-After at once. A poll's slot is released when it ends:
a change, its timeout, or its client hanging up (aiohttp does not cancel a handler whose
peer went away, so the wait looks at the connection every `HANGUP_CHECK` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from ..core.errors import TooManyPolls

HANGUP_CHECK = 1.0  # seconds between looks at a waiting poll's connection
RETRY_AFTER = 1  # seconds a refused poll is told to wait


class PollSlots:
    """How many long polls each user holds open; no I/O."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[int, int] = {}

    def held(self, user_id: int) -> int:
        return self._held.get(user_id, 0)

    @contextlib.contextmanager
    def slot(self, user_id: int) -> Iterator[None]:
        """One poll of `user_id` for the block's duration, or TooManyPolls (429)."""
        count = self._held.get(user_id, 0)
        if count >= self.limit:
            raise TooManyPolls(f"too many long polls open for this user (at most "
                               f"{self.limit}); follow many tasks with one WebSocket or "
                               "Server-Sent Events stream", retry_after=RETRY_AFTER)
        self._held[user_id] = count + 1
        try:
            yield
        finally:
            left = self._held[user_id] - 1
            if left:
                self._held[user_id] = left
            else:
                del self._held[user_id]


async def wait_for_change(changed: asyncio.Future[None], seconds: float,
                          gone: Callable[[], bool]) -> bool:
    """True when `changed` resolves within `seconds`; False at the timeout, or as soon as
    `gone()` (the client hung up) is seen."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return False
        done, _ = await asyncio.wait({changed}, timeout=min(left, HANGUP_CHECK))
        if done:
            return True
        if gone():
            return False
