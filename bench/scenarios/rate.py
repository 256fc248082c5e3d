"""rate: the highest single-event rate a server sustains with p99 < ``--p99-limit-ms``.

A ramp (``--ramp``, ``--ramp-step-s`` per step) stops at the first rate that fails (p99 over
the limit, or < 99 % delivered). A failing step is rerun once the machine is quiet
(``--ramp-retries``); a step that failed while other processes took more than 0.15 of the
server's core (``noisy``) is rerun even then, at most twice a step and three times a ramp
(once with --quick). Then bisection steps (``--refine-steps``, default 2) refine the limit.
A step where the load generator was near its own limit (see base.GenLoad) is *invalid*: it
says nothing about the server, so the ramp stops there and the max rate is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.launcher import log
from bench.scenarios.base import Ctx
from bench.scenarios.stream import Lane, Step, publish_step, step_line


@dataclass
class RateResult:
    max_rate: float  # highest valid passing step (0 when none passed)
    stopped_at: float | None  # the rate of the first failing or invalid step
    # "fail" (the server), "invalid" (generator-bound), "noisy" (other processes took the
    # machine, every try) or "top" (every step passed)
    stop_reason: str
    steps: list[Step] = field(default_factory=list)

    @property
    def lower_bound(self) -> bool:
        """True when the server's real limit is above max_rate (not measured here)."""
        return self.stop_reason != "fail"

    @property
    def last(self) -> Step | None:
        return self.steps[-1] if self.steps else None


class _Ramp:
    def __init__(self, ln: Lane, noisy_reruns: int) -> None:
        self.ln = ln
        self.steps: list[Step] = []
        self.best = 0.0
        self.stop: float | None = None
        self.reason = "top"
        self.noisy_reruns = noisy_reruns  # a ramp's budget: a busy machine cannot stretch it


async def _attempt(ctx: Ctx, r: _Ramp, rate: float, tag: str = "") -> str:
    """Runs a step (and its retries); returns its verdict: pass, fail or invalid."""
    a = ctx.args
    verdict = "fail"
    tries = 1 + a.ramp_retries
    k = 0
    while k < tries:
        await r.ln.srv.quiesce(3)
        if k:
            await r.ln.srv.wait_quiet(10)
        s = await publish_step(ctx, r.ln, f"r{len(r.steps)}", rate, a.ramp_step_s)
        r.steps.append(s)
        verdict = s.verdict
        log(step_line(r.ln.name, f"ramp{tag}{' retry' if k else ''}", s))
        if verdict in ("pass", "invalid") or not r.ln.srv.alive():
            break
        if verdict == "noisy" and r.noisy_reruns > 0:
            r.noisy_reruns -= 1
            tries = min(max(tries, k + 2), 1 + a.ramp_retries + 2)
        k += 1
    return verdict


async def run(ctx: Ctx, lanes: list[Lane]) -> dict[str, RateResult]:
    a = ctx.args
    ramps = [_Ramp(ln, 1 if a.quick else 3) for ln in lanes]
    active = list(ramps)
    for rate in a.ramp:
        for r in list(active):
            v = await _attempt(ctx, r, rate)
            if v == "pass":
                r.best = rate
            else:
                r.stop, r.reason = rate, v
                active.remove(r)
            if not r.ln.srv.alive() and r in active:
                active.remove(r)
        if not active:
            break
    for _ in range(a.refine_steps if a.refine else 0):
        for r in ramps:
            # Bisection (geometric) between the last pass and the first failure, not past a
            # generator-bound step: that says nothing about the server.
            if not (r.best and r.stop and r.reason in ("fail", "noisy") and r.ln.srv.alive()):
                continue
            mid = round((r.best * r.stop) ** 0.5 / 100) * 100
            if r.best < mid < r.stop:
                v = await _attempt(ctx, r, mid, " (refine)")
                if v == "pass":
                    r.best = mid
                else:
                    r.stop, r.reason = mid, v
    return {r.ln.name: RateResult(r.best, r.stop, r.reason, r.steps) for r in ramps}
