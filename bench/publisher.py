"""Load-generator worker process: posts producer events to the server.

Started by bench.run as ``python -m bench.publisher``. Protocol on stdin/stdout:
  stdin line 1: JSON config;  stdout: ``ready``;  stdin: ``go``;  stdout: one JSON result line.

Modes
  single  open loop: event i is *due* at t0 + i/rate and carries that due time (monotonic ns,
          the clock is system wide) in ``message = "b:<step>:<due_ns>"``; a fixed pool of
          workers (one keep-alive connection each) sends due events in order. If the server
          (or this process) cannot keep up, events wait in the queue and their measured
          latency grows: no coordinated omission.
  batch   closed loop: ``concurrency`` workers each post batches of ``batch_size`` events to
          POST /api/task/events back to back until ``duration`` or ``max_batches``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp
import orjson
from yarl import URL

from bench.common import install_uvloop, pct, self_cpu_s, set_affinity

mono = time.monotonic_ns


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def emit(obj) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else orjson.dumps(obj).decode()) + "\n")
    sys.stdout.flush()


async def post_single(session, url, body, counts: Counter) -> bool:
    try:
        async with session.post(url, data=body) as r:
            await r.read()
            counts[r.status] += 1
            return r.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        counts[type(e).__name__] += 1
        return False


async def run_single(cfg, session, urls, go) -> dict:
    rate = float(cfg["rate"])
    duration = float(cfg["duration"])
    step = cfg["step"]
    progress = int(cfg.get("progress", 50))
    total = max(1, int(rate * duration))
    interval = 1e9 / rate
    n = len(urls)
    offset = int(cfg.get("task_offset", 0))
    counts: Counter = Counter()
    lag: list[int] = []
    ack: list[int] = []
    q: asyncio.Queue = asyncio.Queue()
    prefix = b'{"status":"progress","progress":%d,"message":"b:%s:' % (progress, step.encode())
    await go
    cpu0 = self_cpu_s()
    t0 = mono() + 5_000_000
    hard_end = t0 + int((duration + float(cfg.get("grace", 5.0))) * 1e9)

    async def worker():
        while True:
            item = await q.get()
            if item is None:
                return
            i, due = item
            lag.append(mono() - due)
            body = prefix + b'%d"}' % due
            if await post_single(session, urls[(i + offset) % n], body, counts):
                ack.append(mono() - due)

    workers = [asyncio.create_task(worker()) for _ in range(int(cfg["conns"]))]
    i = 0
    while i < total:
        now = mono()
        if now >= t0:
            due_n = min(total, int((now - t0) / interval) + 1)
            while i < due_n:
                q.put_nowait((i, t0 + int(i * interval)))
                i += 1
        if i < total:
            # Timers have ~1 ms resolution: never spin, dispatch whatever is due per tick.
            wait = (t0 + int(i * interval) - mono()) / 1e9
            await asyncio.sleep(wait if wait > 0.001 else 0.001)
    sched_end = mono()
    for _ in workers:
        q.put_nowait(None)
    remaining = max(0.1, (hard_end - mono()) / 1e9)
    _done, pending = await asyncio.wait(workers, timeout=remaining)
    for w in pending:
        w.cancel()
    unsent = 0
    while not q.empty():
        if q.get_nowait() is not None:
            unsent += 1
    end = mono()
    cpu1 = self_cpu_s()
    lag.sort()
    ack.sort()
    ok = counts.get(200, 0)
    return {
        "mode": "single",
        "step": step,
        "rate": rate,
        "scheduled": total,
        "attempted": len(lag),
        "ok": ok,
        "unsent": unsent,
        "unfinished": len(pending),
        "status_counts": {str(k): v for k, v in counts.items()},
        "t0_ns": t0,
        "sched_s": (sched_end - t0) / 1e9,
        "elapsed_s": (end - t0) / 1e9,
        "achieved_rate": ok / max(1e-9, (end - t0) / 1e9),
        "send_lag_p50_ns": pct(lag, 50),
        "send_lag_p99_ns": pct(lag, 99),
        "send_lag_max_ns": lag[-1] if lag else None,
        "ack_p50_ns": pct(ack, 50),
        "ack_p99_ns": pct(ack, 99),
        "ack_max_ns": ack[-1] if ack else None,
        "cpu_s": cpu1 - cpu0,
    }


async def run_batch(cfg, session, base, tasks, go) -> dict:
    step = cfg["step"]
    size = int(cfg["batch_size"])
    duration = float(cfg["duration"])
    max_batches = int(cfg.get("max_batches", 10_000))
    progress = int(cfg.get("progress", 50))
    n = len(tasks)
    url = URL(base + "/api/task/events")
    counts: Counter = Counter()
    ev_ok = 0
    ev_err = 0
    acks: list[int] = []
    state = {"next": 0}
    await go
    cpu0 = self_cpu_s()
    t0 = mono()
    end_at = t0 + int(duration * 1e9)

    async def worker():
        nonlocal ev_ok, ev_err
        while mono() < end_at and state["next"] < max_batches:
            b = state["next"]
            state["next"] += 1
            start = (b * size) % n
            sent = mono()
            msg = f"b:{step}:{sent}"
            body = orjson.dumps(
                {
                    "events": [
                        {
                            "task_id": tasks[(start + j) % n],
                            "status": "progress",
                            "progress": progress,
                            "message": msg,
                        }
                        for j in range(size)
                    ]
                }
            )
            try:
                async with session.post(url, data=body) as r:
                    raw = await r.read()
                    counts[r.status] += 1
                    if r.status == 200:
                        res = orjson.loads(raw)["data"]["results"]
                        good = sum(1 for x in res if x.get("ok"))
                        ev_ok += good
                        ev_err += len(res) - good
                        acks.append(mono() - sent)
                    else:
                        ev_err += size
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                counts[type(e).__name__] += 1
                ev_err += size

    await asyncio.gather(*(worker() for _ in range(int(cfg["concurrency"]))))
    end = mono()
    cpu1 = self_cpu_s()
    acks.sort()
    return {
        "mode": "batch",
        "step": step,
        "batches": state["next"],
        "batch_size": size,
        "events_ok": ev_ok,
        "events_err": ev_err,
        "status_counts": {str(k): v for k, v in counts.items()},
        "t0_ns": t0,
        "elapsed_s": (end - t0) / 1e9,
        "ack_p50_ns": pct(acks, 50),
        "ack_p99_ns": pct(acks, 99),
        "ack_max_ns": acks[-1] if acks else None,
        "cpu_s": cpu1 - cpu0,
    }


async def amain(cfg) -> None:
    base = cfg["base_url"].rstrip("/")
    tasks = cfg["tasks"]
    conns = int(cfg.get("conns", 32))
    connector = aiohttp.TCPConnector(limit=conns, limit_per_host=conns, keepalive_timeout=120)
    headers = {"X-API-Key": cfg["api_key"], "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=float(cfg.get("request_timeout", 30)))
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout, skip_auto_headers=("User-Agent",)
    ) as session:
        urls = [URL(f"{base}/api/task/task/{t}/events") for t in tasks]
        # Warm up: open the keep-alive pool (one request per connection, ignored by receivers).
        warm = Counter()
        wbody = b'{"status":"progress","progress":%d,"message":"w"}' % int(cfg.get("progress", 50))
        await asyncio.gather(
            *(post_single(session, urls[i % len(urls)], wbody, warm) for i in range(conns))
        )
        go = asyncio.ensure_future(read_line())
        emit("ready")
        if cfg["mode"] == "single":
            res = await run_single(cfg, session, urls, go)
        else:
            res = await run_batch(cfg, session, base, tasks, go)
        res["warmup_status"] = {str(k): v for k, v in warm.items()}
    emit(res)


def main() -> None:
    cfg = orjson.loads(sys.stdin.readline())
    set_affinity(cfg.get("cpus"))
    if cfg.get("uvloop", True):
        install_uvloop()
    asyncio.run(amain(cfg))


if __name__ == "__main__":
    main()
