"""What every scenario shares: the run context, the generator's load and a window's noise."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from bench.common import other_cpu, sys_cpu
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
    """CPU used during a window by processes that are not ours (the machine is shared)."""

    other_s: float = 0.0
    steal_s: float = 0.0


class Window:
    """Snapshot of the machine's per-process CPU at the start of a measured window."""

    def __init__(self) -> None:
        self.start = sys_cpu()

    def noise(self) -> Noise:
        o = other_cpu(self.start, sys_cpu())
        return Noise(o["other_s"], o["steal_s"])
