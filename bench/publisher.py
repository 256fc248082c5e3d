"""Load-generator worker process: posts producer events to the server.

Started by the stream scenarios as ``python -m bench.publisher``. Protocol on stdin/stdout:
  stdin line 1: JSON config;  stdout: ``ready``;  stdin: ``go``;  stdout: one JSON result line.

Requests go through bench/httpclient.py's raw keep-alive connections (no aiohttp client: it
cost as much CPU per request as the server under test). The process reports its own CPU
time, so a step where the generator, not the server, was the limit is visible.

Modes
  single  open loop: event i is *due* at t0 + i/rate and carries that due time (monotonic ns,
          the clock is system wide) in ``message = "b:<step>:<due_ns>"``; due events are sent
          in order over a fixed pool of connections. If the server (or this process) cannot
          keep up, events wait in the queue and their measured latency grows: no coordinated
          omission.
  batch   closed loop: ``concurrency`` connections each post batches of ``batch_size`` events
          to POST /api/task/events back to back until ``duration`` or ``max_batches``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib

import orjson

from bench.common import install_uvloop, pct, self_cpu_s, set_affinity
from bench.httpclient import ConnPool, post

mono = time.monotonic_ns


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def emit(obj) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else orjson.dumps(obj).decode()) + "\n")
    sys.stdout.flush()


async def run_single(cfg, pool: ConnPool, host: str, port: int, go) -> dict:
    rate = float(cfg["rate"])
    duration = float(cfg["duration"])
    step = cfg["step"]
    progress = int(cfg.get("progress", 50))
    tasks = cfg["tasks"]
    api_key = cfg["api_key"]
    total = max(1, int(rate * duration))
    interval = 1e9 / rate
    n = len(tasks)
    heads = [post(host, port, f"/api/task/task/{t}/events", b"", api_key)[:-len(
        b"Content-Length: 0\r\n\r\n")] for t in tasks]
    counts: Counter = Counter()
    ack: list[int] = []
    prefix = b'{"status":"progress","progress":%d,"message":"b:%s:' % (progress, step.encode())
    finished = asyncio.get_running_loop().create_future()
    state = {"done": 0}

    def on_done(status, _body, due) -> None:
        counts[status] += 1
        if status == 200:
            ack.append(mono() - due)
        state["done"] += 1
        if state["done"] >= total and not finished.done():
            finished.set_result(None)

    await go
    cpu0 = self_cpu_s()
    t0 = mono() + 5_000_000
    hard_end = t0 + int((duration + float(cfg.get("grace", 5.0))) * 1e9)
    i = 0
    submit = pool.submit
    while i < total:
        now = mono()
        if now >= t0:
            due_n = min(total, int((now - t0) / interval) + 1)
            while i < due_n:
                due = t0 + int(i * interval)
                body = prefix + b'%d"}' % due
                submit(heads[i % n] + b"Content-Length: %d\r\n\r\n" % len(body) + body, due,
                       on_done)
                i += 1
        if i < total:
            # Timers have ~1 ms resolution: never spin, dispatch whatever is due per tick.
            wait = (t0 + int(i * interval) - mono()) / 1e9
            await asyncio.sleep(wait if wait > 0.001 else 0.001)
    sched_end = mono()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(finished, max(0.1, (hard_end - mono()) / 1e9))
    unsent = len(pool.pending)
    end = mono()
    cpu1 = self_cpu_s()
    ack.sort()
    ok = counts.get(200, 0)
    return {
        "mode": "single",
        "step": step,
        "rate": rate,
        "scheduled": total,
        "ok": ok,
        "unsent": unsent,
        "unfinished": total - state["done"],
        "status_counts": {str(k): v for k, v in counts.items()},
        "sched_s": (sched_end - t0) / 1e9,
        "elapsed_s": (end - t0) / 1e9,
        "ack_p50_ns": pct(ack, 50),
        "ack_p99_ns": pct(ack, 99),
        "cpu_s": cpu1 - cpu0,
        "wall_s": (end - t0) / 1e9,
    }


async def run_batch(cfg, pool: ConnPool, host: str, port: int, go) -> dict:
    step = cfg["step"]
    size = int(cfg["batch_size"])
    duration = float(cfg["duration"])
    max_batches = int(cfg.get("max_batches", 10_000))
    progress = int(cfg.get("progress", 50))
    tasks = cfg["tasks"]
    n = len(tasks)
    counts: Counter = Counter()
    acks: list[int] = []
    state = {"next": 0, "ok": 0, "err": 0, "running": 0}
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    await go
    cpu0 = self_cpu_s()
    t0 = mono()
    end_at = t0 + int(duration * 1e9)

    def send_next() -> None:
        if mono() >= end_at or state["next"] >= max_batches:
            state["running"] -= 1
            if state["running"] == 0 and not finished.done():
                finished.set_result(None)
            return
        b = state["next"]
        state["next"] += 1
        start = (b * size) % n
        sent = mono()
        msg = f"b:{step}:{sent}"
        body = orjson.dumps({"events": [
            {"task_id": tasks[(start + j) % n], "status": "progress", "progress": progress,
             "message": msg} for j in range(size)]})
        pool.submit(post(host, port, "/api/task/events", body, cfg["api_key"]), sent, on_done)

    def on_done(status, raw, sent) -> None:
        counts[status] += 1
        if status == 200:
            res = orjson.loads(raw)["data"]["results"]
            good = sum(1 for x in res if x.get("ok"))
            state["ok"] += good
            state["err"] += len(res) - good
            acks.append(mono() - sent)
        else:
            state["err"] += size
        send_next()

    state["running"] = int(cfg["concurrency"])
    for _ in range(state["running"]):
        send_next()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(finished, duration + 60)
    end = mono()
    cpu1 = self_cpu_s()
    acks.sort()
    return {
        "mode": "batch",
        "step": step,
        "batches": state["next"],
        "batch_size": size,
        "events_ok": state["ok"],
        "events_err": state["err"],
        "status_counts": {str(k): v for k, v in counts.items()},
        "elapsed_s": (end - t0) / 1e9,
        "ack_p50_ns": pct(acks, 50),
        "ack_p99_ns": pct(acks, 99),
        "cpu_s": cpu1 - cpu0,
        "wall_s": (end - t0) / 1e9,
    }


async def amain(cfg) -> None:
    url = urlsplit(cfg["base_url"])
    host, port = url.hostname or "127.0.0.1", url.port or 80
    conns = int(cfg.get("conns", 32))
    pool = ConnPool(host, port, conns)
    await pool.open()
    # Warm up: one request per connection (receivers ignore the message).
    warm: Counter = Counter()
    left = asyncio.get_running_loop().create_future()
    pending = {"n": conns}

    def warmed(status, _body, _tag) -> None:
        warm[status] += 1
        pending["n"] -= 1
        if pending["n"] == 0 and not left.done():
            left.set_result(None)

    wbody = b'{"status":"progress","progress":%d,"message":"w"}' % int(cfg.get("progress", 50))
    tasks = cfg["tasks"]
    for i in range(conns):
        pool.submit(post(host, port, f"/api/task/task/{tasks[i % len(tasks)]}/events", wbody,
                         cfg["api_key"]), None, warmed)
    await asyncio.wait_for(left, 30)
    go = asyncio.ensure_future(read_line())
    emit("ready")
    if cfg["mode"] == "single":
        res = await run_single(cfg, pool, host, port, go)
    else:
        res = await run_batch(cfg, pool, host, port, go)
    res["warmup_status"] = {str(k): v for k, v in warm.items()}
    pool.close()
    emit(res)


def main() -> None:
    cfg = orjson.loads(sys.stdin.readline())
    set_affinity(cfg.get("cpus"))
    if cfg.get("uvloop", True):
        install_uvloop()
    asyncio.run(amain(cfg))


if __name__ == "__main__":
    main()
