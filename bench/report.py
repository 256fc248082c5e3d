"""The report: every figure of every server side by side, with its ratio to each baseline
measured in the same invocation, the targets as a compact table, and the JSON.

A cell marked ``*`` comes from a window where the load generator was near its own limit
(scenarios/base.GenLoad): it is the generator's figure as much as the server's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.scenarios.base import GenLoad, Noise


@dataclass
class Results:
    """Every scenario's typed result, per server name (absent when not run or failed)."""

    idle: dict[str, Any] = dataclasses.field(default_factory=dict)
    latency: dict[str, Any] = dataclasses.field(default_factory=dict)
    rate: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch: dict[str, Any] = dataclasses.field(default_factory=dict)
    storm: dict[str, Any] = dataclasses.field(default_factory=dict)
    fanout: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per shape
    workload: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    scenario: str
    label: str
    better: str  # higher, lower or info
    value: Callable[[Any], Any]
    gen: Callable[[Any], GenLoad | None] = lambda r: None


def _rate_gen(r) -> GenLoad | None:
    return r.last.gen if r.last is not None else None


ROWS = [
    Row("idle", "KB per idle socket (RSS)", "lower", lambda r: r.rss_per_conn_kb),
    Row("idle", "RSS after closing them all (MB)", "lower", lambda r: r.rss_after_close_mb),
    Row("idle", "server CPU per connect (ms)", "lower", lambda r: r.server_cpu_ms_per_conn),
    Row("latency", "publish->receive p50 (ms)", "lower", lambda r: r.step.latency.p50_ms,
        lambda r: r.step.gen),
    Row("latency", "publish->receive p99 (ms)", "lower", lambda r: r.step.latency.p99_ms,
        lambda r: r.step.gen),
    Row("latency", "HTTP ack p99 (ms)", "lower", lambda r: r.step.ack_p99_ms,
        lambda r: r.step.gen),
    Row("latency", "events per server CPU-s", "higher",
        lambda r: r.step.events_per_server_cpu_s, lambda r: r.step.gen),
    Row("latency", "delivered / sent", "higher", lambda r: r.step.delivered_ratio),
    Row("latency", "generator: busiest process (cores)", "info", lambda r: r.step.gen.worst),
    Row("rate", "max rate with p99 < limit (ev/s)", "higher", lambda r: r.max_rate,
        _rate_gen),
    Row("rate", "ramp stopped by", "info",
        lambda r: f"{r.stop_reason}@{r.stopped_at:.0f}" if r.stopped_at else r.stop_reason),
    Row("rate", "server util at that step", "info",
        lambda r: r.last.server_util if r.last else None),
    Row("rate", "generator: busiest process there", "info",
        lambda r: r.last.gen.worst if r.last else None),
    Row("batch", "events/s acknowledged", "higher", lambda r: r.events_per_s,
        lambda r: r.gen),
    Row("batch", "events/s delivered", "higher", lambda r: r.delivered_per_s,
        lambda r: r.gen),
    Row("batch", "publish->receive p99 (ms)", "lower", lambda r: r.latency.p99_ms,
        lambda r: r.gen),
    Row("batch", "batch ack p99 (ms)", "lower", lambda r: r.ack_p99_ms, lambda r: r.gen),
    Row("batch", "events per server CPU-s", "higher", lambda r: r.events_per_server_cpu_s,
        lambda r: r.gen),
    Row("batch", "generator: busiest process (cores)", "info", lambda r: r.gen.worst),
    Row("storm", "all clients have active_tasks (s)", "lower", lambda r: r.all_ready_s,
        lambda r: r.gen),
    Row("storm", "per-client ready p99 (ms)", "lower", lambda r: r.p99_ms, lambda r: r.gen),
    Row("storm", "server CPU per client (ms)", "lower", lambda r: r.server_cpu_ms_per_client),
    Row("storm", "SYNs dropped (backlog full)", "lower", lambda r: r.syn_drops),
    Row("storm", "clients with every active task", "higher", lambda r: r.ready_ok),
    Row("workload", "delivered updates per server CPU-s", "higher",
        lambda r: r.delivered_per_server_cpu_s, lambda r: r.gen),
    Row("workload", "worker calls per server CPU-s", "higher",
        lambda r: r.calls_per_server_cpu_s, lambda r: r.gen),
    Row("workload", "calls / events sent / delivered", "info",
        lambda r: f"{r.calls}/{r.events_sent}/{r.delivered}"),
    Row("workload", "age of a delivered update p50 (ms)", "lower",
        lambda r: r.latency.p50_ms, lambda r: r.gen),
    Row("workload", "age of a delivered update p99 (ms)", "lower",
        lambda r: r.latency.p99_ms, lambda r: r.gen),
]


