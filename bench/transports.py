"""Bytes and server CPU per delivered update: WebSocket vs Server-Sent Events.

    python -m bench.transports [--clients 50] [--tasks 100] [--rounds 20]

Starts `run.py` (uvloop when installed) on a temporary database, registers `--tasks` tasks
of one user, then runs three phases with the same producer load (`--rounds` batches, each
one progress event for every task, so nothing is coalesced): no listener (the baseline:
HTTP, validation, commit), `--clients` WebSockets, and `--clients` SSE streams of that user.
Server CPU per delivered message is (phase - baseline) / messages; bytes per message are
what the server writes for it (WebSocket: frame header + JSON; SSE: chunk header + event
lines + JSON), counted by the clients. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import free_port, install_uvloop, make_token, proc_cpu_s

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-0123456789-abcdefghij"
KEY = "bench-key-0123456789"
HEADERS = {"X-API-Key": KEY}


async def wait_healthy(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("server did not start")


class Counter:
    def __init__(self, expect: int) -> None:
        self.messages = 0
        self.bytes = 0
        self.expect = expect
        self.done = asyncio.Event()

    def add(self, size: int) -> None:
        self.messages += 1
        self.bytes += size
        if self.messages >= self.expect:
            self.done.set()


async def ws_client(http: aiohttp.ClientSession, url: str, token: str, count: Counter,
                    ready: asyncio.Event) -> None:
    async with http.ws_connect(f"{url}/api/task/ws/task/1?token={token}") as ws:
        async for msg in ws:
            data = json.loads(msg.data)
            if data["type"] == "active_tasks":
                ready.set()
            elif data["type"] == "task_status":
                size = len(msg.data.encode())
                count.add(size + (2 if size < 126 else 4))  # RFC 6455 server frame header


async def sse_client(http: aiohttp.ClientSession, url: str, token: str, count: Counter,
                     ready: asyncio.Event) -> None:
    async with http.get(f"{url}/api/task/stream?token={token}") as resp:
        event: list[bytes] = []
        async for line in resp.content:
            if line != b"\n":
                event.append(line)
                continue
            text = b"".join(event) + b"\n"
            event = []
            if text.startswith(b"event: active_tasks"):
                ready.set()
            elif text.startswith(b"event: task_status"):
                # one chunk per event: "<hex size>\r\n" + event + "\r\n"
                count.add(len(text) + len(f"{len(text):x}") + 4)


async def phase(url: str, pid: int, kind: str, clients: int, tasks: int, rounds: int
                ) -> dict[str, float]:
    token = make_token(SECRET, 1)
    count = Counter(clients * tasks * rounds)
    async with aiohttp.ClientSession() as http:
        readies = [asyncio.Event() for _ in range(clients)]
        client = ws_client if kind == "websocket" else sse_client
        runners = [asyncio.create_task(client(http, url, token, count, r)) for r in readies]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
        before = proc_cpu_s(pid)
        started = time.perf_counter()
        for n in range(rounds):
            events = [{"task_id": f"t{i}", "status": "progress", "progress": n % 100,
                       "message": f"step {n} of {rounds}"} for i in range(tasks)]
            async with http.post(url + "/api/task/events", json={"events": events},
                                 headers=HEADERS) as resp:
                assert resp.status == 200, await resp.text()
        if clients:
            await asyncio.wait_for(count.done.wait(), 120)
        seconds = time.perf_counter() - started
        cpu = proc_cpu_s(pid) - before
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
    return {"cpu_s": cpu, "wall_s": seconds, "messages": count.messages, "bytes": count.bytes}


async def main(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), "--port", str(port), "--db",
             os.path.join(tmp, "t.db"), "--jwt-secret", SECRET, "--api-key", KEY,
             "--access-log", "false", "--log-level", "warning",
             "--max-connections-per-user", str(args.clients + 10)], cwd=ROOT)
        try:
            await wait_healthy(url)
            async with aiohttp.ClientSession() as http:
                for i in range(args.tasks):
                    async with http.post(url + "/api/task/tasks", headers=HEADERS, json={
                            "task_id": f"t{i}", "user_id": 1, "task_type": "bench"}) as r:
                        assert r.status in (200, 201)
            base = await phase(url, proc.pid, "websocket", 0, args.tasks, args.rounds)
            out: dict[str, object] = {"clients": args.clients, "tasks": args.tasks,
                                      "rounds": args.rounds, "baseline_cpu_s": base["cpu_s"]}
            for kind in ("websocket", "sse"):
                got = await phase(url, proc.pid, kind, args.clients, args.tasks, args.rounds)
                messages = got["messages"]
                out[kind] = {
                    "messages": messages,
                    "bytes_per_update": round(got["bytes"] / messages, 1),
                    "server_cpu_us_per_update": round(
                        (got["cpu_s"] - base["cpu_s"]) / messages * 1e6, 2),
                    "server_cpu_s": round(got["cpu_s"], 2),
                }
            return out
        finally:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    install_uvloop()
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
