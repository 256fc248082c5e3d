"""Real processes for the worker-integration tests: a Redis server, a taskpush server, and a
WebSocket client that sees what a browser would.

`redis_server()` starts Debian's redis-server on a private unix socket with persistence off;
in CI (CI set) a missing or failing redis-server fails the test, on a developer machine it
skips. `Browser` keeps one WebSocket open on a thread of its own and records every
`task_status` it receives, in order, so a test can wait for a task's final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import API_KEY, SECRET, make_token
from tests.procs import ROOT, ServerProcess, child_env

CLIENT_DIR = ROOT / "clients" / "python"  # on pytest's pythonpath (setup.cfg)


def taskpush_server(workdir: Path, *args: str) -> ServerProcess:
    return ServerProcess(workdir, ["--jwt-secret", SECRET, "--api-key", API_KEY,
                                   "--access-log", "false", *args]).start()


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "redis.sock"
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed (.ci/run installs it)")
            pytest.skip("redis-server not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.socket.parent),
             "--logfile", str(self.log)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text() if self.log.exists() else ""
                self.stop()
                pytest.fail(f"redis-server did not start: {text[-2000:]}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def redis_server(workdir: Path) -> Iterator[Redis]:
    redis = Redis(workdir).start()
    try:
        yield redis
    finally:
        redis.stop()


def worker_env(server: ServerProcess, **extra: str) -> dict[str, str]:
    """The environment of a worker process: taskpush's address and key, the client package
    and the tests' task modules importable."""
    path = os.pathsep.join([str(CLIENT_DIR), str(ROOT)])
    return child_env({"TASKPUSH_URL": server.url, "TASKPUSH_API_KEY": API_KEY,
                      "PYTHONPATH": path, **extra})


class Worker:
    """A worker subprocess whose output goes to a file (read it when a test fails)."""

    def __init__(self, workdir: Path, name: str, cmd: list[str], env: dict[str, str],
                 cwd: Path = ROOT) -> None:
        self.log = workdir / f"{name}.log"
        self.cmd, self.env, self.cwd = cmd, env, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)


def rest(server: ServerProcess, method: str, path: str, user: int = 1) -> dict[str, Any]:
    req = urllib.request.Request(server.url + path, method=method,  # noqa: S310
                                 headers={"Authorization": f"Bearer {make_token(user)}"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())["data"]


def history(server: ServerProcess, task_id: str, user: int = 1) -> list[dict[str, Any]]:
    return rest(server, "GET", f"/api/task/task/{task_id}/history", user)["events"]


class Browser:
    """One user's WebSocket, read on a thread of its own; `task_status` messages are kept
    in arrival order. Reconnects with `since` when the server restarts, as taskpush.js
    does, so a test can stop the server and still see every change."""

    def __init__(self, server: ServerProcess, user_id: int = 1) -> None:
        self.server, self.user_id = server, user_id
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Browser:
        self._thread.start()
        assert self._connected.wait(10), "the WebSocket did not connect"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _run(self) -> None:
        since = None
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                url = (f"{self.server.ws_url}/api/task/ws/task/{self.user_id}"
                       f"?token={make_token(self.user_id)}"
                       + (f"&since={since}" if since is not None else ""))
                try:
                    async with session.ws_connect(url) as ws:
                        while not self._stop.is_set():
                            try:
                                msg = await ws.receive(timeout=0.2)
                            except TimeoutError:
                                continue  # only to look at _stop now and then
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                break
                            data = json.loads(msg.data)
                            if data["type"] == "connected":
                                since = data.get("seq") if since is None else since
                            elif data["type"] == "active_tasks":
                                # ready only now: a task registered between `connected`
                                # and the snapshot's read is in `active_tasks`, not pushed
                                self._connected.set()
                            elif data["type"] == "task_status":
                                since = max(since or 0, data.get("seq", 0))
                                with self._cond:
                                    self.messages.append(data)
                                    self._cond.notify_all()
                except (TimeoutError, aiohttp.ClientError):
                    if not self._stop.is_set():
                        await asyncio.sleep(0.1)

    def of(self, task_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages if m.get("task_id") == task_id]

    def until(self, task_id: str, predicate: Callable[[dict[str, Any]], bool] | None = None,
              timeout: float = 30.0) -> list[dict[str, Any]]:
        """The task's messages up to the first matching `predicate` (default: a final
        state); fails the test after `timeout`."""
        predicate = predicate or (lambda m: m["status"] in ("completed", "failed", "cancelled"))
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = [m for m in self.messages if m.get("task_id") == task_id]
                for index, message in enumerate(seen):
                    if predicate(message):
                        return seen[:index + 1]
                left = deadline - time.monotonic()
                assert left > 0, f"task {task_id}: no matching message; saw {seen}"
                self._cond.wait(left)


def assert_browser_order(seen: list[dict[str, Any]]) -> None:
    """What a browser must see: seq strictly increasing, nothing after a final state."""
    seqs = [m["seq"] for m in seen]
    assert seqs == sorted(set(seqs)), seqs
    finals = [i for i, m in enumerate(seen) if m["status"] in ("completed", "failed",
                                                               "cancelled")]
    assert not finals or finals == [len(seen) - 1], [m["status"] for m in seen]


class HeldProxy:
    """A TCP proxy to a taskpush server that holds every connection until `release()`:
    taskpush seen as hanging by a sender. `forwarded` is set once anything reached the
    server (so a test can tell that a call returned before any answer could exist); a
    connection still held after `hold` seconds is let through, so that code which waits
    for the answer makes its test fail instead of hang."""

    def __init__(self, upstream: ServerProcess, hold: float = 20.0) -> None:
        self.upstream, self.hold = upstream, hold
        self.forwarded = threading.Event()
        self._gate = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self._gate.set()

    def close(self) -> None:
        self._gate.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def __enter__(self) -> HeldProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        self._gate.wait(self.hold)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream.port), timeout=10)
        except OSError:
            return
        with self._lock:
            self._sockets.append(upstream)
        self.forwarded.set()
        upstream.settimeout(None)
        back = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
        back.start()
        _pipe(conn, upstream)
        back.join()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
