"""Who is connected and who gets which update.

The hub knows connections only as `Subscriber`s (a user id, `deliver` and `flush`), never
aiohttp. Each committed change is serialized once into an `Update` and handed to every
socket of the task's owner and every socket subscribed to the task; `deliver` only
queues, so one slow socket never delays the others, and each socket is flushed once after
the whole commit is queued (so a task's progress within one commit is coalesced, latest
wins, before anything is written). Long-poll waiters are woken here too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from ..core.model import Kind, Published
from .messages import Update, deleted_update, status_update


class Subscriber(Protocol):
    user_id: int

    def deliver(self, update: Update) -> None: ...

    def flush(self) -> None: ...


def update_for(outcome: Published) -> Update | None:
    """The pushed form of a committed change, or None if nothing changed."""
    task = outcome.task
    if not outcome.news or task is None or outcome.seq is None:
        return None  # refused, or an idempotent retry: nothing new
    if outcome.kind is Kind.DELETED:
        return deleted_update(task.task_id, task.user_id, outcome.seq)
    return status_update(task)


class Hub:
    def __init__(self) -> None:
        self._by_user: dict[int, dict[Subscriber, None]] = {}  # insertion order: oldest first
        self._by_task: dict[str, set[Subscriber]] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.updates_published = 0

    # ---- connections -----------------------------------------------------------------

    def attach(self, conn: Subscriber) -> None:
        self._by_user.setdefault(conn.user_id, {})[conn] = None

    def detach(self, conn: Subscriber, subscriptions: Iterable[str] = ()) -> None:
        conns = self._by_user.get(conn.user_id)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self._by_user[conn.user_id]
        for task_id in subscriptions:
            self.unsubscribe(conn, task_id)

    def connections_of(self, user_id: int) -> list[Subscriber]:
        """The user's sockets, oldest first."""
        return list(self._by_user.get(user_id, ()))

    @property
    def connection_count(self) -> int:
        return sum(len(conns) for conns in self._by_user.values())

    def subscribe(self, conn: Subscriber, task_id: str) -> None:
        self._by_task.setdefault(task_id, set()).add(conn)

    def unsubscribe(self, conn: Subscriber, task_id: str) -> None:
        subs = self._by_task.get(task_id)
        if subs is not None:
            subs.discard(conn)
            if not subs:
                del self._by_task[task_id]

    # ---- updates ---------------------------------------------------------------------

    def publish(self, outcomes: Iterable[Published]) -> None:
        """Called by the store right after a commit, in seq order."""
        touched: dict[Subscriber, None] = {}
        for outcome in outcomes:
            update = update_for(outcome)
            if update is None:
                continue
            self.updates_published += 1
            owners = self._by_user.get(update.user_id)
            watchers = self._by_task.get(update.task_id)
            if owners:
                for conn in list(owners):
                    conn.deliver(update)
                    touched[conn] = None
            if watchers:
                for conn in list(watchers):
                    if owners is None or conn not in owners:
                        conn.deliver(update)
                        touched[conn] = None
            waiters = self._waiters.pop(update.task_id, None)
            if waiters:
                for future in waiters:
                    if not future.done():
                        future.set_result(None)
        for conn in touched:
            conn.flush()

    def release_watchers(self) -> None:
        """Wake every long poll now, as if its task had changed: at shutdown a poll answers
        with the task as it is instead of holding the server up to its `wait`."""
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    @contextlib.contextmanager
    def watching(self, task_id: str) -> Iterator[asyncio.Future[None]]:
        """A future resolved at the task's next change. Enter it BEFORE reading the task,
        so a change that lands between the read and the wait is not missed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(task_id, set())
        waiters.add(future)
        try:
            yield future
        finally:
            waiters.discard(future)
            if not waiters and self._waiters.get(task_id) is waiters:
                del self._waiters[task_id]
