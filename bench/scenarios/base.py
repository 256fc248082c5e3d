"""What every scenario shares: the run context, the generator's load and a window's noise."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from bench.common import CLK_TCK, other_cpu, sys_cpu
from bench.launcher import Env

# A generator process above this share of a core may be what limits a step.
GEN_LIMIT = 0.7


@dataclass
class Ctx:
    env: Env
    args: argparse.Namespace


@dataclass
class GenLoad:
    """The load generator's CPU over a measured window, per process, in cores.

    ``procs`` maps a process (``receivers`` = the orchestrator holding the WebSockets,
    ``pub0``... = the publisher processes) to its CPU-s / wall-s. ``total`` is their sum over
    the generator's cores. The window is generator-bound when any process is above
    GEN_LIMIT of a core, or all of them together above GEN_LIMIT of the generator's cores:
    then a failure may be the generator's, not the server's."""

    procs: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    bound: bool = False

    @classmethod
    def of(cls, cpu_s: dict[str, float], wall_s: float, ncpu: int) -> GenLoad:
        wall = max(wall_s, 1e-9)
        procs = {k: round(v / wall, 3) for k, v in cpu_s.items()}
        total = round(sum(cpu_s.values()) / wall / max(ncpu, 1), 3)
        bound = max(procs.values(), default=0.0) > GEN_LIMIT or total > GEN_LIMIT
        return cls(procs, total, bound)

    @property
    def worst(self) -> float:
        return max(self.procs.values(), default=0.0)


@dataclass
class Noise:
    """CPU used during a window by processes that are not ours (the machine is shared):
    on the whole machine, and on the server's cores (busy time of those cores that the
    server did not use; None when the server is not pinned)."""

    other_s: float = 0.0
    steal_s: float = 0.0
    server_core_other_s: float | None = None


def cores_busy_s(cpus: list[int]) -> float:
    """user + nice + system + steal seconds of these CPUs (/proc/stat; interrupts left out:
    the loopback traffic's softirqs are the benchmark's own work)."""
    total = 0
    want = {f"cpu{c}" for c in cpus}
    with open("/proc/stat") as f:
        for line in f:
            name, *v = line.split()
            if name in want:
                total += int(v[0]) + int(v[1]) + int(v[2]) + (int(v[7]) if len(v) > 7 else 0)
    return total / CLK_TCK


class Window:
    """Snapshot of the machine's per-process CPU (and of the server cores' busy time) at
    the start of a measured window."""

    def __init__(self, server_cpus: list[int] | None = None) -> None:
        self.cpus = server_cpus or []
        self.start = sys_cpu()
        self.busy0 = cores_busy_s(self.cpus) if self.cpus else 0.0

    def noise(self, server_cpu_s: float | None = None) -> Noise:
        o = other_cpu(self.start, sys_cpu())
        core = None
        if self.cpus and server_cpu_s is not None:
            core = round(max(0.0, cores_busy_s(self.cpus) - self.busy0 - server_cpu_s), 3)
        return Noise(o["other_s"], o["steal_s"], core)
