"""Hostile-client measurements: repeatable, printed as JSON.

    python -m bench.hostile                       # every scenario, ~1-2 minutes
    python -m bench.hostile --scenario pings,snapshot --tasks 200

Each scenario starts a fresh `run.py` (own database) and measures, from outside:
- RSS: `VmRSS` of the server process sampled every 20 ms (peak and settled);
- loop stall: a probe process asks `GET /api/task/task/<id>/status` of another user back to
  back on one keep-alive connection; its max latency is about the longest time the loop
  did nothing else (p50 is the baseline);
- for floods: frames sent until the server closed, and the close code.

Scenarios: `snapshot` (N active tasks with ~K KB metadata, S raw sockets that never read),
`replay` (N finished tasks, S sockets with since=0 that never read), `history` (one task
with E events, C concurrent GET .../history), `pings` / `pongs` (one raw socket sending
control frames in a tight loop for up to F s).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, make_token, proc_rss_kb

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-hostile-secret-0123456789abcdef"
KEY = "bench-hostile-key"


class Server:
    def __init__(self, tmp: str, extra: list[str]) -> None:
        self.port = free_port()
        db = os.path.join(tmp, f"h{self.port}.db")
        cmd = [sys.executable, str(ROOT / "run.py"), "--host", "127.0.0.1", "--port",
               str(self.port), "--db", db, "--jwt-secret", SECRET, "--api-key", KEY,
               "--log-level", "warning", "--access-log", "false", *extra]
        self.err = open(os.path.join(tmp, f"h{self.port}.err"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.err)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.request("GET", "/healthz")
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
        finally:
            conn.close()

    def produce(self, path: str, body: Any) -> Any:
        status, data = self.request("POST", path, body, {"X-API-Key": KEY})
        assert status in (200, 201), (status, data)
        return data["data"]

    def rss_kb(self) -> int:
        return proc_rss_kb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.err.close()


def _probe_loop(port: int, token: str, stop: Any, out: Any) -> None:
    """In its own process, so the load generator's threads cannot slow it down."""
    headers = {"Authorization": f"Bearer {token}"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn.request("GET", "/api/task/task/probe/status", headers=headers)
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        latencies.append(time.perf_counter() - started)
        time.sleep(0.001)
    conn.close()
    out.send(latencies)


class Probe:
    """Back-to-back status requests of a bystander user (another process), and RSS
    samples (a thread here)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.rss: list[int] = []
        server.produce("/api/task/tasks", {"task_id": "probe", "user_id": 999,
                                           "task_type": "probe"})
        self._stop = multiprocessing.Event()
        self._recv, send = multiprocessing.Pipe(duplex=False)
        self._proc = multiprocessing.Process(
            target=_probe_loop, args=(server.port, make_token(SECRET, 999), self._stop, send),
            daemon=True)
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._proc.start()
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.rss.append(self.server.rss_kb())
            time.sleep(0.02)

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        latencies = self._recv.recv() if self._recv.poll(30) else []
        self._proc.join(10)
        self._sampler.join(5)
        lat = sorted(latencies) or [0.0]
        return {"probe_requests": len(latencies),
                "status_p50_ms": round(lat[len(lat) // 2] * 1e3, 2),
                "status_p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 2),
                "status_max_ms": round(lat[-1] * 1e3, 1),
                "rss_peak_mb": round(max(self.rss or [0]) / 1024, 1)}


def raw_ws(port: int, user: int, query: str = "", rcvbuf: int | None = 4096) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/task/ws/task/{user}?token={make_token(SECRET, user)}{query} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during handshake")
        head += chunk
    assert b" 101 " in head.split(b"\r\n")[0], head
    return sock


def register_many(server: Server, user: int, n: int, meta_kb: int, finish: bool) -> None:
    blob = "m" * (meta_kb * 1024 - 40)
    for i in range(n):
        server.produce("/api/task/tasks", {"task_id": f"u{user}t{i}", "user_id": user,
                                           "task_type": "big", "metadata": {"blob": blob}})
    if finish:
        for start in range(0, n, 1000):
            server.produce("/api/task/events", {"events": [
                {"task_id": f"u{user}t{i}", "status": "completed"}
                for i in range(start, min(n, start + 1000))]})


def settle_rss(server: Server, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
    return server.rss_kb()


def connections(server: Server) -> int:
    return int(server.request("GET", "/healthz")[1].get("connections", -1))


def reader_s(server: Server, user: int, query: str, tasks: int) -> float:
    """Seconds a client that reads takes to get the whole snapshot (and replay)."""
    started = time.perf_counter()
    sock = raw_ws(server.port, user, query, rcvbuf=None)
    want = 2 + (tasks if query else 0)  # connected, active_tasks, one task_status each
    got = 0
    buf = bytearray()
    try:
        while got < want:
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed before the snapshot was whole")
            buf += data
            while len(buf) >= 2:
                size, head = buf[1] & 0x7F, 2
                if size == 126:
                    if len(buf) < 4:
                        break
                    size, head = struct.unpack("!H", buf[2:4])[0], 4
                elif size == 127:
                    if len(buf) < 10:
                        break
                    size, head = struct.unpack("!Q", buf[2:10])[0], 10
                if len(buf) < head + size:
                    break
                final, op = buf[0] & 0x80, buf[0] & 0x0F
                del buf[:head + size]
                if final and op in (0x0, 0x1):
                    got += 1
    finally:
        sock.close()
    return round(time.perf_counter() - started, 2)


def scenario_snapshot(args: argparse.Namespace, tmp: str, replay: bool) -> dict[str, Any]:
    server = Server(tmp, ["--send-timeout", str(args.send_timeout)])
    try:
        user = 2 if replay else 1
        register_many(server, user, args.tasks, args.meta_kb, finish=replay)
        query = "&since=0" if replay else ""
        idle = settle_rss(server, 1.0)
        probe = Probe(server)
        probe.start()
        socks = [raw_ws(server.port, user, query) for _ in range(args.sockets)]
        # held until the server gives up on them (4408 after --send-timeout)
        deadline = time.monotonic() + args.send_timeout + 30
        while connections(server) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        cut_off_s = round(time.monotonic() - (deadline - args.send_timeout - 30), 1)
        result = probe.finish()
        for sock in socks:
            sock.close()
        result.update(idle_rss_mb=round(idle / 1024, 1),
                      settled_rss_mb=round(settle_rss(server, 2.0) / 1024, 1),
                      stuck_sockets_closed_after_s=cut_off_s,
                      reader_s=reader_s(server, user, query, args.tasks))
        result["growth_peak_mb"] = round(result["rss_peak_mb"] - result["idle_rss_mb"], 1)
        return result
    finally:
        server.stop()


def scenario_history(args: argparse.Namespace, tmp: str) -> dict[str, Any]:
    server = Server(tmp, [])
    try:
        server.produce("/api/task/tasks", {"task_id": "h", "user_id": 5, "task_type": "h"})
        text = "e" * 250
        for start in range(0, args.events, 1000):
            server.produce("/api/task/events", {"events": [
                {"task_id": "h", "status": "progress", "progress": (start + i) % 100,
                 "message": text} for i in range(min(1000, args.events - start))]})
        idle = settle_rss(server, 1.0)
        probe = Probe(server)
        probe.start()
        headers = {"Authorization": f"Bearer {make_token(SECRET, 5)}"}
        sizes: list[int] = []

        def get() -> None:  # every page (before paging: one answer)
            after = 0
            while after is not None:
                _, data = server.request("GET", f"/api/task/task/h/history?after={after}",
                                         None, headers)
                sizes.append(len(json.dumps(data)))
                after = data["data"].get("next_after")

        threads = [threading.Thread(target=get) for _ in range(args.concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        result = probe.finish()
        result.update(idle_rss_mb=round(idle / 1024, 1), answer_bytes=max(sizes or [0]),
                      answers=len(sizes),
                      settled_rss_mb=round(settle_rss(server, 1.0) / 1024, 1))
        return result
    finally:
        server.stop()


def flood_once(port: int, opcode: int, until: float) -> dict[str, Any]:
    """One socket sending empty control frames in a tight loop (reading what comes back in
    a thread) until the server closes it or `until` passes."""
    sock = raw_ws(port, 3, rcvbuf=None)
    chunk = (bytes((0x80 | opcode, 0x80)) + b"\x00\x00\x00\x00") * 1000  # masked, empty
    started = time.monotonic()
    got: dict[str, Any] = {"pongs": 0, "close_code": None, "close_after_s": None}
    done = threading.Event()

    def reader() -> None:
        buf = b""
        while not done.is_set():
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            buf += data
            while len(buf) >= 2:
                op, size, head = buf[0] & 0x0F, buf[1] & 0x7F, 2
                if size == 126:
                    if len(buf) < 4:
                        break
                    size, head = struct.unpack("!H", buf[2:4])[0], 4
                elif size == 127:
                    if len(buf) < 10:
                        break
                    size, head = struct.unpack("!Q", buf[2:10])[0], 10
                if len(buf) < head + size:
                    break
                payload, buf = buf[head:head + size], buf[head + size:]
                if op == 0xA:
                    got["pongs"] += 1
                elif op == 0x8:
                    got["close_code"] = (struct.unpack("!H", payload[:2])[0] if payload
                                         else 1005)
                    got["close_after_s"] = round(time.monotonic() - started, 3)
                    done.set()
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sock.settimeout(0.5)
    while not done.is_set() and time.monotonic() < until:
        try:
            sock.sendall(chunk)
        except OSError:  # a timeout (the server stopped reading) or a reset
            continue
    done.set()
    sock.close()
    thread.join(2)
    return got


def scenario_control_flood(args: argparse.Namespace, tmp: str, opcode: int) -> dict[str, Any]:
    """For `--flood-s` seconds, one attacker floods; when it is closed it reconnects and
    floods again (so the figure is a sustained attack, not one socket's life)."""
    server = Server(tmp, [])
    try:
        probe = Probe(server)
        probe.start()
        until = time.monotonic() + args.flood_s
        runs = []
        while time.monotonic() < until:
            runs.append(flood_once(server.port, opcode, until))
        time.sleep(0.5)
        result = probe.finish()
        closes = [r["close_after_s"] for r in runs if r["close_code"] is not None]
        result.update(connections=len(runs),
                      close_codes=sorted({r["close_code"] for r in runs} - {None}),
                      pongs_per_connection_max=max(r["pongs"] for r in runs),
                      close_after_s_max=max(closes) if closes else None)
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="pings,pongs,snapshot,replay,history")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--meta-kb", type=int, default=60)
    parser.add_argument("--sockets", type=int, default=10)
    parser.add_argument("--send-timeout", type=float, default=10.0)
    parser.add_argument("--events", type=int, default=15600)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--flood-s", type=float, default=10.0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="taskpush-hostile-") as tmp:
        for name in args.scenario.split(","):
            started = time.monotonic()
            if name == "snapshot":
                results[name] = scenario_snapshot(args, tmp, replay=False)
            elif name == "replay":
                results[name] = scenario_snapshot(args, tmp, replay=True)
            elif name == "history":
                results[name] = scenario_history(args, tmp)
            elif name in ("pings", "pongs"):
                results[name] = scenario_control_flood(args, tmp, 0x9 if name == "pings"
                                                       else 0xA)
            else:
                raise SystemExit(f"unknown scenario {name!r}")
            results[name]["wall_s"] = round(time.monotonic() - started, 1)
            print(name, json.dumps(results[name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
