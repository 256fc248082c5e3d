"""Start and stop the servers under test, and read their CPU time and memory from /proc.

Each server is a subprocess pinned (``os.sched_setaffinity`` in the child) to the server
CPUs, with a fresh temporary directory (taskpush's and the naive server's database, the
log). taskpush runs with its shipped defaults (``run.py`` with only the flags it cannot do
without); extra flags come from ``--taskpush-arg``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import aiohttp

from bench.common import (
    other_cpu,
    proc_cpu_s,
    proc_rss_kb,
    raise_nofile,
    self_cpu_s,
    set_affinity,
    sys_cpu,
)

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
KINDS = ("taskpush", "relay", "naive", "naive-json")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_cpus(s: str | None) -> list[int]:
    out: list[int] = []
    for part in (s or "").split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


@dataclass
class Env:
    """What every server and every generator process of one invocation shares."""

    tmp: str
    taskpush_dir: str = REPO
    taskpush_args: list[str] = field(default_factory=list)
    relay_uvloop: bool = True
    api_key: str = "bench-api-key-0123456789"
    secret: str = "bench-jwt-secret-0123456789abcdef0123456789"
    server_cpus: list[int] = field(default_factory=list)
    loadgen_cpus: list[int] = field(default_factory=list)

    @classmethod
    def pinned(cls, tmp: str, server_cpus: str | None, loadgen_cpus: str | None,
               **kw) -> Env:
        """Server on the first CPU and the generator on the others, unless told otherwise
        (no pinning on a one-CPU machine)."""
        avail = sorted(os.sched_getaffinity(0))
        srv = parse_cpus(server_cpus) if server_cpus is not None else (
            [avail[0]] if len(avail) >= 2 else [])
        gen = parse_cpus(loadgen_cpus) if loadgen_cpus is not None else (
            [c for c in avail if c not in srv] if len(avail) >= 2 else [])
        return cls(tmp=tmp, server_cpus=srv, loadgen_cpus=gen, **kw)

    @property
    def loadgen_ncpu(self) -> int:
        return len(self.loadgen_cpus) or len(os.sched_getaffinity(0))


class Server:
    """A server under test, started as a subprocess pinned to the server CPUs."""

    def __init__(self, kind: str, env: Env, label: str, port: int,
                 extra_args: list[str] | None = None, db: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown server {kind!r}")
        self.kind = kind
        self.extra_args = extra_args or []
        self.env = env
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.ws_base = self.base  # where the scenarios open sockets (a cluster: another node)
        self.db = db  # taskpush: a PostgreSQL URL instead of a fresh SQLite file
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix=f"{label}-{kind}-", dir=env.tmp)  # a fresh db
        self.log_path = os.path.join(self.dir, "server.log")
        self.logf = None

    def command(self) -> list[str]:
        e = self.env
        if self.kind == "relay":
            return [sys.executable, "-m", "bench.relay", "--port", str(self.port),
                    "--api-key", e.api_key, "--jwt-secret", e.secret,
                    *([] if e.relay_uvloop else ["--no-uvloop"])]
        if self.kind in ("naive", "naive-json"):
            return [sys.executable, "-m", "bench.naive", "--port", str(self.port),
                    "--db", os.path.join(self.dir, "naive.db"), "--api-key", e.api_key,
                    "--jwt-secret", e.secret,
                    "--json", "stdlib" if self.kind == "naive-json" else "orjson"]
        return [sys.executable, "run.py", "--host", "127.0.0.1", "--port", str(self.port),
                "--db", self.db or os.path.join(self.dir, "bench.db"), "--jwt-secret", e.secret,
                "--api-key", e.api_key, *e.taskpush_args, *self.extra_args]

    async def start(self) -> None:
        cpus = self.env.server_cpus

        def pre() -> None:
            raise_nofile()
            set_affinity(cpus)

        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKPUSH_")}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.logf = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(), cwd=self.env.taskpush_dir if self.kind == "taskpush" else REPO,
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
        log(f"{self.kind} up on :{self.port} pid {self.proc.pid}, "
            f"rss {self.rss_kb() / 1024:.1f} MB")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        """utime + stime of every thread of the server (the SQLite threads included)."""
        return proc_cpu_s(self.proc.pid)  # type: ignore[union-attr]

    def rss_kb(self) -> int:
        return proc_rss_kb(self.proc.pid)  # type: ignore[union-attr]

    async def quiesce(self, max_s: float = 5.0, util: float = 0.05) -> None:
        """Wait (bounded) until the server is idle, so one phase does not bleed into the next."""
        end = time.monotonic() + max_s
        while time.monotonic() < end and self.alive():
            c0 = self.cpu()
            await asyncio.sleep(0.25)
            if (self.cpu() - c0) / 0.25 <= util:
                return

    async def wait_quiet(self, max_s: float = 10.0, cores: float = 0.25) -> float:
        """Wait (bounded) until processes other than ours use less than `cores` CPUs, so a
        retry does not land in the same burst of someone else's work; returns that load."""
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
        if self.logf is not None:
            self.logf.close()
