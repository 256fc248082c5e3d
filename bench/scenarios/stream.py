"""What the latency, rate and batch scenarios share: one lane per server (1 user = 1
WebSocket + 1 registered task), the publisher processes, and one measured publishing step.

All servers of a stream run are up at once and are driven alternately, step by step (the
others idle while one is measured), so that a burst of background load on a shared machine
hits every server alike instead of one whole scenario.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench.common import make_token, ns_to_ms, pct, self_cpu_s
from bench.launcher import REPO, Server, log
from bench.scenarios.base import Ctx, GenLoad, Noise, Window
from bench.wsclient import Stats, WsClient, close_all, connect_many

mono = time.monotonic_ns
NOISY = 0.15


@dataclass
class Latency:
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def of(cls, lat_ns: list[int]) -> Latency:
        lat_ns.sort()
        return cls(ns_to_ms(pct(lat_ns, 50)), ns_to_ms(pct(lat_ns, 90)),
                   ns_to_ms(pct(lat_ns, 99)), ns_to_ms(lat_ns[-1]) if lat_ns else None)


@dataclass
class Step:
    """One open-loop run of single events at a fixed rate."""

    rate: float
    duration_s: float
    scheduled: int
    ok: int
    delivered: int
    latency: Latency
    ack_p99_ms: float | None
    wall_s: float
    server_cpu_s: float
    server_util: float
    events_per_server_cpu_s: float | None
    gen: GenLoad
    noise: Noise
    http_status: dict[str, int] = field(default_factory=dict)
    fail_reasons: list[str] = field(default_factory=list)

    @property
    def delivered_ratio(self) -> float | None:
        return round(self.delivered / self.scheduled, 4) if self.scheduled else None

    @property
    def noisy(self) -> bool:
        """Other processes used more than NOISY of the server's core during the step (or of
        a core on the whole machine when the server is not pinned)."""
        n = self.noise
        other = n.server_core_other_s if n.server_core_other_s is not None else n.other_s
        return other > NOISY * self.wall_s

    @property
    def verdict(self) -> str:
        """pass; fail (the server missed the limit); invalid (the generator was near its
        limit); noisy (missed it while other processes took the machine)."""
        if self.gen.bound:
            return "invalid"
        if not self.fail_reasons:
            return "pass"
        return "noisy" if self.noisy else "fail"


class Lane:
    """One server's side of a stream run: its sockets, its tasks, what it measured."""

    def __init__(self, name: str, srv: Server) -> None:
        self.name = name
        self.srv = srv
        self.stats = Stats()
        self.clients: list[WsClient] = []
        self.tasks: list[str] = []
        self.progress = 10
        self.ws_ready = 0
        self.setup_errors: dict[str, int] = {}

    def next_progress(self) -> int:
        # Progress never decreases for a task across the whole run (a server may insist).
        self.progress = min(self.progress + 1, 99)
        return self.progress