def fanout_rows(res: Results) -> list[Row]:
    """The fanout rows, per shape measured (a server's result is a dict shape -> result)."""
    shapes: list[str] = []
    for per in res.fanout.values():
        shapes += [s for s in per if s not in shapes]
    rows = []
    for sh in shapes:
        def get(attr, sh=sh):
            return lambda r: (attr(r[sh]) if sh in r else None)

        def gen(r, sh=sh):
            return r[sh].gen if sh in r else None

        rows += [
            Row("fanout", f"{sh}: deliveries per server CPU-s", "higher",
                get(lambda x: x.deliveries_per_server_cpu_s), gen),
            Row("fanout", f"{sh}: delivered / expected", "higher",
                get(lambda x: x.delivered_ratio)),
            Row("fanout", f"{sh}: publish->receive p99 (ms)", "lower",
                get(lambda x: x.latency.p99_ms), gen),
            Row("fanout", f"{sh}: server util", "info", get(lambda x: x.server_util)),
        ]
    return rows


def ratio(t, b) -> float | None:
    if isinstance(t, int | float) and isinstance(b, int | float) and b and t is not None:
        return round(t / b, 3)
    return None


def compare(res: Results, names: list[str]) -> list[dict]:
    """One dict per row: the value of each server, its generator flag, its ratios to each
    baseline (every name after the first)."""
    rows = []
    for row in [*ROWS, *fanout_rows(res)]:
        per = getattr(res, row.scenario)
        if not per:
            continue
        values, bound = {}, {}
        for n in names:
            r = per.get(n)
            values[n] = row.value(r) if r is not None else None
            g = row.gen(r) if r is not None else None
            bound[n] = bool(g and g.bound)
        t = values[names[0]]
        rows.append({"scenario": row.scenario, "metric": row.label, "better": row.better,
                     "values": values, "generator_bound": bound,
                     "ratios": {b: ratio(t, values[b]) for b in names[1:]}})
    return rows


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render(header: list[str], lines: list[list[str]], right_from: int) -> str:
    w = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(h).ljust(w[i]) for i, h in enumerate(header)),
           "  ".join("-" * x for x in w)]
    for ln in lines:
        out.append("  ".join((str(x).rjust(w[i]) if i >= right_from else str(x).ljust(w[i]))
                             for i, x in enumerate(ln)).rstrip())
    return "\n".join(out)


def table(rows: list[dict], names: list[str]) -> str:
    header = ["scenario", "metric", "better", *names, *(f"/{b}" for b in names[1:])]
    lines = []
    for r in rows:
        cells = [fmt(r["values"][n]) + ("*" if r["generator_bound"][n] else "") for n in names]
        ratios = [fmt(r["ratios"][b]) + ("x" if r["ratios"][b] is not None else "")
                  for b in names[1:]]
        lines.append([r["scenario"], r["metric"], r["better"], *cells, *ratios])
    return render(header, lines, 3)


