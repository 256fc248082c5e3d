"""taskpush benchmark: every figure is measured against a thin in-memory relay in the same run.

    python -m bench            # full run (about 3 minutes)
    python -m bench --quick    # about 40 seconds
    python -m bench --target relay --baseline relay   # self-check without taskpush

See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp
import orjson

from bench.clients import Pool
from bench.common import (
    free_port,
    install_uvloop,
    listen_overflows,
    machine_info,
    make_token,
    ns_to_ms,
    other_cpu,
    pct,
    proc_cpu_s,
    proc_rss_kb,
    raise_nofile,
    self_cpu_s,
    set_affinity,
    sys_cpu,
)
from bench.storm import close_storm, storm

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
mono = time.monotonic_ns
SCENARIOS = ("idle", "throughput", "batch", "storm")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers
class Server:
    """A server under test, started as a subprocess pinned to the server CPUs."""

    def __init__(self, kind: str, ctx: Ctx, label: str) -> None:
        self.kind = kind
        self.ctx = ctx
        self.label = label
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix=f"{label}-{kind}-", dir=ctx.tmp)
        self.log_path = os.path.join(self.dir, "server.log")

    def command(self) -> list[str]:
        c = self.ctx
        if self.kind == "relay":
            return [
                sys.executable, "-m", "bench.relay", "--port", str(self.port),
                "--api-key", c.api_key, "--jwt-secret", c.secret,
            ] + (["--no-uvloop"] if c.args.relay_no_uvloop else [])
        cmd = [
            sys.executable, "run.py", "--host", "127.0.0.1", "--port", str(self.port),
            "--db", os.path.join(self.dir, "bench.db"), "--jwt-secret", c.secret,
            "--api-key", c.api_key,
        ]
        if "--log-level" in c.taskpush_help:
            cmd += ["--log-level", "warning"]
        return cmd + list(c.args.taskpush_arg or [])

    async def start(self) -> None:
        cpus = self.ctx.server_cpus

        def pre():
            raise_nofile()
            set_affinity(cpus)

        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKPUSH_")}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.logf = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), cwd=self.ctx.taskpush_dir if self.kind == "taskpush" else REPO,
            stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, preexec_fn=pre,
        )
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n"
                                       + self.log_tail())
                try:
                    async with s.get(self.base + "/healthz",
                                     timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status < 500:
                            break
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} did not come up:\n" + self.log_tail())
                await asyncio.sleep(0.05)
        log(f"{self.kind} ({self.label}) up on :{self.port} pid {self.proc.pid}, "
            f"rss {self.rss_kb() / 1024:.1f} MB")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def rss_kb(self) -> int:
        return proc_rss_kb(self.proc.pid)

    async def quiesce(self, max_s: float = 5.0, util: float = 0.05) -> None:
        """Wait (bounded) until the server is idle, so one phase does not bleed into the next."""
        end = time.monotonic() + max_s
        while time.monotonic() < end and self.alive():
            c0 = self.cpu()
            await asyncio.sleep(0.25)
            if (self.cpu() - c0) / 0.25 <= util:
                return

    async def wait_quiet(self, max_s: float = 10.0, cores: float = 0.25) -> float:
        """Wait (bounded) until processes other than ours use less than `cores` CPUs.

        Returns that background load as last sampled. The machine is shared: this keeps a
        retry from landing in the same burst of someone else's work."""
        end = time.monotonic() + max_s
        other = 0.0
        while self.alive():
            s0, c0, l0 = sys_cpu(), self.cpu(), self_cpu_s()
            await asyncio.sleep(0.5)
            s1, c1, l1 = sys_cpu(), self.cpu(), self_cpu_s()
            other = other_cpu(s0, s1, (c1 - c0) + (l1 - l0))["other_s"] / 0.5
            if other < cores or time.monotonic() >= end:
                break
        return round(other, 3)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            for _ in range(100):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


# --------------------------------------------------------------------------- context
class Ctx:
    def __init__(self, args) -> None:
        self.args = args
        self.api_key = "bench-api-key"
        self.secret = "bench-jwt-secret-0123456789abcdef0123456789"
        self.tmp = tempfile.mkdtemp(prefix="taskpush-bench-", dir=args.tmpdir)
        self.taskpush_dir = os.path.abspath(args.taskpush_dir)
        self.taskpush_help = ""
        avail = sorted(os.sched_getaffinity(0))
        if args.server_cpus is not None:
            self.server_cpus = parse_cpus(args.server_cpus)
        else:
            self.server_cpus = [avail[0]] if len(avail) >= 2 else []
        if args.loadgen_cpus is not None:
            self.loadgen_cpus = parse_cpus(args.loadgen_cpus)
        else:
            self.loadgen_cpus = [c for c in avail if c not in self.server_cpus] if len(
                avail) >= 2 else []
        self.loadgen_ncpu = len(self.loadgen_cpus) or len(avail)

    def loadgen_util(self, cpu_s: float, wall_s: float) -> float:
        return round(cpu_s / max(wall_s, 1e-9) / self.loadgen_ncpu, 3)


def parse_cpus(s: str) -> list[int]:
    if not s:
        return []
    out: list[int] = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


# --------------------------------------------------------------------------- producer setup
def producer_session(ctx: Ctx, conns: int = 32) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=conns),
        headers={"X-API-Key": ctx.api_key, "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=60),
    )


