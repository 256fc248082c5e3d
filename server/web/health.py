"""`/healthz` and `/metrics`: whether this node can serve, and its counters."""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import keys
from .metrics import CONTENT_TYPE


async def healthz(request: web.Request) -> web.Response:
    """503 while the store refuses writes (a state it keeps: this never waits on the
    writer) or reads do not answer within --db-timeout."""
    store = request.app[keys.STORE]
    reason = store.unavailable()
    if reason is None:
        try:
            await asyncio.wait_for(store.ping(), store.timeout)
        except Exception:
            reason = "storage unavailable: the database does not answer reads"
    body = {"status": "ok" if reason is None else "unavailable", "database": reason is None,
            "epoch": store.epoch, "seq": store.last_seq,
            "connections": request.app[keys.HUB].connection_count}
    if reason is None:
        return web.json_response(body)
    body["message"] = reason
    return web.json_response(body, status=503, headers={"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    metrics_ = request.app[keys.METRICS]
    metrics_.storage_available.set(0 if request.app[keys.STORE].unavailable() else 1)
    return web.Response(body=metrics_.render(),
                        headers={"Content-Type": CONTENT_TYPE})
