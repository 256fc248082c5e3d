"""Background upkeep: active tasks with no change for `--stale-after` seconds are failed
(error_type "stale"), and finished tasks older than `--retention-days` are deleted (their
deletion is pushed like any other change); in cluster mode, the in-process tasks of a node
gone for `--node-timeout` end interrupted. All go through the TaskService path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from ..core.errors import StorageUnavailable
from ..core.model import Change, Delete, utc_iso
from ..service.tasks import INTERRUPTED
from . import keys

log = logging.getLogger(__name__)
STALE = "stale"


async def sweep_once(app: web.Application) -> tuple[int, int]:
    """One pass; returns (tasks marked stale, tasks deleted)."""
    config = app[keys.CONFIG]
    store = app[keys.STORE]
    tasks = app[keys.TASKS]
    now = time.time()
    stale = await store.active_before(utc_iso(now - config.stale_after))
    ops = [
        Change(t.task_id, "failed", error=f"no update for {config.stale_after:g} seconds",
               error_type=STALE, expect_seq=t.seq)
        for t in stale
    ]
    marked = sum(1 for o in await tasks.apply_many(ops) if o.ok) if ops else 0
    cutoff = utc_iso(now - config.retention_days * 86400)
    old = await store.finished_before(cutoff)
    deletes = [Delete(t.task_id) for t in old]
    deleted = sum(1 for o in await tasks.apply_many(deletes) if o.ok) if deletes else 0
    await store.purge_tombstones(cutoff)
    if marked or deleted:
        log.info("sweep: %d stale task(s) failed, %d old task(s) deleted", marked, deleted)
    return marked, deleted


async def _loop(app: web.Application) -> None:
    interval = app[keys.CONFIG].sweep_interval
    while True:
        try:
            if await app[keys.STORE].lead("sweep"):  # one node of a cluster sweeps
                await sweep_once(app)
        except StorageUnavailable:
            pass  # the store logs the outage once; the next pass tries again
        except Exception:
            log.exception("sweep failed")
        await asyncio.sleep(interval)


async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_loop(app), name="taskpush-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def end_gone_nodes_tasks(app: web.Application) -> int:
    """Cluster mode: in-process tasks of a node gone for --node-timeout end failed /
    interrupted (pushed like any change); one node does it (`lead("nodes")`)."""
    store = app[keys.STORE]
    if not await store.lead("nodes"):
        return 0
    gone = await store.gone_nodes_tasks()
    if not gone:
        return 0
    ops = [Change(t.task_id, "failed", error="the node running this task is gone",
                  error_type=INTERRUPTED, expect_seq=t.seq) for t in gone]
    ended = sum(1 for o in await app[keys.TASKS].apply_many(ops) if o.ok)
    if ended:
        log.warning("marked %d in-process task(s) of gone node(s) as interrupted", ended)
    return ended


async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Looks for gone nodes a few times per --node-timeout (SQLite: never any)."""
    interval = app[keys.CONFIG].node_timeout / 3

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await end_gone_nodes_tasks(app)
            except StorageUnavailable:
                pass  # the store logs the outage once; the next round tries again
            except Exception:
                log.exception("ending the tasks of gone nodes failed")

    task = asyncio.create_task(loop(), name="taskpush-cluster")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
