"""Load-generator process: task-queue workers reporting through taskpush-client.

Started by the workload scenario as ``python -m bench.workers`` (the same stdin/stdout
protocol as bench/publisher.py: a JSON config line, ``ready``, ``go``, one JSON result
line). Each of ``workers`` threads is one worker process's worth of reporting: its own
``taskpush_client.Client`` (its sender thread and connection, as in a real worker) and one
task at a time: register, ``running``, ``progress`` at ``rate`` calls per second for
``task_s`` seconds, ``completed``; then the next task, until ``duration``. Every event
carries ``message = "b:<step>:<monotonic ns of the call>"``, so a socket measures how old
the update it receives is (progress is coalesced by the client: the latest call wins).
"""

from __future__ import annotations

import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "clients", "python"))

import orjson  # noqa: E402
from taskpush_client import Client  # noqa: E402

from bench.common import self_cpu_s, set_affinity  # noqa: E402

mono = time.monotonic_ns


def emit(obj) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else orjson.dumps(obj).decode()) + "\n")
    sys.stdout.flush()


def warm(cfg: dict, w: int) -> Client:
    """A worker's client with its connection open: one registration sent and answered
    before the measured window (a worker process starts long before its first report)."""
    client = Client(cfg["base_url"], cfg["api_key"])
    client.register(f"wl-{cfg['step']}-{w}-warm", int(cfg["first_uid"]) + w, "bench")
    client.flush(30)
    return client


def worker(cfg: dict, w: int, client: Client, t0: float, counts: dict, lock: threading.Lock
           ) -> None:
    step, rate, task_s = cfg["step"], float(cfg["rate"]), float(cfg["task_s"])
    uid = int(cfg["first_uid"]) + w
    warmed = dict(client.stats)  # the warm-up's request is not counted
    end = t0 + float(cfg["duration"])
    calls = tasks = 0
    n = 0
    while time.monotonic() < end:
        tid = f"wl-{step}-{w}-{n}"
        n += 1
        client.register(tid, uid, "bench")
        client.event(tid, "running", message=f"b:{step}:{mono()}")
        calls += 1
        ticks = max(1, int(rate * task_s))
        start = time.monotonic()
        for i in range(ticks):
            wait = start + (i + 1) / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            client.event(tid, "progress", progress=min(99, (i + 1) * 100 // ticks),
                         message=f"b:{step}:{mono()}")
            calls += 1
            if time.monotonic() >= end:
                break
        client.event(tid, "completed", message=f"b:{step}:{mono()}")
        calls += 1
        tasks += 1
    client.close(30)
    with lock:
        counts["calls"] += calls
        counts["tasks"] += tasks
        for k, v in client.stats.items():
            counts[k] = counts.get(k, 0) + v - warmed.get(k, 0)


def main() -> None:
    cfg = orjson.loads(sys.stdin.readline())
    set_affinity(cfg.get("cpus"))
    clients = [warm(cfg, w) for w in range(int(cfg["workers"]))]
    emit("ready")
    sys.stdin.readline()  # go
    cpu0, t0 = self_cpu_s(), time.monotonic()
    counts: dict = {"calls": 0, "tasks": 0}
    lock = threading.Lock()
    threads = [threading.Thread(target=worker, args=(cfg, w, c, t0, counts, lock), daemon=True)
               for w, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(float(cfg["duration"]) + 60)
    emit({**counts, "cpu_s": self_cpu_s() - cpu0, "elapsed_s": time.monotonic() - t0})


if __name__ == "__main__":
    main()