async def register_tasks(ctx: Ctx, srv: Server, specs: list[tuple[str, int]]) -> dict:
    """Register (task_id, user_id) pairs with a bounded worker pool; returns status counts."""
    counts: dict[str, int] = {}
    it = iter(specs)
    t0 = time.monotonic()
    async with producer_session(ctx) as s:
        url = srv.base + "/api/task/tasks"

        async def worker():
            for tid, uid in it:
                body = orjson.dumps({"task_id": tid, "user_id": uid, "task_type": "bench"})
                try:
                    async with s.post(url, data=body) as r:
                        await r.read()
                        counts[str(r.status)] = counts.get(str(r.status), 0) + 1
                except (TimeoutError, aiohttp.ClientError, OSError) as e:
                    counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1

        await asyncio.gather(*(worker() for _ in range(32)))
    counts["_s"] = round(time.monotonic() - t0, 2)
    return counts


async def batch_set(ctx: Ctx, srv: Server, events: list[dict]) -> dict:
    ok = bad = 0
    async with producer_session(ctx, 4) as s:
        for i in range(0, len(events), 1000):
            body = orjson.dumps({"events": events[i : i + 1000]})
            async with s.post(srv.base + "/api/task/events", data=body) as r:
                raw = await r.read()
                if r.status != 200:
                    bad += len(events[i : i + 1000])
                    continue
                for x in orjson.loads(raw)["data"]["results"]:
                    if x.get("ok"):
                        ok += 1
                    else:
                        bad += 1
    return {"ok": ok, "bad": bad}


# --------------------------------------------------------------------------- publisher
async def run_publishers(ctx: Ctx, srv: Server, tasks: list[str], cfg: dict, on_go=None):
    """Start publisher processes, wait until warmed up, start them together, collect results.

    Returns (results, go_monotonic_ns, end_monotonic_ns)."""
    nproc = max(1, ctx.args.pub_procs)
    procs = []
    for k in range(nproc):
        part = dict(cfg)
        part["tasks"] = tasks[k::nproc]
        part["base_url"] = srv.base
        part["api_key"] = ctx.api_key
        part["cpus"] = ctx.loadgen_cpus
        part["uvloop"] = not ctx.args.no_uvloop
        if "rate" in part:
            part["rate"] = cfg["rate"] / nproc
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.publisher", cwd=REPO,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        p.stdin.write(orjson.dumps(part) + b"\n")
        await p.stdin.drain()
        procs.append(p)
    try:
        for p in procs:
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"publisher not ready: {line!r}")
        if on_go:
            on_go()
        go = mono()
        for p in procs:
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        limit = float(cfg.get("duration", 10)) + float(cfg.get("grace", 5)) + 30
        lines = await asyncio.wait_for(
            asyncio.gather(*(p.stdout.readline() for p in procs)), limit)
        end = mono()
        results = [orjson.loads(x) for x in lines]
        for p in procs:
            await asyncio.wait_for(p.wait(), 10)
        return results, go, end
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()


def lat_summary(lat_ns: list[int]) -> dict:
    lat_ns.sort()
    return {
        "p50_ms": ns_to_ms(pct(lat_ns, 50)),
        "p90_ms": ns_to_ms(pct(lat_ns, 90)),
        "p99_ms": ns_to_ms(pct(lat_ns, 99)),
        "max_ms": ns_to_ms(lat_ns[-1]) if lat_ns else None,
    }


async def wait_delivered(pool: Pool, step: str, expect: int, max_s: float) -> None:
    end = time.monotonic() + max_s
    while pool.stats.count(step) < expect and time.monotonic() < end:
        await asyncio.sleep(0.02)


async def publish_step(ctx: Ctx, srv: Server, pool: Pool, tasks: list[str], step: str,
                       rate: float, duration: float, progress: int) -> dict:
    """One open-loop run at a fixed rate; returns latency, delivery and CPU figures."""
    a = ctx.args
    pool.stats.lat.pop(step, None)
    snap = {}

    def on_go():
        snap["srv"] = srv.cpu()
        snap["lg"] = self_cpu_s()
        snap["sys"] = sys_cpu()

    cfg = {"mode": "single", "step": step, "rate": rate, "duration": duration,
           "conns": a.pub_conns, "progress": progress, "grace": 5.0}
    results, go, _pub_end = await run_publishers(ctx, srv, tasks, cfg, on_go)
    ok = sum(r["ok"] for r in results)
    scheduled = sum(r["scheduled"] for r in results)
    await wait_delivered(pool, step, ok, a.drain_s)
    end = mono()
    srv_cpu = srv.cpu() - snap["srv"]
    lg_cpu = self_cpu_s() - snap["lg"] + sum(r["cpu_s"] for r in results)
    wall = (end - go) / 1e9
    lat = list(pool.stats.lat.get(step, ()))
    delivered = len(lat)
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["status_counts"].items():
            statuses[k] = statuses.get(k, 0) + v
    m = {
        "rate": rate,
        "duration_s": duration,
        "scheduled": scheduled,
        "ok": ok,
        "http_status": statuses,
        "unsent": sum(r["unsent"] for r in results),
        "delivered": delivered,
        "delivered_ratio": round(delivered / scheduled, 4) if scheduled else None,
        **lat_summary(lat),
        "ack_p50_ms": ns_to_ms(max((r["ack_p50_ns"] or 0) for r in results)),
        "ack_p99_ms": ns_to_ms(max((r["ack_p99_ns"] or 0) for r in results)),
        "send_lag_p99_ms": ns_to_ms(max((r["send_lag_p99_ns"] or 0) for r in results)),
        "achieved_rate": round(ok / max(1e-9, max(r["elapsed_s"] for r in results)), 1),
        "wall_s": round(wall, 3),
        "server_cpu_s": round(srv_cpu, 3),
        "server_cpu_util": round(srv_cpu / wall, 3),
        "events_per_server_cpu_s": round(ok / srv_cpu, 1) if srv_cpu > 0 else None,
        "loadgen_cpu_s": round(lg_cpu, 3),
        "loadgen_util": ctx.loadgen_util(lg_cpu, wall),
        "publisher_cpu_s": round(sum(r["cpu_s"] for r in results), 3),
        "server_alive": srv.alive(),
        "machine": other_cpu(snap["sys"], sys_cpu(), srv_cpu + lg_cpu),
    }
    reasons = []
    if m["p99_ms"] is None or m["p99_ms"] > a.p99_limit_ms:
        reasons.append(f"p99 {m['p99_ms']} ms > {a.p99_limit_ms}")
    if delivered < 0.99 * scheduled:
        reasons.append(f"delivered {delivered}/{scheduled}")
    m["pass"] = not reasons
    m["fail_reasons"] = reasons
    if reasons:
        bound = []
        if m["machine"]["other_s"] > 0.2 * wall or m["machine"]["steal_s"] > 0.1 * wall:
            bound.append("noise")
        if m["loadgen_util"] >= 0.9:
            bound.append("loadgen")
        if m["server_cpu_util"] >= 0.9:
            bound.append("server")
        m["saturated"] = bound
    return m