def targets(res: Results, names: list[str]) -> list[dict]:
    """The targets, judged where a rule exists (the first name is the target; ratios are to
    the relay and to the orjson naive server)."""
    t = names[0]
    relay = "relay" if "relay" in names[1:] else None
    naive = "naive" if "naive" in names[1:] else None
    out = []

    def add(label, per, get, rule, bound=lambda r: False):
        if t not in per:
            return
        v = get(per[t])
        rv = get(per[relay]) if relay in per else None
        nv = get(per[naive]) if naive in per else None
        vr, vn = ratio(v, rv), ratio(v, nv)
        gb = any(bound(per[n]) for n in (t, relay, naive) if n in per)
        met = rule(v, vr, vn)
        out.append({"target": label, "value": v, "vs_relay": vr, "vs_naive": vn,
                    "met": None if met is None else bool(met), "generator_bound": gb})

    def naive_at_least(lo):
        return lambda v, vr, vn: None if vn is None else vn >= lo

    def none(v, vr, vn):
        return None

    add("1. events per server CPU-s at 500/s (>= 1.0x naive)", res.latency,
        lambda r: r.step.events_per_server_cpu_s, naive_at_least(1.0),
        lambda r: r.step.gen.bound)
    add("2. max single-event rate, p99 < 100 ms (>= 1.0x naive)", res.rate,
        lambda r: r.max_rate, naive_at_least(1.0), lambda r: r.stop_reason == "invalid")
    shapes = list(res.fanout.get(t, {}))
    for k, sh in enumerate(shapes):
        add(f"3{'abcdefgh'[k % 8]}. fanout {sh}: deliveries per server CPU-s (>= 1.0x naive)",
            res.fanout, lambda r, sh=sh: r[sh].deliveries_per_server_cpu_s if sh in r else None,
            naive_at_least(1.0), lambda r, sh=sh: sh in r and r[sh].gen.bound)
    add("4. workload: delivered updates per server CPU-s", res.workload,
        lambda r: r.delivered_per_server_cpu_s, none, lambda r: r.gen.bound)
    add("5. batch events/s", res.batch, lambda r: r.events_per_s, none,
        lambda r: r.gen.bound)
    add("6a. p99 at 500/s, ms (no regression)", res.latency, lambda r: r.step.latency.p99_ms,
        none, lambda r: r.step.gen.bound)
    add("6b. KB per idle socket (no regression)", res.idle, lambda r: r.rss_per_conn_kb, none)
    add("6c. storm: all clients ready, s (no regression)", res.storm, lambda r: r.all_ready_s,
        none)
    return out


def targets_table(rows: list[dict]) -> str:
    lines = [[r["target"], fmt(r["value"]) + ("*" if r["generator_bound"] else ""),
              fmt(r["vs_relay"]) + ("x" if r["vs_relay"] is not None else ""),
              fmt(r["vs_naive"]) + ("x" if r["vs_naive"] is not None else ""),
              {True: "met", False: "NOT met", None: "see doc"}[r["met"]]] for r in rows]
    return render(["target", "value", "vs relay", "vs naive", "met?"], lines, 1)


def ramp_table(res: Results, names: list[str]) -> str:
    """Every ramp step of every server: the evidence behind the max rates."""
    lines = []
    for n in names:
        r = res.rate.get(n)
        for s in (r.steps if r else ()):
            lines.append([n, f"{s.rate:.0f}", fmt(s.latency.p99_ms), f"{s.delivered_ratio}",
                          fmt(s.server_util), fmt(s.gen.worst), fmt(s.gen.total),
                          fmt(round((s.noise.server_core_other_s or 0) / s.wall_s, 2)),
                          s.verdict + (f" ({'; '.join(s.fail_reasons)})"
                                       if s.fail_reasons else "")])
    return render(["server", "rate", "p99 ms", "delivered", "server util", "gen busiest",
                   "gen total", "others on server core", "verdict"], lines, 1)


def background(res: Results) -> dict[str, float]:
    """Cores used by other processes during the timed windows (latency, ramp, batch), on the
    whole machine and on the server's core: average and worst window."""
    windows = []
    for per in (res.latency, res.batch):
        for r in per.values():
            step = getattr(r, "step", r)
            windows.append((step.noise, step.wall_s))
    for r in res.rate.values():
        windows += [(s.noise, s.wall_s) for s in r.steps]
    wall = sum(w for _, w in windows) or 1e-9

    def core(n: Noise) -> float:
        return n.server_core_other_s or 0.0

    return {"avg": round(sum(n.other_s for n, _ in windows) / wall, 2),
            "worst": round(max((n.other_s / w for n, w in windows), default=0.0), 2),
            "server_core_avg": round(sum(core(n) for n, _ in windows) / wall, 2),
            "server_core_worst": round(max((core(n) / w for n, w in windows), default=0.0),
                                       2)}


def to_json(res: Results) -> dict:
    def conv(x):
        if dataclasses.is_dataclass(x):
            d = {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            for name in ("delivered_ratio", "noisy", "verdict", "lower_bound", "worst"):
                if isinstance(getattr(type(x), name, None), property):
                    d[name] = getattr(x, name)
            return d
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x

    return {f.name: conv(getattr(res, f.name)) for f in dataclasses.fields(res)}
