"""Small helpers shared by the benchmark orchestrator, the publisher and the relay."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import resource
import socket
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def install_uvloop() -> bool:
    """Use uvloop for this process when it is installed (Python 3.11: policy based)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def set_affinity(cpus) -> bool:
    if not cpus:
        return False
    try:
        os.sched_setaffinity(0, set(cpus))
        return True
    except (AttributeError, OSError):
        return False


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of a process, all its threads. utime + stime from /proc/<pid>/stat count
    in clock ticks (10 ms): a short window with little work (a relay in a one-second test
    run) can read as zero. The scheduler's nanosecond run times of the live threads
    (/proc/<pid>/task/*/schedstat) do not round; the larger of the two is taken, so time
    of threads that ended (in utime + stime only) is not lost either."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15.
    ticks = (int(rest[11]) + int(rest[12])) / CLK_TCK
    run_ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            # a thread that ended meanwhile is passed over
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns += int(f.read().split()[0])
    except OSError:  # no schedstat on this kernel
        return ticks
    return max(ticks, run_ns / 1e9)


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_token(secret: str, user_id: int, ttl: int = 3600, admin: bool = False) -> str:
    import jwt

    claims = {"sub": str(user_id), "exp": int(time.time()) + ttl}
    if admin:
        claims["role"] = "admin"
    return jwt.encode(claims, secret, algorithm="HS256")


def pct(sorted_vals, p: float):
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    n = len(sorted_vals)
    if not n:
        return None
    k = max(0, min(n - 1, math.ceil(p / 100.0 * n) - 1))
    return sorted_vals[k]


def ns_to_ms(v):
    return None if v is None else round(v / 1e6, 3)


def machine_info() -> dict:
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for mod in ("aiohttp", "aiosqlite", "orjson", "jwt", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1048576, 1) if mem_kb else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_at_start": load,
        "versions": versions,
        "nofile_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def listen_overflows() -> dict:
    """TcpExt ListenOverflows/ListenDrops of this network namespace (SYN/accept-queue drops)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            d = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(d.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def sys_cpu() -> dict:
    """A snapshot for other_cpu(): CPU seconds of every process on the machine keyed by pid,
    with parent pids, and the hypervisor's steal time. Processes that start and end inside a
    window are missed, so this undercounts background load a little.

    Per-process times are used rather than /proc/stat's totals: those are sampled at timer
    ticks and miss event-loop processes that wake on a tick and sleep again before the next."""
    procs: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2 :].split()
        # rest[1] = ppid (field 4); fields 14-15 = utime, stime. Reaped children's times
        # (cutime, cstime) are left out: they may have been spent before the window.
        procs[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK)
    try:
        with open("/proc/stat") as f:
            v = f.readline().split()[1:]
        steal = int(v[7]) / CLK_TCK if len(v) > 7 else 0.0
    except OSError:
        steal = 0.0
    return {"procs": procs, "steal": steal}


def other_cpu(before: dict, after: dict, ours_s: float | None = None) -> dict[str, float]:
    """CPU used during a window by processes outside this benchmark's process tree (this
    process and its descendants: servers, publishers). A large 'other_s' means something
    else ran (the machine is shared) and the window is noisy. ours_s is accepted for
    symmetry and unused."""
    me = os.getpid()
    procs = after["procs"]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    ours = set()
    stack = [me]
    while stack:
        pid = stack.pop()
        if pid in ours:
            continue
        ours.add(pid)
        stack.extend(children.get(pid, ()))
    other = 0.0
    old = before["procs"]
    for pid, (_, cpu) in procs.items():
        if pid in ours:
            continue
        prev = old.get(pid)
        other += cpu if prev is None else max(0.0, cpu - prev[1])
    return {"other_s": round(other, 3), "steal_s": round(after["steal"] - before["steal"], 3)}