# --------------------------------------------------------------------------- scenarios
async def scenario_idle(ctx: Ctx, srv: Server) -> dict:
    a = ctx.args
    n = a.idle
    pool = Pool(srv.base, ctx.secret)
    try:
        # Warm the code paths (imports, first handshake) so they do not count as per-conn RSS.
        warm = await pool.connect_many(range(1_000_001, 1_000_021), concurrency=20, timeout=20)
        await pool.close_all()
        await srv.quiesce(3)
        await asyncio.sleep(0.3)
        rss0 = srv.rss_kb()
        cpu0, lg0, sys0 = srv.cpu(), self_cpu_s(), sys_cpu()
        r = await pool.connect_many(range(1, n + 1), concurrency=a.connect_concurrency,
                                    timeout=90)
        cpu1, lg1, sys1 = srv.cpu(), self_cpu_s(), sys_cpu()
        await asyncio.sleep(a.settle_s)
        await srv.quiesce(3)
        rss1 = srv.rss_kb()
        ok = len(r["ok"])
        t_close = mono()
        await pool.close_all()
        close_s = (mono() - t_close) / 1e9
        await asyncio.sleep(a.settle_s)
        await srv.quiesce(3)
        await asyncio.sleep(a.settle_s)
        rss2 = srv.rss_kb()
        return {
            "connections": n,
            "connected_ok": ok,
            "warmup_ok": len(warm["ok"]),
            "errors": r["errors"],
            "timed_out": r["timed_out"],
            "connect_all_s": round(r["wall_s"], 3),
            "connect_rate_per_s": round(ok / r["wall_s"], 1) if r["wall_s"] else None,
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "server_cpu_ms_per_conn": round((cpu1 - cpu0) * 1000 / max(ok, 1), 3),
            "loadgen_cpu_s": round(lg1 - lg0, 3),
            "loadgen_util": ctx.loadgen_util(lg1 - lg0, r["wall_s"]),
            "rss_before_mb": round(rss0 / 1024, 2),
            "rss_open_mb": round(rss1 / 1024, 2),
            "rss_per_conn_kb": round((rss1 - rss0) / max(ok, 1), 2),
            "close_all_s": round(close_s, 3),
            "rss_after_close_mb": round(rss2 / 1024, 2),
            "rss_retained_per_conn_kb": round((rss2 - rss0) / max(ok, 1), 2),
            "other_msgs": dict(pool.stats.other_msgs),
            "machine": other_cpu(sys0, sys1, cpu1 - cpu0 + lg1 - lg0),
        }
    finally:
        await pool.close()


class Lane:
    """One server's side of the lockstep stream scenario: its sockets, tasks and results."""

    def __init__(self, role: str, srv: Server) -> None:
        self.role = role
        self.srv = srv
        self.pool: Pool | None = None
        self.tasks: list[str] = []
        self.progress = 10
        self.out: dict = {}
        self.steps: list[dict] = []
        self.best: float | None = None
        self.first_fail: float | None = None
        self.active = True

    def next_progress(self) -> int:
        # Progress never decreases for a task across the whole run (a server may insist).
        self.progress = min(self.progress + 1, 99)
        return self.progress