def producer_session(ctx: Ctx, conns: int = 32) -> aiohttp.ClientSession:
    """For setup only (registering tasks), which is not measured."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=conns),
        headers={"X-API-Key": ctx.env.api_key, "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def register_tasks(ctx: Ctx, srv: Server, specs: list[tuple[str, int]]) -> dict:
    """Register (task_id, user_id) pairs with a bounded worker pool; returns status counts."""
    counts: dict[str, int] = {}
    it = iter(specs)
    async with producer_session(ctx) as s:
        url = srv.base + "/api/task/tasks"

        async def worker() -> None:
            for tid, uid in it:
                body = orjson.dumps({"task_id": tid, "user_id": uid, "task_type": "bench"})
                try:
                    async with s.post(url, data=body) as r:
                        await r.read()
                        counts[str(r.status)] = counts.get(str(r.status), 0) + 1
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1

        await asyncio.gather(*(worker() for _ in range(32)))
    return counts


async def setup(ctx: Ctx, lanes: list[Lane]) -> None:
    a = ctx.args
    uids = list(range(100_001, 100_001 + a.users))
    tokens = {u: make_token(ctx.env.secret, u) for u in uids}
    for ln in lanes:
        ln.tasks = [f"bench-{u}" for u in uids]
        reg = await register_tasks(ctx, ln.srv, list(zip(ln.tasks, uids, strict=True)))
        r = await connect_many(ln.srv.ws_base, tokens, ln.stats, a.connect_concurrency, 90)
        ln.clients = r.clients
        ln.ws_ready = len(r.ok)
        ln.setup_errors = r.errors
        log(f"  {ln.name}: registered {reg}; {len(r.ok)}/{a.users} WebSockets ready in "
            f"{r.wall_s:.2f}s {r.errors}")


async def teardown(lanes: list[Lane]) -> None:
    for ln in lanes:
        await close_all(ln.clients)


async def run_publishers(ctx: Ctx, srv: Server, tasks: list[str], cfg: dict, nproc: int,
                         on_go=None, module: str = "bench.publisher") -> tuple[list[dict], int]:
    """Start publisher processes (`module`: bench.publisher, or bench.workers), wait until
    warmed up, start them together, collect results.

    Returns (one result per process, the monotonic ns of the start)."""
    procs = []
    for k in range(nproc):
        part = dict(cfg, tasks=tasks[k::nproc], base_url=srv.base, api_key=ctx.env.api_key,
                    cpus=ctx.env.loadgen_cpus, uvloop=not ctx.args.no_uvloop)
        if "rate" in part:
            part["rate"] = cfg["rate"] / nproc
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=REPO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        p.stdin.write(orjson.dumps(part) + b"\n")  # type: ignore[union-attr]
        await p.stdin.drain()  # type: ignore[union-attr]
        procs.append(p)
    try:
        for p in procs:
            line = await asyncio.wait_for(p.stdout.readline(), 60)  # type: ignore[union-attr]
            if line.strip() != b"ready":
                raise RuntimeError(f"publisher not ready: {line!r}")
        if on_go:
            on_go()
        go = mono()
        for p in procs:
            p.stdin.write(b"go\n")  # type: ignore[union-attr]
            await p.stdin.drain()  # type: ignore[union-attr]
        limit = float(cfg.get("duration", 10)) + float(cfg.get("grace", 5)) + 60
        lines = await asyncio.wait_for(
            asyncio.gather(*(p.stdout.readline() for p in procs)), limit)  # type: ignore[union-attr]
        results = [orjson.loads(x) for x in lines]
        for p in procs:
            await asyncio.wait_for(p.wait(), 10)
        return results, go
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


async def wait_delivered(stats: Stats, step: str, expect: int, max_s: float) -> None:
    end = time.monotonic() + max_s
    while stats.count(step) < expect and time.monotonic() < end:
        await asyncio.sleep(0.02)


class Meter:
    """Server CPU, generator CPU (this process and the publishers) and noise over a window."""

    def start(self, srv: Server) -> None:
        self.srv = srv
        self.srv0 = srv.cpu()
        self.me0 = self_cpu_s()
        self.window = Window(srv.env.server_cpus)

    def stop(self, ctx: Ctx, results: list[dict], wall_s: float) -> tuple[float, GenLoad,
                                                                           Noise]:
        srv_cpu = self.srv.cpu() - self.srv0
        cpu = {"receivers": self_cpu_s() - self.me0}
        for k, r in enumerate(results):
            # A publisher's CPU over its own window, spread over this (slightly longer) one.
            cpu[f"pub{k}"] = r["cpu_s"]
        return (srv_cpu, GenLoad.of(cpu, wall_s, ctx.env.loadgen_ncpu),
                self.window.noise(srv_cpu))


async def publish_step(ctx: Ctx, ln: Lane, step: str, rate: float, duration: float) -> Step:
    """One open-loop run at a fixed rate; returns latency, delivery and CPU figures."""
    a = ctx.args
    ln.stats.lat.pop(step, None)
    meter = Meter()
    cfg = {"mode": "single", "step": step, "rate": rate, "duration": duration,
           "conns": a.pub_conns, "progress": ln.next_progress(), "grace": 5.0}
    results, go = await run_publishers(ctx, ln.srv, ln.tasks, cfg, a.pub_procs,
                                       lambda: meter.start(ln.srv))
    ok = sum(r["ok"] for r in results)
    scheduled = sum(r["scheduled"] for r in results)
    await wait_delivered(ln.stats, step, ok, a.drain_s)
    wall = (mono() - go) / 1e9
    srv_cpu, gen, noise = meter.stop(ctx, results, wall)
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["status_counts"].items():
            statuses[k] = statuses.get(k, 0) + v
    lat = list(ln.stats.lat.get(step, ()))
    s = Step(
        rate=rate, duration_s=duration, scheduled=scheduled, ok=ok, delivered=len(lat),
        latency=Latency.of(lat),
        ack_p99_ms=ns_to_ms(max((r["ack_p99_ns"] or 0) for r in results)),
        wall_s=round(wall, 3), server_cpu_s=round(srv_cpu, 3),
        server_util=round(srv_cpu / wall, 3),
        events_per_server_cpu_s=round(ok / srv_cpu, 1) if srv_cpu > 0 else None,
        gen=gen, noise=noise, http_status=statuses,
    )
    p99 = s.latency.p99_ms
    if p99 is None or p99 > a.p99_limit_ms:
        s.fail_reasons.append(f"p99 {p99} ms > {a.p99_limit_ms:g}")
    if s.delivered < 0.99 * scheduled:
        s.fail_reasons.append(f"delivered {s.delivered}/{scheduled}")
    return s


def step_line(name: str, label: str, s: Step) -> str:
    gen = " ".join(f"{k} {v:.2f}" for k, v in s.gen.procs.items())
    return (f"  {name} {label} {s.rate:.0f}/s: p50 {s.latency.p50_ms} p99 {s.latency.p99_ms} "
            f"ms, delivered {s.delivered}/{s.scheduled}, server util {s.server_util}, "
            f"{s.events_per_server_cpu_s} ev/CPU-s, generator [{gen}] total {s.gen.total}, "
            f"other cpu {s.noise.other_s}s ({s.noise.server_core_other_s}s on the server "
            f"core) -> {s.verdict}"
            + (f" {s.fail_reasons}" if s.fail_reasons else ""))
