"""fanout: one update to many sockets. ``--fanout`` shapes ``USERSxSOCKETS@RATE`` (default
``50x20@300,10x200@60``): USERS users with one task each and SOCKETS WebSockets each
(browser tabs), plus ``--fanout-admins`` admin sockets subscribed to every task (each admin
socket subscribes to at most SUBSCRIBE_SLICE tasks, under the per-socket message rate, so
an admin is several sockets); single events at RATE/s for ``--fanout-s`` seconds. Every
update goes to SOCKETS + admins sockets. Reports deliveries per server CPU-second."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import orjson

from bench import profile
from bench.common import make_token
from bench.launcher import Server, log
from bench.scenarios.base import Ctx, GenLoad, Noise
from bench.scenarios.stream import (
    Lane,
    Latency,
    Meter,
    register_tasks,
    run_publishers,
    wait_delivered,
)
from bench.wsclient import close_all, connect_many

mono = time.monotonic_ns
TASKPUSH_SOCKETS_PER_USER = 20  # run.py's --max-connections-per-user default
SUBSCRIBE_SLICE = 30  # below taskpush's default burst of 40 messages per socket
FIRST_UID = 400_001
FIRST_ADMIN = 490_001


@dataclass(frozen=True)
class Shape:
    users: int
    sockets: int
    rate: float

    @property
    def label(self) -> str:
        return f"{self.users}x{self.sockets}@{self.rate:g}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        size, _, rate = text.strip().partition("@")
        users, _, sockets = size.partition("x")
        return cls(int(users), int(sockets), float(rate))


@dataclass
class FanoutResult:
    shape: str
    users: int
    sockets_per_user: int
    admin_subscribers: int  # admin sockets each update also goes to
    sockets_open: int
    rate: float
    events_ok: int
    deliveries_expected: int
    delivered: int
    latency: Latency  # publish-to-receive, every delivery
    server_cpu_s: float
    server_util: float
    deliveries_per_server_cpu_s: float | None
    wall_s: float
    gen: GenLoad
    noise: Noise
    close_codes: dict[str, int]  # sockets the server closed during the shape

    @property
    def delivered_ratio(self) -> float | None:
        return (round(self.delivered / self.deliveries_expected, 4)
                if self.deliveries_expected else None)


class FanLane(Lane):
    """A stream lane that also counts the sockets it opened (users' and admins')."""

    def __init__(self, name: str, srv: Server) -> None:
        super().__init__(name, srv)
        self.open = 0


async def setup(ctx: Ctx, ln: FanLane, shape: Shape, admins: int) -> None:
    a = ctx.args
    uids = list(range(FIRST_UID, FIRST_UID + shape.users))
    ln.tasks = [f"fan-{u}" for u in uids]
    await register_tasks(ctx, ln.srv, list(zip(ln.tasks, uids, strict=True)))
    tokens = {u: make_token(ctx.env.secret, u) for u in uids}
    for _ in range(shape.sockets):
        r = await connect_many(ln.srv.ws_base, tokens, ln.stats, a.connect_concurrency, 90)
        ln.clients += r.clients
        ln.open += len(r.ok)
    slices = [ln.tasks[i:i + SUBSCRIBE_SLICE] for i in range(0, len(ln.tasks), SUBSCRIBE_SLICE)]
    admin_uids = list(range(FIRST_ADMIN, FIRST_ADMIN + admins * len(slices)))
    if admin_uids:
        r = await connect_many(ln.srv.ws_base, {u: make_token(ctx.env.secret, u, admin=True)
                                                for u in admin_uids},
                               ln.stats, a.connect_concurrency, 90)
        ln.clients += r.clients
        ln.open += len(r.ok)
        by_uid = dict(zip(admin_uids, r.clients, strict=True))
        want = 0
        for k, uid in enumerate(admin_uids):
            for tid in slices[k % len(slices)]:
                by_uid[uid].send_text(orjson.dumps({"type": "subscribe", "task_id": tid}))
                want += 1
        end = time.monotonic() + 30
        while ln.stats.subscribed < want and time.monotonic() < end:
            await asyncio.sleep(0.02)
    log(f"  {ln.name} fanout {shape.label}: {ln.open} sockets open, "
        f"{ln.stats.subscribed} subscriptions")


async def measure(ctx: Ctx, ln: FanLane, shape: Shape, admins: int, step: str
                  ) -> FanoutResult:
    a = ctx.args
    await ln.srv.quiesce(3)
    per_update = shape.sockets + admins
    meter = Meter()
    cfg = {"mode": "single", "step": step, "rate": shape.rate, "duration": a.fanout_s,
           "conns": a.pub_conns, "progress": 50, "grace": 5.0}
    results, go = await run_publishers(ctx, ln.srv, ln.tasks, cfg, a.pub_procs,
                                       lambda: meter.start(ln.srv))
    ok = sum(r["ok"] for r in results)
    await wait_delivered(ln.stats, step, ok * per_update, a.drain_s)
    wall = (mono() - go) / 1e9
    srv_cpu, gen, noise = meter.stop(ctx, results, wall)
    lat = list(ln.stats.lat.get(step, ()))
    res = FanoutResult(
        shape=shape.label, users=shape.users, sockets_per_user=shape.sockets,
        admin_subscribers=admins, sockets_open=ln.open, rate=shape.rate, events_ok=ok,
        deliveries_expected=ok * per_update, delivered=len(lat), latency=Latency.of(lat),
        server_cpu_s=round(srv_cpu, 3), server_util=round(srv_cpu / wall, 3),
        deliveries_per_server_cpu_s=round(len(lat) / srv_cpu, 1) if srv_cpu > 0 else None,
        wall_s=round(wall, 3), gen=gen, noise=noise, close_codes=dict(ln.stats.close_codes))
    gl = " ".join(f"{k} {v:.2f}" for k, v in gen.procs.items())
    log(f"  {ln.name} fanout {shape.label}: {res.delivered}/{res.deliveries_expected} "
        f"delivered, {res.deliveries_per_server_cpu_s} deliveries/CPU-s, p99 "
        f"{res.latency.p99_ms} ms, server util {res.server_util}, generator [{gl}]"
        f"{' GENERATOR-BOUND' if gen.bound else ''}")
    return res


def servers_for(servers: list[tuple[str, str]], shape: Shape) -> list[tuple[str, str]]:
    """The (name, spec) of every server for this shape: taskpush with room for SOCKETS
    sockets per user."""
    if shape.sockets <= TASKPUSH_SOCKETS_PER_USER:
        return servers
    flag = f"--max-connections-per-user={shape.sockets}"
    return [(name, (f"{spec} {flag}" if ":" in spec else f"{spec}:{flag}")
             if spec.startswith("taskpush") else spec) for name, spec in servers]


async def run(ctx: Ctx, up: dict[str, Server], shape: Shape, profiled: dict | None = None
              ) -> dict[str, FanoutResult]:
    """Every server of `up` set up with this shape, then measured one after the other.
    With ``--profile PATH`` the first server (the target) is sampled while it is measured
    (PATH.fanout-SHAPE; its summary goes into `profiled`)."""
    admins = ctx.args.fanout_admins
    lanes = [FanLane(n, s) for n, s in up.items()]
    out = {}
    try:
        for ln in lanes:
            await setup(ctx, ln, shape, admins)
        for k, ln in enumerate(lanes):
            path = f"{ctx.args.profile}.fanout-{shape.label}" if ctx.args.profile else ""
            prof = await profile.start(ln.srv, os.path.abspath(path)) if path and not k else None
            try:
                out[ln.name] = await measure(ctx, ln, shape, admins, f"fan{k}")
            finally:
                if prof is not None:
                    got = await profile.stop(prof, os.path.abspath(path))
                    if profiled is not None:
                        profiled[f"fanout {shape.label}"] = got
        return out
    finally:
        for ln in lanes:
            await close_all(ln.clients)