async def scenario_stream(ctx: Ctx, lanes: list[Lane], which: set[str]) -> None:
    """throughput (fixed rate + ramp) and batch: 1 user = 1 WebSocket + 1 task.

    Both servers are up at once and are driven alternately, step by step (one idles while
    the other is measured), so that a burst of background load on this shared machine hits
    both sides alike instead of one whole scenario."""
    a = ctx.args
    uids = list(range(100_001, 100_001 + a.users))
    for ln in lanes:
        ln.tasks = [f"bench-{u}" for u in uids]
        reg = await register_tasks(ctx, ln.srv, list(zip(ln.tasks, uids, strict=True)))
        ln.pool = Pool(ln.srv.base, ctx.secret)
        r = await ln.pool.connect_many(uids, concurrency=a.connect_concurrency, timeout=90)
        log(f"  {ln.srv.kind}: registered {a.users} tasks {reg}; {len(r['ok'])}/{a.users} "
            f"WebSockets ready in {r['wall_s']:.2f}s {r['errors']}")
        ln.out["setup"] = {"users": a.users, "register": reg, "ws_ready": len(r["ok"]),
                           "ws_errors": r["errors"]}
    try:
        if "throughput" in which:
            for ln in lanes:
                await ln.srv.quiesce(3)
                m = await publish_step(ctx, ln.srv, ln.pool, ln.tasks, "fixed", a.rate,
                                       a.duration, ln.next_progress())
                log(f"  {ln.srv.kind} fixed {a.rate:.0f}/s: p50 {m['p50_ms']} p99 "
                    f"{m['p99_ms']} ms, delivered {m['delivered']}/{m['scheduled']}, server "
                    f"cpu {m['server_cpu_s']}s, lg util {m['loadgen_util']}, other cpu "
                    f"{m['machine']['other_s']}s")
                ln.out["throughput"] = {"setup": ln.out.pop("setup"), **m}

            async def attempt(ln: Lane, rate: float, tag: str = "") -> bool:
                # A failing step is rerun (--ramp-retries) after waiting (bounded) for the
                # machine to calm down, and counts as a failure only if every try fails.
                for k in range(1 + a.ramp_retries):
                    await ln.srv.quiesce(3)
                    bg = await ln.srv.wait_quiet(10) if k else None
                    m = await publish_step(ctx, ln.srv, ln.pool, ln.tasks,
                                           f"r{len(ln.steps)}", rate, a.ramp_step_s,
                                           ln.next_progress())
                    m["try"] = k + 1
                    m["background_cores_before"] = bg
                    ln.steps.append(m)
                    log(f"  {ln.srv.kind} ramp {rate:.0f}/s{tag}{' retry' if k else ''}: p50 "
                        f"{m['p50_ms']} p99 {m['p99_ms']} ms, delivered {m['delivered']}/"
                        f"{m['scheduled']}, srv util {m['server_cpu_util']}, lg util "
                        f"{m['loadgen_util']}, other cpu {m['machine']['other_s']}s -> "
                        f"{'pass' if m['pass'] else m['fail_reasons']}")
                    if m["pass"] or not ln.srv.alive():
                        return m["pass"]
                return False

            for rate in a.ramp:
                for ln in lanes:
                    if not ln.active:
                        continue
                    if await attempt(ln, rate):
                        ln.best = rate
                    else:
                        ln.first_fail = rate
                        ln.active = False
                    if not ln.srv.alive():
                        ln.active = False
                if not any(ln.active for ln in lanes):
                    break
            for ln in lanes:
                # One bisection step between the last pass and the first failure.
                if ln.best and ln.first_fail and a.refine and ln.srv.alive():
                    mid = round((ln.best * ln.first_fail) ** 0.5 / 100) * 100
                    if ln.best < mid < ln.first_fail:
                        if await attempt(ln, mid, " (refine)"):
                            ln.best = mid
                        else:
                            ln.first_fail = mid
                fail = next((x for x in reversed(ln.steps) if x["rate"] == ln.first_fail),
                            None) or {}
                ln.out["ramp"] = {
                    "max_sustained_rate": ln.best or 0,
                    # True when even the highest step passed: only a lower bound then.
                    "max_is_lower_bound": ln.first_fail is None,
                    "first_failing_rate": ln.first_fail,
                    "limited_by": fail.get("saturated"),
                    "loadgen_util_at_fail": fail.get("loadgen_util"),
                    "server_util_at_fail": fail.get("server_cpu_util"),
                    "steps": ln.steps,
                }
        if "batch" in which:
            for ln in lanes:
                await ln.srv.quiesce(3)
                b = await batch_step(ctx, ln.srv, ln.pool, ln.tasks, ln.next_progress())
                ln.out["batch"] = b
                log(f"  {ln.srv.kind} batch: {b['events_per_s']} ev/s persisted, "
                    f"{b['delivered_per_s']} delivered/s, p99 {b['p99_ms']} ms, other cpu "
                    f"{b['machine']['other_s']}s")
        for ln in lanes:
            st = ln.pool.stats
            ln.out["seq_regressions"] = st.seq_regressions
            ln.out["other_msgs"] = dict(st.other_msgs)
            ln.out["close_codes"] = dict(st.close_codes)
    finally:
        for ln in lanes:
            if ln.pool is not None:
                await ln.pool.close()


