"""TaskService: the one path every change takes, whoever asks for it.

REST producers, in-process producers, user cancel/delete, the demo and the sweeper all call
this service; it submits operations to the store (which commits, then pushes through the
hub) and raises the domain error of a refused operation. It also keeps the asyncio tasks of
in-process jobs, so a cancel can interrupt them and shutdown can end them as interrupted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from ..core.model import (
    TERMINAL,
    Change,
    Delete,
    Operation,
    Outcome,
    Published,
    Register,
    Task,
)
from ..storage.api import Store

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"


class TaskService:
    def __init__(self, store: Store, *, max_active: int) -> None:
        self.store = store
        self.max_active = max_active
        self._runners: dict[str, asyncio.Task[object]] = {}

    async def _one(self, op: Operation) -> Outcome:
        outcome = await self.store.submit(op)
        if outcome.error is not None:
            raise outcome.error
        return outcome

    async def register(self, op: Register) -> Outcome:
        if op.max_active is None:
            op = dataclasses.replace(op, max_active=self.max_active)
        return await self._one(op)

    async def change(self, op: Change) -> Task:
        outcome = await self._one(op)
        assert outcome.task is not None
        if outcome.task.status in TERMINAL:
            self._runners.pop(op.task_id, None)  # nothing left to interrupt
        return outcome.task

    async def apply_many(self, ops: Sequence[Operation]) -> list[Outcome]:
        return await self.store.submit_many(ops)

    async def cancel(self, task_id: str, owner: int | None) -> Task:
        """Cancel an active task: committed and pushed as cancelled, then its in-process
        coroutine (if any) is interrupted; an HTTP producer learns it from 409 answers."""
        runner = self._runners.get(task_id)  # change() forgets it once the task is final
        task = await self.change(
            Change(task_id, "cancelled", owner=owner, cancel_requested=True,
                   message="cancelled by the user")
        )
        if runner is not None and not runner.done() and runner is not asyncio.current_task():
            runner.cancel()
        return task

    async def delete(self, task_id: str, owner: int | None) -> Task:
        outcome = await self._one(Delete(task_id, owner=owner))
        assert outcome.task is not None
        return outcome.task

    # ---- in-process jobs -------------------------------------------------------------

    def attach_runner(self, task_id: str, runner: asyncio.Task[object]) -> None:
        """`runner` (the coroutine that last reported on the task) is what a user's cancel
        interrupts; the entry goes when the task finishes or the coroutine ends."""
        if self._runners.get(task_id) is runner:
            return  # already attached: one done-callback per task and coroutine
        self._runners[task_id] = runner
        runner.add_done_callback(lambda _: self._runners.pop(task_id, None)
                                 if self._runners.get(task_id) is runner else None)

    def changes_committed_elsewhere(self, outcomes: Sequence[Published]) -> None:
        """Changes another node committed (cluster mode): a cancel of a task whose
        in-process coroutine runs here interrupts it, as a cancel through this node does."""
        for outcome in outcomes:
            task = outcome.task
            if task is None or task.status != "cancelled" or not task.cancel_requested:
                continue
            runner = self._runners.pop(task.task_id, None)
            if (runner is not None and not runner.done()
                    and runner is not asyncio.current_task()):
                runner.cancel()

    async def interrupt_inprocess(self, reason: str) -> int:
        """End every active in-process task as failed/interrupted, then stop its coroutine.

        Used at shutdown (our jobs are about to die) and at start (the previous process's
        jobs died with it): a task nobody will ever move again must not look running.
        """
        tasks = await self.store.active_by_origin("inprocess")
        ops = [
            Change(t.task_id, "failed", error=reason, error_type=INTERRUPTED)
            for t in tasks
        ]
        outcomes = await self.apply_many(ops) if ops else []
        # Only the coroutines of the tasks just interrupted: a runner may be a long-lived
        # task that merely called the API (a handler, a program's main task), possibly the
        # very task running this shutdown; cancelling it would abort the shutdown itself.
        interrupted = {t.task_id for t in tasks}
        current = asyncio.current_task()
        runners = {r for task_id, r in self._runners.items()
                   if task_id in interrupted and r is not current and not r.done()}
        self._runners = {}
        for runner in runners:
            runner.cancel()
        if runners:
            await asyncio.wait(runners, timeout=2.0)
        return sum(1 for o in outcomes if o.ok)
