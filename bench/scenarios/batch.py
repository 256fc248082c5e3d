"""batch: closed-loop posters (``--batch-concurrency``, one per publisher process at least)
send ``POST /api/task/events`` with ``--batch-size`` events each for ``--batch-s`` seconds.
Reports events/s acknowledged (committed, for the servers with a database), events/s
delivered to the sockets, and latencies."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.common import ns_to_ms
from bench.launcher import log
from bench.scenarios.base import Ctx, GenLoad, Noise
from bench.scenarios.stream import Lane, Latency, Meter, run_publishers, wait_delivered

mono = time.monotonic_ns


@dataclass
class BatchResult:
    batch_size: int
    concurrency: int
    batches: int
    events_ok: int
    events_err: int
    events_per_s: float  # acknowledged
    delivered: int
    delivered_per_s: float
    latency: Latency  # publish-to-receive
    ack_p99_ms: float | None
    server_cpu_s: float
    server_util: float
    events_per_server_cpu_s: float | None
    wall_s: float
    gen: GenLoad
    noise: Noise


async def run(ctx: Ctx, lanes: list[Lane]) -> dict[str, BatchResult]:
    a = ctx.args
    out = {}
    for ln in lanes:
        await ln.srv.quiesce(3)
        nproc = max(1, min(a.pub_procs, a.batch_concurrency))
        meter = Meter()
        cfg = {"mode": "batch", "step": "batch", "batch_size": a.batch_size,
               "concurrency": max(1, a.batch_concurrency // nproc), "duration": a.batch_s,
               "max_batches": a.batch_max, "conns": max(1, a.batch_concurrency // nproc),
               "progress": ln.next_progress()}
        ln.stats.lat.pop("batch", None)
        results, go = await run_publishers(ctx, ln.srv, ln.tasks, cfg, nproc,
                                           lambda ln=ln, m=meter: m.start(ln.srv))
        ev_ok = sum(r["events_ok"] for r in results)
        await wait_delivered(ln.stats, "batch", ev_ok, a.drain_s)
        end = mono()
        wall = (end - go) / 1e9
        srv_cpu, gen, noise = meter.stop(ctx, results, wall)
        lat = list(ln.stats.lat.get("batch", ()))
        last = ln.stats.last_recv.get("batch", end)
        pub_s = max(r["elapsed_s"] for r in results)
        b = BatchResult(
            batch_size=a.batch_size, concurrency=cfg["concurrency"] * nproc,
            batches=sum(r["batches"] for r in results), events_ok=ev_ok,
            events_err=sum(r["events_err"] for r in results),
            events_per_s=round(ev_ok / pub_s, 1), delivered=len(lat),
            delivered_per_s=round(len(lat) / max(1e-9, (last - go) / 1e9), 1),
            latency=Latency.of(lat),
            ack_p99_ms=ns_to_ms(max((r["ack_p99_ns"] or 0) for r in results)),
            server_cpu_s=round(srv_cpu, 3), server_util=round(srv_cpu / wall, 3),
            events_per_server_cpu_s=round(ev_ok / srv_cpu, 1) if srv_cpu > 0 else None,
            wall_s=round(wall, 3), gen=gen, noise=noise,
        )
        gl = " ".join(f"{k} {v:.2f}" for k, v in gen.procs.items())
        log(f"  {ln.name} batch: {b.events_per_s} ev/s acked, {b.delivered_per_s} delivered/s, "
            f"p99 {b.latency.p99_ms} ms, ack p99 {b.ack_p99_ms} ms, server util "
            f"{b.server_util}, generator [{gl}]{' GENERATOR-BOUND' if gen.bound else ''}")
        out[ln.name] = b
    return out