async def batch_step(ctx: Ctx, srv: Server, pool: Pool, tasks: list[str], progress: int) -> dict:
    a = ctx.args
    snap = {}

    def on_go():
        snap["srv"] = srv.cpu()
        snap["lg"] = self_cpu_s()
        snap["sys"] = sys_cpu()

    cfg = {"mode": "batch", "step": "batch", "batch_size": a.batch_size,
           "concurrency": a.batch_concurrency, "duration": a.batch_s,
           "max_batches": a.batch_max, "conns": a.batch_concurrency, "progress": progress}
    results, go, _pub_end = await run_publishers(ctx, srv, tasks, cfg, on_go)
    ev_ok = sum(r["events_ok"] for r in results)
    await wait_delivered(pool, "batch", ev_ok, a.drain_s)
    end = mono()
    srv_cpu = srv.cpu() - snap["srv"]
    lg_cpu = self_cpu_s() - snap["lg"] + sum(r["cpu_s"] for r in results)
    lat = list(pool.stats.lat.get("batch", ()))
    last = pool.stats.last_recv.get("batch", end)
    pub_s = max(r["elapsed_s"] for r in results)
    deliver_s = max(1e-9, (last - go) / 1e9)
    wall = (end - go) / 1e9
    return {
        "batch_size": a.batch_size,
        "concurrency": a.batch_concurrency,
        "batches": sum(r["batches"] for r in results),
        "events_ok": ev_ok,
        "events_err": sum(r["events_err"] for r in results),
        "publish_s": round(pub_s, 3),
        "events_per_s": round(ev_ok / pub_s, 1),
        "delivered": len(lat),
        "delivered_ratio": round(len(lat) / ev_ok, 4) if ev_ok else None,
        "delivered_per_s": round(len(lat) / deliver_s, 1),
        **lat_summary(lat),
        "batch_ack_p50_ms": ns_to_ms(max((r["ack_p50_ns"] or 0) for r in results)),
        "batch_ack_p99_ms": ns_to_ms(max((r["ack_p99_ns"] or 0) for r in results)),
        "server_cpu_s": round(srv_cpu, 3),
        "server_cpu_util": round(srv_cpu / wall, 3),
        "events_per_server_cpu_s": round(ev_ok / srv_cpu, 1) if srv_cpu > 0 else None,
        "loadgen_cpu_s": round(lg_cpu, 3),
        "loadgen_util": ctx.loadgen_util(lg_cpu, wall),
        "wall_s": round(wall, 3),
        "machine": other_cpu(snap["sys"], sys_cpu(), srv_cpu + lg_cpu),
    }


async def scenario_storm(ctx: Ctx, srv: Server) -> dict:
    a = ctx.args
    c, k = a.storm_clients, a.storm_tasks
    uids = list(range(200_001, 200_001 + c))
    specs = [(f"storm-{u}-{j}", u) for u in uids for j in range(k)]
    reg = await register_tasks(ctx, srv, specs)
    run = await batch_set(ctx, srv, [{"task_id": t, "status": "running", "progress": 1,
                                      "message": "storm"} for t, _ in specs])
    log(f"  storm setup: registered {reg}, set running {run}")
    await srv.quiesce(5)
    tokens = {u: make_token(ctx.secret, u) for u in uids}
    light = not a.storm_concurrency  # the light client launches every handshake at once
    pool = Pool(srv.base, ctx.secret)
    r: dict = {"ok": []}
    try:
        ov0 = listen_overflows()
        cpu0, lg0, rss0, sys0 = srv.cpu(), self_cpu_s(), srv.rss_kb(), sys_cpu()
        if light:
            r = await storm(srv.base, tokens, a.storm_timeout)
        else:
            r = await pool.connect_many(uids, concurrency=a.storm_concurrency,
                                        timeout=a.storm_timeout)
        cpu1, lg1, sys1 = srv.cpu(), self_cpu_s(), sys_cpu()
        ov1 = listen_overflows()
        t0 = r["t0"]
        good = [cl for cl in r["ok"] if cl.active_count == k]
        wrong = [cl.active_count for cl in r["ok"] if cl.active_count != k]
        times = sorted(cl.t_ready - t0 for cl in good)
        all_ok = len(good) == c
        res = {
            "clients": c,
            "tasks_per_client": k,
            "client": "bench/storm.py (light)" if light else "aiohttp",
            "setup_register": reg,
            "setup_running": run,
            "ready_ok": len(good),
            "wrong_count": len(wrong),
            "wrong_count_examples": wrong[:5],
            "timed_out": r["timed_out"],
            "errors": r["errors"],
            "all_ready_s": round(times[-1] / 1e9, 3) if all_ok and times else None,
            "last_ready_s": round(times[-1] / 1e9, 3) if times else None,
            "p50_ms": ns_to_ms(pct(times, 50)),
            "p90_ms": ns_to_ms(pct(times, 90)),
            "p99_ms": ns_to_ms(pct(times, 99)),
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "server_cpu_ms_per_client": round((cpu1 - cpu0) * 1000 / max(len(good), 1), 3),
            "server_rss_delta_mb": round((srv.rss_kb() - rss0) / 1024, 2),
            "loadgen_cpu_s": round(lg1 - lg0, 3),
            "loadgen_util": ctx.loadgen_util(lg1 - lg0, r["wall_s"]),
            # SYNs dropped because the accept queue (listen backlog) was full: each costs the
            # client a 1 s (then 3 s, 7 s) retransmit, which dominates the storm time.
            "listen_overflows": {k: ov1.get(k, 0) - v for k, v in ov0.items()},
            "syn_drops": ov1.get("ListenOverflows", 0) - ov0.get("ListenOverflows", 0),
            "wall_s": round(r["wall_s"], 3),
            "machine": other_cpu(sys0, sys1, cpu1 - cpu0 + lg1 - lg0),
        }
        log(f"  storm: {len(good)}/{c} ready, all in {res['all_ready_s']} s, "
            f"p99 {res['p99_ms']} ms, server cpu {res['server_cpu_s']} s, "
            f"loadgen util {res['loadgen_util']}, listen overflows {res['listen_overflows']}")
        return res
    finally:
        if light:
            await close_storm(r.get("clients", []))
        await pool.close()


