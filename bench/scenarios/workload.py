"""workload: what users send. ``--workers`` task-queue workers (bench/workers.py, one
taskpush-client ``Client`` each) run tasks one after another for ``--workload-s`` seconds:
register, running, ``--workload-rate`` progress calls per second for ``--workload-task-s``
seconds, completed. The client coalesces progress, so the server sees fewer events than the
workers make calls. Each worker's tasks belong to one user with one WebSocket open.
Reports delivered updates per server CPU-second, and how old a delivered update is."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.common import make_token
from bench.launcher import Server, log
from bench.scenarios.base import Ctx, GenLoad, Noise
from bench.scenarios.stream import Latency, Meter, run_publishers, wait_delivered
from bench.wsclient import Stats, close_all, connect_many

mono = time.monotonic_ns
FIRST_UID = 300_001


@dataclass
class WorkloadResult:
    workers: int
    calls: int  # events the workers reported (state changes and progress calls)
    tasks: int
    requests: int  # HTTP requests the clients made
    events_sent: int  # events in those requests, after the client's coalescing
    dropped: int
    delivered: int  # updates that reached a socket
    latency: Latency  # age of a delivered update: from the worker's call to the socket
    server_cpu_s: float
    server_util: float
    delivered_per_server_cpu_s: float | None
    calls_per_server_cpu_s: float | None
    wall_s: float
    gen: GenLoad
    noise: Noise


async def run(ctx: Ctx, up: dict[str, Server]) -> dict[str, WorkloadResult]:
    a = ctx.args
    uids = list(range(FIRST_UID, FIRST_UID + a.workers))
    out = {}
    for k, (name, srv) in enumerate(up.items()):
        stats = Stats()
        conn = await connect_many(srv.ws_base, {u: make_token(ctx.env.secret, u) for u in uids},
                                  stats, a.connect_concurrency, 90)
        try:
            await srv.quiesce(3)
            step = f"work{k}"
            meter = Meter()
            cfg = {"step": step, "workers": a.workers, "rate": a.workload_rate,
                   "task_s": a.workload_task_s, "duration": a.workload_s,
                   "first_uid": FIRST_UID, "grace": 30}
            results, go = await run_publishers(ctx, srv, [], cfg, 1,
                                               lambda srv=srv, m=meter: m.start(srv),
                                               module="bench.workers")
            r = results[0]
            await wait_delivered(stats, step, r["events"], a.drain_s)
            wall = (mono() - go) / 1e9
            srv_cpu, gen, noise = meter.stop(ctx, results, wall)
            lat = list(stats.lat.get(step, ()))
            res = WorkloadResult(
                workers=a.workers, calls=r["calls"], tasks=r["tasks"], requests=r["requests"],
                events_sent=r["events"], dropped=r["dropped"], delivered=len(lat),
                latency=Latency.of(lat), server_cpu_s=round(srv_cpu, 3),
                server_util=round(srv_cpu / wall, 3),
                delivered_per_server_cpu_s=round(len(lat) / srv_cpu, 1) if srv_cpu else None,
                calls_per_server_cpu_s=round(r["calls"] / srv_cpu, 1) if srv_cpu else None,
                wall_s=round(wall, 3), gen=gen, noise=noise)
            log(f"  {name} workload: {res.calls} calls -> {res.events_sent} events in "
                f"{res.requests} requests -> {res.delivered} delivered, "
                f"{res.delivered_per_server_cpu_s} delivered/CPU-s, age p99 "
                f"{res.latency.p99_ms} ms, server util {res.server_util}")
            out[name] = res
        finally:
            await close_all(conn.clients)
    return out
