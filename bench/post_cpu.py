"""Server CPU per single-event POST, one request at a time: no load generator, no rate.

    python -m bench.post_cpu [TREE[:FLAGS] | naive ...] [-n 4000] [--rounds 5]

Each server named (a source tree holding run.py, started with the shipped defaults plus
FLAGS; or `naive`, bench/naive.py) is started fresh on CPU 1 with 50 registered tasks;
this process (on CPU 0) sends 500 warm-up events, then N single events
(`POST /api/task/task/{id}/events`) over one keep-alive connection, each awaited before
the next, and reads the server process's CPU time (`proc_cpu_s`) before and after. The
servers are run in turn, round after round, so a busy machine slows them alike; the
minimum and the median per server are printed (CPU µs per event). Copy a commit to
compare with `git archive REV | tar -x -C DIR`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import free_port, proc_cpu_s

ROOT = Path(__file__).resolve().parent.parent
KEY = "k" * 20
SECRET = "s" * 32


def _answer(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes]:
    """(status, body, bytes left over) of one answer with a Content-Length."""
    while (head_end := buf.find(b"\r\n\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        buf += data
    head = buf[:head_end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    end = head_end + 4 + length
    while len(buf) < end:
        buf += sock.recv(65536)
    return head.split(b" ", 2)[1], buf[head_end + 4:end], buf[end:]


def _post(path: str, body: bytes, port: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def run_one(spec: str, n: int, tasks: int) -> float:
    """CPU µs per event of one fresh server."""
    tree, _, flags = spec.partition(":")
    workdir = tempfile.mkdtemp(prefix="post_cpu")
    port = free_port()
    if tree == "naive":
        cmd, cwd = [sys.executable, "-m", "bench.naive"], ROOT
    else:
        cmd, cwd = [sys.executable, "run.py"], Path(tree)
    cmd = ["taskset", "-c", "1", *cmd, "--host", "127.0.0.1", "--port", str(port),
           "--db", os.path.join(workdir, "bench.db"), "--jwt-secret", SECRET,
           "--api-key", KEY, *flags.split()]
    with open(os.path.join(workdir, "server.log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=log)
    try:
        for _ in range(400):
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{spec}: server did not start (see {workdir}/server.log)")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for t in range(tasks):
            body = b'{"task_id":"t%d","user_id":%d,"task_type":"bench"}' % (t, t + 1)
            sock.sendall(_post("/api/task/tasks", body, port))
            status, answer, buf = _answer(sock, buf)
            assert status in (b"200", b"201"), answer
        requests = [_post(f"/api/task/task/t{i % tasks}/events",
                          b'{"status":"progress","progress":%d,"message":"m%d"}' % (i % 100, i),
                          port) for i in range(500 + n)]
        cpu0 = 0.0
        for i, request in enumerate(requests):
            if i == 500:
                cpu0 = proc_cpu_s(proc.pid)
            sock.sendall(request)
            status, answer, buf = _answer(sock, buf)
            assert status == b"200", answer
        cpu1 = proc_cpu_s(proc.pid)
        sock.close()
        return (cpu1 - cpu0) / n * 1e6
    finally:
        proc.terminate()
        proc.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("servers", nargs="*", default=[str(ROOT), "naive"],
                    help="source trees (TREE or TREE:FLAGS) or `naive`")
    ap.add_argument("-n", type=int, default=4000, help="measured events per server run")
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    os.sched_setaffinity(0, {0})
    results: dict[str, list[float]] = {s: [] for s in a.servers}
    for r in range(a.rounds):
        for spec in a.servers:
            results[spec].append(run_one(spec, a.n, a.tasks))
            print(f"round {r} {spec}: {results[spec][-1]:.1f} µs CPU/event", flush=True)
    for spec, values in results.items():
        values.sort()
        print(f"{spec}: min {values[0]:.1f} median {values[len(values) // 2]:.1f} µs CPU/event")


if __name__ == "__main__":
    main()