# --------------------------------------------------------------------------- profiling
async def start_profiler(srv: Server, path: str):
    """py-spy (if installed) sampling the server; stopped with SIGINT, writes collapsed stacks."""
    exe = shutil.which("py-spy")
    if not exe:
        log("  --profile: py-spy not found (pip install py-spy); not profiling")
        return None
    return await asyncio.create_subprocess_exec(
        exe, "record", "--pid", str(srv.proc.pid), "--format", "raw", "--rate", "250",
        "--nonblocking", "-o", path, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)


async def stop_profiler(proc, path: str) -> dict | None:
    if proc is None:
        return None
    proc.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    return summarize_profile(path)


def summarize_profile(path: str, top: int = 25) -> dict | None:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = [fr.rsplit(":", 1)[0] for fr in stack.split(";")]
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + n
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + n

    def pick(d):
        return [{"function": k, "share": round(v / total, 4)}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "file": path, "self": pick(self_c), "inclusive": pick(incl)}


# --------------------------------------------------------------------------- report
ROWS = [
    # scenario key, path, label, better
    ("idle", ("idle", "rss_per_conn_kb"), "RSS per connection (KB)", "lower"),
    ("idle", ("idle", "rss_open_mb"), "RSS with N open (MB)", "lower"),
    ("idle", ("idle", "rss_after_close_mb"), "RSS after close (MB)", "lower"),
    ("idle", ("idle", "rss_retained_per_conn_kb"), "RSS kept after close / conn (KB)", "lower"),
    ("idle", ("idle", "connect_all_s"), "time to connect N (s)", "lower"),
    ("idle", ("idle", "server_cpu_ms_per_conn"), "server CPU per connect (ms)", "lower"),
    ("throughput", ("throughput", "p50_ms"), "publish->receive p50 (ms)", "lower"),
    ("throughput", ("throughput", "p99_ms"), "publish->receive p99 (ms)", "lower"),
    ("throughput", ("throughput", "max_ms"), "publish->receive max (ms)", "lower"),
    ("throughput", ("throughput", "ack_p99_ms"), "HTTP ack p99 (ms)", "lower"),
    ("throughput", ("throughput", "server_cpu_s"), "server CPU (s)", "lower"),
    ("throughput", ("throughput", "events_per_server_cpu_s"), "events per server CPU-s",
     "higher"),
    ("throughput", ("throughput", "delivered_ratio"), "delivered / sent", "higher"),
    ("throughput", ("throughput", "loadgen_util"), "load generator CPU util", "info"),
    ("throughput", ("ramp", "max_sustained_rate"), "max rate with p99<limit (ev/s)", "higher"),
    ("throughput", ("ramp", "loadgen_util_at_fail"), "loadgen util at first failing step",
     "info"),
    ("throughput", ("ramp", "server_util_at_fail"), "server util at first failing step", "info"),
    ("batch", ("batch", "events_per_s"), "events/s persisted (acked)", "higher"),
    ("batch", ("batch", "delivered_per_s"), "events/s delivered", "higher"),
    ("batch", ("batch", "p99_ms"), "publish->receive p99 (ms)", "lower"),
    ("batch", ("batch", "batch_ack_p99_ms"), "batch ack p99 (ms)", "lower"),
    ("batch", ("batch", "events_per_server_cpu_s"), "events per server CPU-s", "higher"),
    ("batch", ("batch", "loadgen_util"), "load generator CPU util", "info"),
    ("storm", ("storm", "all_ready_s"), "all clients got active_tasks (s)", "lower"),
    ("storm", ("storm", "p50_ms"), "per-client ready p50 (ms)", "lower"),
    ("storm", ("storm", "p90_ms"), "per-client ready p90 (ms)", "lower"),
    ("storm", ("storm", "p99_ms"), "per-client ready p99 (ms)", "lower"),
    ("storm", ("storm", "syn_drops"), "SYNs dropped, backlog full (1 s+ retry)", "lower"),
    ("storm", ("storm", "server_cpu_ms_per_client"), "server CPU per client (ms)", "lower"),
    ("storm", ("storm", "ready_ok"), "clients with count == tasks", "higher"),
    ("storm", ("storm", "loadgen_util"), "load generator CPU util", "info"),
]


def noise(res: dict) -> dict:
    """CPU used by processes other than ours during the measured windows (shared machine)."""
    windows = []
    if "idle" in res:
        windows.append((res["idle"].get("machine"), res["idle"].get("connect_all_s")))
    for key in ("throughput", "batch", "storm"):
        if key in res:
            windows.append((res[key].get("machine"), res[key].get("wall_s")))
    for st in res.get("ramp", {}).get("steps", []):
        windows.append((st.get("machine"), st.get("wall_s")))
    other = sum(max(0.0, (m or {}).get("other_s", 0)) for m, _ in windows)
    steal = sum((m or {}).get("steal_s", 0) for m, _ in windows)
    wall = sum(w or 0 for _, w in windows)
    worst = max((max(0.0, (m or {}).get("other_s", 0)) / w for m, w in windows if m and w),
                default=0.0)
    return {"other_cpu_s": round(other, 2), "steal_s": round(steal, 2),
            "measured_wall_s": round(wall, 2),
            "other_cores_avg": round(other / wall, 3) if wall else None,
            "other_cores_worst_window": round(worst, 3)}


