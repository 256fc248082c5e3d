"""idle: ``--idle`` authenticated WebSockets (each waits for ``active_tasks``) that sit idle,
then close. Reports the server's RSS per socket, what is kept after closing them, and the
server's CPU per authenticated connect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bench.common import make_token
from bench.launcher import Server
from bench.scenarios.base import Ctx, Noise, Window
from bench.wsclient import Stats, close_all, connect_many


@dataclass
class IdleResult:
    connections: int
    connected_ok: int
    connect_all_s: float
    server_cpu_ms_per_conn: float
    rss_before_mb: float
    rss_open_mb: float
    rss_per_conn_kb: float
    rss_after_close_mb: float
    rss_retained_per_conn_kb: float
    noise: Noise
    errors: dict[str, int] = field(default_factory=dict)


async def run(ctx: Ctx, srv: Server) -> IdleResult:
    a = ctx.args
    n = a.idle
    stats = Stats()
    secret = ctx.env.secret
    # Warm the code paths (imports, first handshake) so they do not count as per-socket RSS.
    warm = await connect_many(srv.base, {u: make_token(secret, u)
                                         for u in range(1_000_001, 1_000_021)}, stats, 20, 20)
    await close_all(warm.clients)
    await srv.quiesce(3)
    await asyncio.sleep(0.3)
    tokens = {u: make_token(secret, u) for u in range(1, n + 1)}
    rss0 = srv.rss_kb()
    cpu0, window = srv.cpu(), Window(ctx.env.server_cpus)
    r = await connect_many(srv.base, tokens, stats, a.connect_concurrency, 90)
    cpu1 = srv.cpu()
    noise = window.noise(cpu1 - cpu0)
    await asyncio.sleep(a.settle_s)
    await srv.quiesce(3)
    rss1 = srv.rss_kb()
    ok = len(r.ok)
    await close_all(r.clients)
    await asyncio.sleep(a.settle_s)
    await srv.quiesce(3)
    await asyncio.sleep(a.settle_s)
    rss2 = srv.rss_kb()
    return IdleResult(
        connections=n, connected_ok=ok, connect_all_s=round(r.wall_s, 3),
        server_cpu_ms_per_conn=round((cpu1 - cpu0) * 1000 / max(ok, 1), 3),
        rss_before_mb=round(rss0 / 1024, 2), rss_open_mb=round(rss1 / 1024, 2),
        rss_per_conn_kb=round((rss1 - rss0) / max(ok, 1), 2),
        rss_after_close_mb=round(rss2 / 1024, 2),
        rss_retained_per_conn_kb=round((rss2 - rss0) / max(ok, 1), 2),
        noise=noise, errors=r.errors,
    )
