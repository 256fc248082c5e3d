"""A real PostgreSQL server for tests (and the benchmark's cluster mode).

Debian's `postgresql` package (`.ci/run` installs it): `initdb` + `pg_ctl` on a private
directory, a private Unix socket directory and a free TCP port on 127.0.0.1. initdb refuses to
run as root, so when the tests run as root the server runs as the `postgres` user (its files
in a directory that user owns). Password authentication over TCP, so URLs carry a password
as users' do (the secrets-in-logs tests look for it). Each test gets a database of its own
(`PostgresServer.create_database`), so tests stay independent on one server.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PASSWORD_LENGTH = 24


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_bindir() -> Path | None:
    """The directory of initdb/pg_ctl/postgres: Debian keeps them off PATH, per version."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "postgres").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed, or its server did not start (the message says why)."""


class PostgresServer:
    """One PostgreSQL server: `start()`, `stop()`, `restart()`, `create_database()`, `sql()`."""

    def __init__(self, *, fsync: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable("PostgreSQL server binaries (initdb) not found")
        self.bindir = bindir
        self.fsync = fsync
        self.port = _free_port()
        self.password = secrets.token_urlsafe(PASSWORD_LENGTH)
        self.user = "postgres"
        self.base = Path(tempfile.mkdtemp(prefix="taskpush-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sock"
        self.log = self.base / "server.log"
        self._run_as: str | None = "postgres" if os.geteuid() == 0 else None
        self._databases = 0

    # ---- process ---------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60.0, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              check=check, user=self._run_as, cwd=self.base,
                              env={**os.environ, **(env or {})})

    def start(self) -> PostgresServer:
        """initdb on first start, then start the server and wait until it accepts."""
        if not self.data.exists():
            self.sockets.mkdir(parents=True, exist_ok=True)
            if self._run_as is not None:
                entry = pwd.getpwnam(self._run_as)
                for path in (self.base, self.sockets):
                    os.chown(path, entry.pw_uid, entry.pw_gid)
            pwfile = self.base / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._run_as is not None:
                os.chown(pwfile, pwd.getpwnam(self._run_as).pw_uid, -1)
            try:
                self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                          "--pwfile", str(pwfile), "--auth-local=trust",
                          "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
                          "--locale=C.UTF-8" if _has_c_utf8() else "--locale=C")
            except subprocess.CalledProcessError as exc:
                raise PostgresUnavailable(f"initdb failed: {exc.stderr.strip()[-500:]}") from None
            finally:
                pwfile.unlink(missing_ok=True)
            self.log.touch()
            if self._run_as is not None:
                os.chown(self.log, pwd.getpwnam(self._run_as).pw_uid, -1)
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1"
                   f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
                   " -c shared_buffers=64MB")
        result = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                           str(self.log), "-o", options, "-w", "-t", "60", "start",
                           check=False, timeout=90)
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"pg_ctl start failed: {result.stderr.strip()[-300:]}\n{self.log_tail()}")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`mode`: smart, fast or immediate, as pg_ctl's -m)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                  "stop", check=False, timeout=60)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---- databases -------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres", timeout: float = 30.0) -> str:
        """Run SQL through psql over the private socket; returns its unaligned output."""
        psql = self.bindir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        result = self._run(str(psql), "-h", str(self.sockets), "-p", str(self.port), "-U",
                           self.user, "-d", database, "-v", "ON_ERROR_STOP=1", "-Atqc",
                           statement, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, prefix: str = "tp") -> str:
        """A new empty database; returns its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = self._run(str(self.bindir / "pg_isready"), "-h", str(self.sockets), "-p",
                               str(self.port), check=False, timeout=10)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"not ready after {timeout:g} s\n{self.log_tail()}")
            time.sleep(0.1)


def _has_c_utf8() -> bool:
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.lower() in ("c.utf8", "c.utf-8") for line in out.splitlines())