def get(d: dict, path: tuple[str, str]):
    v = d.get(path[0])
    return v.get(path[1]) if isinstance(v, dict) else None


def compare(res_t: dict, res_b: dict) -> list[dict]:
    rows = []
    for scen, path, label, better in ROWS:
        t, b = get(res_t, path), get(res_b, path)
        if t is None and b is None:
            continue
        ratio = None
        if isinstance(t, int | float) and isinstance(b, int | float) and b:
            ratio = round(t / b, 3)
        rows.append({"scenario": scen, "metric": label, "key": ".".join(path),
                     "better": better, "target": t, "baseline": b, "ratio": ratio})
    return rows


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict], tname: str, bname: str) -> str:
    head = ("scenario", "metric", tname, bname, "ratio", "better")
    lines = [[r["scenario"], r["metric"], fmt(r["target"]), fmt(r["baseline"]),
              fmt(r["ratio"]) + ("x" if r["ratio"] is not None else ""), r["better"]]
             for r in rows]
    w = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(str(h).ljust(w[i]) for i, h in enumerate(head)),
           "  ".join("-" * x for x in w)]
    for ln in lines:
        out.append("  ".join(
            (str(x).rjust(w[i]) if 2 <= i <= 4 else str(x).ljust(w[i])) for i, x in enumerate(ln)))
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, about 40 s")
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results.json"))
    ap.add_argument("--target", choices=("taskpush", "relay"), default="taskpush")
    ap.add_argument("--baseline", choices=("taskpush", "relay"), default="relay")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma list of idle,throughput,batch,storm")
    ap.add_argument("--taskpush-dir", default=REPO, help="directory holding run.py")
    ap.add_argument("--taskpush-arg", action="append",
                    help="extra argument for run.py (repeatable, use --taskpush-arg=--flag)")
    ap.add_argument("--relay-no-uvloop", action="store_true")
    ap.add_argument("--no-uvloop", action="store_true", help="load generator without uvloop")
    ap.add_argument("--idle", type=int, help="idle connections (default 2000, quick 500)")
    ap.add_argument("--users", type=int, help="throughput users (default 1000, quick 500)")
    ap.add_argument("--rate", type=float, help="fixed publish rate/s (default 500)")
    ap.add_argument("--duration", type=float, help="fixed-rate seconds (default 10, quick 3)")
    ap.add_argument("--ramp", help="comma list of rates (default 500,1000,2000,4000,8000,16000)")
    ap.add_argument("--ramp-step-s", type=float, help="seconds per ramp step (3, quick 1.5)")
    ap.add_argument("--no-refine", dest="refine", action="store_false",
                    help="skip the bisection step after the first failing ramp rate")
    ap.add_argument("--ramp-retries", type=int, help="reruns of a failing step (1, quick 0)")
    ap.add_argument("--p99-limit-ms", type=float, default=100.0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--batch-concurrency", type=int, default=2,
                    help="batch posters per publisher process")
    ap.add_argument("--batch-s", type=float, help="batch scenario seconds (5, quick 2)")
    ap.add_argument("--batch-max", type=int, default=2000, help="max batches per run")
    ap.add_argument("--storm-clients", type=int, help="default 2000, quick 300")
    ap.add_argument("--storm-tasks", type=int, default=5)
    ap.add_argument("--storm-concurrency", type=int, default=0, help="0 = all at once")
    ap.add_argument("--storm-timeout", type=float, default=60.0)
    ap.add_argument("--pub-conns", type=int, default=32, help="publisher keep-alive conns")
    ap.add_argument("--pub-procs", type=int, default=1, help="publisher processes")
    ap.add_argument("--connect-concurrency", type=int, default=100,
                    help="handshakes in flight while setting up (storm: see --storm-concurrency)")
    ap.add_argument("--server-cpus", help="CPU list for servers (default: first CPU)")
    ap.add_argument("--loadgen-cpus", help="CPU list for load generator (default: the rest)")
    ap.add_argument("--profile", metavar="PATH",
                    help="sample the target server with py-spy during throughput+batch and "
                    "write collapsed stacks to PATH (summary goes into the JSON)")
    ap.add_argument("--tmpdir", default=None, help="where databases and logs go")
    ap.add_argument("--keep-tmp", action="store_true")
    return ap


def apply_defaults(a) -> None:
    q = a.quick
    dflt = {
        "idle": 500 if q else 2000,
        "users": 500 if q else 1000,
        "rate": 500.0,
        "duration": 3.0 if q else 10.0,
        "ramp": "2000,4000,8000,16000" if q else "500,1000,2000,4000,8000,16000",
        "ramp_step_s": 1.5 if q else 3.0,
        "batch_s": 2.0 if q else 5.0,
        "storm_clients": 300 if q else 2000,
        "ramp_retries": 0 if q else 1,
    }
    for k, v in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.ramp = [float(x) for x in str(a.ramp).split(",") if x]
    a.settle_s = 0.5 if q else 1.0
    a.drain_s = 1.0 if q else 2.0
    if q and a.refine:
        a.refine = False


