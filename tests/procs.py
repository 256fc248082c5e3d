"""Real server processes for tests: `python run.py ...` on a free port and a tmp database.

The database is a SQLite file (the default: `<tmp>/taskpush.db`) or a PostgreSQL URL
(`db="postgresql://..."`, tests/pg.py): any number of processes may share one URL, each a
node of one cluster. A node on PostgreSQL is started with `--node-name <its name>` unless
the test passes one, so a restarted node is the same node (it finds its own in-process
tasks) whatever port it gets.

`ServerProcess.start()` waits for /healthz with a bounded poll (and fails fast, with the
server's stderr, if the process exits first); `stop()` sends SIGTERM and escalates to
SIGKILL; stdout and stderr go to files the test can read afterwards. `Servers` remembers every
process a test made, so its fixture's teardown ends them whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
RUN_PY = ROOT / "run.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any TASKPUSH_* setting that could leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKPUSH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0
            ) -> subprocess.CompletedProcess[str]:
    """`python run.py ARGS` to completion (for commands that do not serve)."""
    return subprocess.run([sys.executable, str(RUN_PY), *args], cwd=ROOT, env=child_env(env),
                          capture_output=True, text=True, timeout=timeout, check=False)


def is_postgres_url(db: Path | str) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


class ServerProcess:
    def __init__(self, workdir: Path, args: Sequence[str] = (), *,
                 db: Path | str | None = None, env: dict[str, str] | None = None,
                 name: str = "server") -> None:
        self.workdir = workdir
        self.args = list(args)
        self.db: Path | str = db if db is not None else workdir / "taskpush.db"
        self.env = env
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._files: list[IO[bytes]] = []
        self.starts = 0

    @property
    def engine(self) -> str:
        """`sqlite` or `postgresql`: which engine `--db` selects."""
        return "postgresql" if is_postgres_url(self.db) else "sqlite"

    @property
    def node_args(self) -> list[str]:
        """`--node-name NAME` for a PostgreSQL node the test did not name itself."""
        if self.engine != "postgresql" or any(
                a == "--node-name" or a.startswith("--node-name=") for a in self.args):
            return []
        return ["--node-name", self.name]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, *, port: int | None = None) -> ServerProcess:
        """Start (again, on the same database) and wait until /healthz answers 200.

        On a new free port, unless `port` is given (e.g. `port=server.port` so a restarted
        server is where its clients will reconnect)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._close_files()
        self.port = port if port is not None else free_port()
        self.starts += 1
        # Append, so a restart keeps the earlier run's output readable.
        out = open(self.stdout_path, "ab")  # noqa: SIM115 (closed in _close_files)
        err = open(self.stderr_path, "ab")  # noqa: SIM115
        self._files = [out, err]
        cmd = [sys.executable, str(RUN_PY), "--host", "127.0.0.1", "--port", str(self.port),
               "--db", str(self.db), *self.node_args, *self.args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(self.env), stdout=out,
                                     stderr=err, stdin=subprocess.DEVNULL)
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before "
                                     f"it was healthy:\n{self.stderr()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not healthy after {timeout} s:\n{self.stderr()}")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/healthz", timeout=5) as resp:  # noqa: S310
            return json.loads(resp.read())

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        """The exit code; fails the test (and kills the process) if it takes longer."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"{self.name} did not exit within {timeout} s:\n"
                                 f"{self.stderr()}") from None
        finally:
            self._close_files()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait for the exit code (SIGKILL after `timeout`, failing the test)."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL: the process dies at once, mid-whatever-it-was-doing."""
        self.signal(signal.SIGKILL)
        return self.wait(10.0)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace") \
            if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace") \
            if self.stderr_path.exists() else ""

    def cleanup(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_files()

    def _close_files(self) -> None:
        for fh in self._files:
            fh.close()
        self._files = []


class Servers:
    """Factory handed to tests; remembers every process so teardown can end them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.made: list[ServerProcess] = []

    def __call__(self, *args: str, db: Path | str | None = None,
                 env: dict[str, str] | None = None, name: str | None = None) -> ServerProcess:
        server = ServerProcess(self.tmp_path, args, db=db, env=env,
                               name=name or f"server{len(self.made)}")
        self.made.append(server)
        return server

    def cluster(self, db: str, *args: str, nodes: int = 2,
                env: dict[str, str] | None = None) -> list[ServerProcess]:
        """`nodes` processes (not started) on one PostgreSQL database, the same flags each:
        one service. Named node0, node1, ... (their --node-name)."""
        assert is_postgres_url(db), "a cluster needs a PostgreSQL URL"
        first = len(self.made)
        return [self(*args, db=db, env=env, name=f"node{first + k}") for k in range(nodes)]

    def close(self) -> None:
        for server in self.made:
            server.cleanup()


def servers_fixture(tmp_path: Path) -> Iterator[Servers]:
    """Body of the `servers` fixture (tests/conftest.py)."""
    made = Servers(tmp_path)
    try:
        yield made
    finally:
        made.close()
