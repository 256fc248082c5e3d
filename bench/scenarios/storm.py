"""storm: ``--storm-clients`` users, each with ``--storm-tasks`` tasks registered and set
``running`` beforehand, all connect at once (``--storm-concurrency N``: N at a time) with
bench/wsclient.py's light client. Reports the time until every client has ``active_tasks``
with the right count, per-client latencies, server CPU per client and kernel SYN drops.
A cluster target (bench/cluster.py) spreads the clients over its nodes (``ws_bases``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson

from bench.common import listen_overflows, make_token, ns_to_ms, pct, self_cpu_s
from bench.launcher import Server, log
from bench.scenarios.base import Ctx, GenLoad, Noise, Window
from bench.scenarios.stream import producer_session, register_tasks
from bench.wsclient import Connected, Stats, close_all, connect_many


@dataclass
class StormResult:
    clients: int
    tasks_per_client: int
    ready_ok: int  # clients whose active_tasks had the right count
    wrong_count: int
    timed_out: int
    all_ready_s: float | None  # None unless every client was ready
    last_ready_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_ms_per_client: float
    syn_drops: int
    gen: GenLoad
    noise: Noise
    errors: dict[str, int] = field(default_factory=dict)


async def set_running(ctx: Ctx, srv: Server, task_ids: list[str]) -> dict[str, int]:
    counts = {"ok": 0, "bad": 0}
    async with producer_session(ctx, 4) as s:
        for i in range(0, len(task_ids), 500):
            events = [{"task_id": t, "status": "running", "progress": 1, "message": "storm"}
                      for t in task_ids[i : i + 500]]
            async with s.post(srv.base + "/api/task/events",
                              data=orjson.dumps({"events": events})) as r:
                raw = await r.read()
                if r.status != 200:
                    counts["bad"] += len(events)
                    continue
                for x in orjson.loads(raw)["data"]["results"]:
                    counts["ok" if x.get("ok") else "bad"] += 1
    return counts


async def connect_spread(bases: list[str], tokens: dict[int, str], stats: Stats,
                         concurrency: int, timeout: float) -> Connected:
    """All at once, client k on node k mod N (what a proxy without stickiness does)."""
    if len(bases) == 1:
        return await connect_many(bases[0], tokens, stats, concurrency, timeout)
    items = list(tokens.items())
    parts = await asyncio.gather(*(
        connect_many(base, dict(items[k::len(bases)]), stats, concurrency, timeout)
        for k, base in enumerate(bases)))
    t0 = min(p.t0 for p in parts)
    end = max(p.t0 + p.wall_s * 1e9 for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p.errors.items():
            errors[k] = errors.get(k, 0) + v
    return Connected(t0, (end - t0) / 1e9, [c for p in parts for c in p.clients],
                     [c for p in parts for c in p.ok], sum(p.timed_out for p in parts), errors)


async def run(ctx: Ctx, srv: Server) -> StormResult:
    a = ctx.args
    c, k = a.storm_clients, a.storm_tasks
    uids = list(range(200_001, 200_001 + c))
    specs = [(f"storm-{u}-{j}", u) for u in uids for j in range(k)]
    reg = await register_tasks(ctx, srv, specs)
    run_ = await set_running(ctx, srv, [t for t, _ in specs])
    log(f"  storm setup: registered {reg}, set running {run_}")
    await srv.quiesce(5)
    tokens = {u: make_token(ctx.env.secret, u) for u in uids}
    stats = Stats()
    ov0 = listen_overflows()
    cpu0, me0, window = srv.cpu(), self_cpu_s(), Window(ctx.env.server_cpus)
    r = await connect_spread(getattr(srv, "ws_bases", [srv.base]), tokens, stats,
                             a.storm_concurrency, a.storm_timeout)
    cpu1, me1 = srv.cpu(), self_cpu_s()
    noise = window.noise(cpu1 - cpu0)
    ov1 = listen_overflows()
    try:
        good = [cl for cl in r.ok if cl.active_count == k]
        times = sorted(cl.t_ready - r.t0 for cl in good)
        res = StormResult(
            clients=c, tasks_per_client=k, ready_ok=len(good),
            wrong_count=len(r.ok) - len(good), timed_out=r.timed_out,
            all_ready_s=round(times[-1] / 1e9, 3) if len(good) == c and times else None,
            last_ready_s=round(times[-1] / 1e9, 3) if times else None,
            p50_ms=ns_to_ms(pct(times, 50)), p99_ms=ns_to_ms(pct(times, 99)),
            server_cpu_ms_per_client=round((cpu1 - cpu0) * 1000 / max(len(good), 1), 3),
            # SYNs dropped because the accept queue (listen backlog) was full: each costs the
            # client a 1 s (then 3 s, 7 s) retransmit, which dominates the storm time.
            syn_drops=ov1.get("ListenOverflows", 0) - ov0.get("ListenOverflows", 0),
            gen=GenLoad.of({"receivers": me1 - me0}, r.wall_s, ctx.env.loadgen_ncpu),
            noise=noise, errors=r.errors,
        )
    finally:
        await close_all(r.clients)
    log(f"  storm: {res.ready_ok}/{c} ready, all in {res.all_ready_s} s, p99 {res.p99_ms} ms, "
        f"server CPU/client {res.server_cpu_ms_per_client} ms, generator {res.gen.total}, "
        f"SYN drops {res.syn_drops}")
    return res