async def amain(args) -> int:
    ctx = Ctx(args)
    which = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    bad = which - set(SCENARIOS)
    if bad:
        raise SystemExit(f"unknown scenarios: {bad}")
    if "taskpush" in (args.target, args.baseline):
        run_py = os.path.join(ctx.taskpush_dir, "run.py")
        if not os.path.exists(run_py):
            raise SystemExit(f"{run_py} not found: use --target relay (self-check) or "
                             "--taskpush-dir")
        h = subprocess.run([sys.executable, "run.py", "--help"], cwd=ctx.taskpush_dir,
                           capture_output=True, text=True, timeout=60)
        if h.returncode != 0:
            raise SystemExit(f"python run.py --help failed:\n{h.stderr[-2000:]}")
        ctx.taskpush_help = h.stdout
    nofile = raise_nofile()
    set_affinity(ctx.loadgen_cpus)
    need = max(args.idle, args.storm_clients, args.users) + 200
    if nofile[0] < need:
        log(f"warning: RLIMIT_NOFILE {nofile[0]} < {need}: connections may fail")
    order = [("baseline", args.baseline), ("target", args.target)]
    names = {"target": args.target, "baseline": args.baseline}
    if args.target == args.baseline:
        names = {"target": f"{args.target}(target)", "baseline": f"{args.baseline}(base)"}
    log(f"server CPUs {ctx.server_cpus or 'any'}, load generator CPUs "
        f"{ctx.loadgen_cpus or 'any'}, tmp {ctx.tmp}")
    results: dict = {"target": {}, "baseline": {}}
    errors: list[str] = []
    started = time.monotonic()
    plan = [n for n in ("idle", "stream", "storm")
            if n in which or (n == "stream" and which & {"throughput", "batch"})]
    try:
        for name in plan:
            # idle and storm: one server at a time; stream: both up, driven alternately.
            groups = [[rk] for rk in order] if name != "stream" else [order]
            for group in groups:
                log(f"== {name} on " + " + ".join(f"{k} ({r})" for r, k in group))
                servers = {role: Server(kind, ctx, name) for role, kind in group}
                prof = prof_path = None
                try:
                    for role, srv in servers.items():
                        results[role].setdefault("server_cmd", {})[name] = " ".join(
                            srv.command())
                        await srv.start()
                    if args.profile and name == "stream" and "target" in servers:
                        prof_path = os.path.abspath(args.profile)
                        prof = await start_profiler(servers["target"], prof_path)
                    if name == "idle":
                        (role, srv), = servers.items()
                        results[role]["idle"] = await scenario_idle(ctx, srv)
                    elif name == "storm":
                        (role, srv), = servers.items()
                        results[role]["storm"] = await scenario_storm(ctx, srv)
                    else:
                        lanes = [Lane(role, srv) for role, srv in servers.items()]
                        await scenario_stream(ctx, lanes, which)
                        for ln in lanes:
                            results[ln.role].update(ln.out)
                    if prof is not None:
                        results["target"]["profile"] = await stop_profiler(prof, prof_path)
                        prof = None
                    for role, srv in servers.items():
                        results[role].setdefault("server_rss_end_mb", {})[name] = round(
                            srv.rss_kb() / 1024, 2) if srv.alive() else None
                        if not srv.alive():
                            errors.append(f"{srv.kind} {name}: server died:\n"
                                          f"{srv.log_tail(1500)}")
                except Exception as e:
                    import traceback

                    errors.append(f"{name} on {list(servers)}: {type(e).__name__}: {e}")
                    log(f"!! {name} failed: {e}\n{traceback.format_exc()}")
                finally:
                    if prof is not None:
                        await stop_profiler(prof, prof_path)
                    for role, srv in servers.items():
                        await srv.stop()
                        tail = srv.log_tail(3000).strip()
                        if tail:
                            results[role].setdefault("server_log_tail", {})[name] = tail[-1500:]
    finally:
        if not args.keep_tmp:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    for role in ("target", "baseline"):
        results[role]["noise"] = noise(results[role])
    rows = compare(results["target"], results["baseline"])
    out = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        "pinning": {"server_cpus": ctx.server_cpus, "loadgen_cpus": ctx.loadgen_cpus},
        "target": args.target,
        "baseline": args.baseline,
        "config": {k: v for k, v in vars(args).items()},
        "comparison": rows,
        "results": results,
        "errors": errors,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print()
    print(f"ratio = {names['target']} / {names['baseline']}; 'better' says which direction "
          f"is good; run took {out['elapsed_s']} s")
    print(table(rows, names["target"], names["baseline"]))
    for role in ("target", "baseline"):
        nz = results[role]["noise"]
        if nz["other_cores_avg"] is not None:
            print(f"note: during {names[role]}'s measured windows other processes used "
                  f"{nz['other_cores_avg']:.2f} cores on average (worst window "
                  f"{nz['other_cores_worst_window']:.2f}); above ~0.1 the figures are noisy")
        if results[role].get("ramp", {}).get("max_is_lower_bound"):
            print(f"note: {names[role]} passed every ramp step: its max rate is a lower bound "
                  "(add higher --ramp rates)")
        lim = results[role].get("ramp", {}).get("limited_by")
        if lim:
            print(f"note: {names[role]} first failing ramp step looked {'+'.join(lim)}-bound")
    if errors:
        print("\nerrors:")
        for e in errors:
            print(" ", e[:2000])
    print(f"\nraw results: {args.out}")
    return 1 if errors else 0


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    apply_defaults(args)
    if not args.no_uvloop:
        install_uvloop()
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
