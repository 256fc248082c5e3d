"""`python -m bench --cluster`: taskpush on PostgreSQL, one node and two, next to a SQLite
node measured in the same run.

Three systems, all up at once and driven alternately step by step (bench/scenarios/stream.py):

  sqlite  one node on a SQLite file: the reference every ratio is taken to
  pg1     one node on PostgreSQL: producers and sockets on that node
  pg2     two nodes on one PostgreSQL database: producers post to node A and every socket
          is on node B, so each event crosses nodes (commit, NOTIFY, B's feed read)

Each PostgreSQL system has a server of its own (tests/pg.py's PostgresServer, fsync on, so a
commit waits for the disk as in production), pinned with the nodes to the server CPUs.
"server CPU" is every process of the system: its nodes and all its PostgreSQL processes
(the postmaster, each backend, the WAL writer, ...; backends that exited are counted through
the postmaster's children's time).

Scenarios (the modules of bench/scenarios/, unchanged): latency (publish-to-receive p50/p99
at --rate, and events per server CPU-second), rate (the ramp: max rate with p99 under the
limit), storm (every client connecting at once, spread over the system's nodes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import profile, report
from bench.common import CLK_TCK, free_port, machine_info, raise_nofile, set_affinity
from bench.launcher import REPO, Env, Server, log
from bench.scenarios import latency, rate, storm, stream
from bench.scenarios.base import GEN_LIMIT, Ctx

SYSTEMS = ("sqlite", "pg1", "pg2")
SCENARIOS = ("latency", "rate", "storm")
URL_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@")


def redact(text: str) -> str:
    return URL_PASSWORD.sub(r"\1***@", text)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


class PgProcesses:
    """The processes of one PostgreSQL server: their CPU time, and pinning."""

    def __init__(self, pg: Any) -> None:
        self.pg = pg
        self.pid = int(Path(pg.data, "postmaster.pid").read_text().split()[0])

    def children(self) -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = _stat(int(entry))
                if st is not None and int(st[1]) == self.pid:
                    out.append(int(entry))
        return out

    def cpu(self) -> float:
        """The postmaster, its children that exited (cutime + cstime) and those alive."""
        st = _stat(self.pid)
        if st is None:
            return 0.0
        ticks = sum(int(x) for x in st[11:15])
        for pid in self.children():
            child = _stat(pid)
            if child is not None:
                ticks += int(child[11]) + int(child[12])
        return ticks / CLK_TCK

    def pin(self, cpus: list[int]) -> None:
        """The postmaster and its children; backends forked later inherit it."""
        if not cpus:
            return
        for pid in (self.pid, *self.children()):
            with contextlib.suppress(OSError):  # gone meanwhile
                os.sched_setaffinity(pid, set(cpus))


class System:
    """What the scenarios drive, with Server's interface: producers post to `base` (the
    first node), sockets open on `ws_base` (the last node), a storm spreads over
    `ws_bases`, and `cpu()` counts every process of the system."""

    def __init__(self, name: str, env: Env, nodes: list[Server],
                 pg: PgProcesses | None) -> None:
        self.name = name
        self.env = env
        self.nodes = nodes
        self.pg = pg
        self.base = nodes[0].base
        self.ws_base = nodes[-1].base
        self.ws_bases = [n.base for n in nodes]

    def cpu(self) -> float:
        return sum(n.cpu() for n in self.nodes) + (self.pg.cpu() if self.pg else 0.0)

    def cpu_parts(self) -> dict[str, float]:
        """CPU seconds so far of each node and of PostgreSQL (where the time goes)."""
        parts = {f"node{k}": n.cpu() for k, n in enumerate(self.nodes)}
        if self.pg is not None:
            parts["postgresql"] = self.pg.cpu()
        return parts

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def rss_kb(self) -> int:
        return sum(n.rss_kb() for n in self.nodes)

    def log_tail(self, n: int = 4000) -> str:
        return "\n".join(node.log_tail(n // len(self.nodes)) for node in self.nodes)

    quiesce = Server.quiesce
    wait_quiet = Server.wait_quiet


@dataclass
class ClusterResults:
    latency: dict[str, Any]
    rate: dict[str, Any]
    storm: dict[str, Any]


ROWS = [r for r in report.ROWS if r.scenario in SCENARIOS and r.better != "info"
        and "SYN" not in r.label]


def compare(res: ClusterResults, names: list[str]) -> list[dict]:
    """Each figure of each system, and its ratio to the SQLite node's."""
    rows = []
    for row in ROWS:
        per = getattr(res, row.scenario)
        if not per:
            continue
        values = {n: (row.value(per[n]) if n in per else None) for n in names}
        bound = {n: bool(n in per and (g := row.gen(per[n])) and g.bound) for n in names}
        rows.append({"scenario": row.scenario, "metric": row.label, "better": row.better,
                     "values": values, "generator_bound": bound,
                     "ratios": {n: report.ratio(values[n], values["sqlite"])
                                for n in names if n != "sqlite"}})
    return rows


def table(rows: list[dict], names: list[str]) -> str:
    others = [n for n in names if n != "sqlite"]
    header = ["scenario", "metric", "better", *names, *(f"{n}/sqlite" for n in others)]
    lines = []
    for r in rows:
        cells = [report.fmt(r["values"][n]) + ("*" if r["generator_bound"][n] else "")
                 for n in names]
        ratios = [report.fmt(r["ratios"][n]) + ("x" if r["ratios"][n] is not None else "")
                  for n in others]
        lines.append([r["scenario"], r["metric"], r["better"], *cells, *ratios])
    return report.render(header, lines, 3)


def summary(res: ClusterResults) -> list[dict]:
    """The cluster figures (max rate, cross-node latency, CPU, storm), with the ratio to the
    SQLite node."""
    out = []

    def add(label: str, per: dict, get, system: str = "pg2") -> None:
        if system in per and "sqlite" in per:
            v, ref = get(per[system]), get(per["sqlite"])
            out.append({"figure": label, "value": v, "sqlite": ref,
                        "ratio": report.ratio(v, ref)})

    for system, nodes in (("pg1", "1 node"), ("pg2", "2 nodes")):
        add(f"max rate, p99 < 100 ms (ev/s), {nodes}", res.rate, lambda r: r.max_rate, system)
    add("cross-node publish->receive p50 at the fixed rate (ms)", res.latency,
        lambda r: r.step.latency.p50_ms)
    add("cross-node publish->receive p99 at the fixed rate (ms; target <= 10)", res.latency,
        lambda r: r.step.latency.p99_ms)
    for system, nodes in (("pg1", "1 node"), ("pg2", "2 nodes")):
        add(f"events per server CPU-s, {nodes} + PostgreSQL", res.latency,
            lambda r: r.step.events_per_server_cpu_s, system)
    add("reconnect storm onto 2 nodes: all ready (s)", res.storm, lambda r: r.all_ready_s)
    add("reconnect storm onto 2 nodes: server CPU per client (ms)", res.storm,
        lambda r: r.server_cpu_ms_per_client)
    return out


def summary_table(rows: list[dict]) -> str:
    lines = [[r["figure"], report.fmt(r["value"]), report.fmt(r["sqlite"]),
              report.fmt(r["ratio"]) + ("x" if r["ratio"] is not None else "")] for r in rows]
    return report.render(["figure", "PostgreSQL", "SQLite node", "ratio"], lines, 1)


def to_json(res: ClusterResults) -> dict:
    return report.to_json(report.Results(latency=res.latency, rate=res.rate, storm=res.storm))


PG_COUNTERS = """
SELECT 'table ' || relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables
UNION ALL
SELECT 'database', xact_commit, tup_inserted, tup_updated, blks_hit + blks_read
  FROM pg_stat_database WHERE datname = current_database()
"""


async def pg_counters(url: str) -> dict[str, list[int]]:
    """PostgreSQL's cumulative row counters of the database (rows inserted, updated, of
    which HOT, deleted per table; commits, tuples and blocks touched); two readings'
    difference divided by the events in between is the rows each event costs. The counters
    of a backend reach the views when it flushes them (within a second of a commit)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return {r[0]: list(r[1:]) for r in await conn.fetch(PG_COUNTERS)}
    finally:
        await conn.close()


def per_event(before: dict[str, list[int]], after: dict[str, list[int]], events: int
              ) -> dict[str, list[float]]:
    """Each counter's growth per event (events: rows inserted into `events` meanwhile)."""
    return {k: [round((a - b) / max(events, 1), 3) for a, b in zip(after[k], before.get(
        k, [0] * len(after[k])), strict=True)] for k in after}


async def start_postgres(env: Env) -> tuple[Any, PgProcesses]:
    from tests.pg import PostgresServer

    pg = await asyncio.to_thread(lambda: PostgresServer(fsync=True).start())
    procs = PgProcesses(pg)
    procs.pin(env.server_cpus)
    return pg, procs


async def amain(args: argparse.Namespace) -> int:
    which = {s.strip() for s in args.scenarios.split(",") if s.strip()} & set(SCENARIOS)
    if not which:
        which = set(SCENARIOS)
    env = Env.pinned(tempfile.mkdtemp(prefix="taskpush-bench-cluster-", dir=args.tmpdir),
                     args.server_cpus, args.loadgen_cpus,
                     taskpush_dir=os.path.abspath(args.taskpush_dir),
                     taskpush_args=list(args.taskpush_arg))
    ctx = Ctx(env, args)
    raise_nofile()
    set_affinity(env.loadgen_cpus)
    log(f"cluster bench: servers and PostgreSQL pinned to CPUs {env.server_cpus or 'any'}, "
        f"load generator to {env.loadgen_cpus or 'any'}; tmp {env.tmp}")
    res = ClusterResults({}, {}, {})
    breakdown: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    commands: dict[str, list[list[str]]] = {}
    pgs: list[Any] = []
    urls: dict[str, str] = {}
    rows_per_event: dict[str, Any] = {}
    profiled: dict[str, Any] = {}
    up: list[Server] = []
    started = time.monotonic()
    try:
        systems: list[System] = []
        sqlite_node = Server("taskpush", env, "sqlite", free_port())
        await sqlite_node.start()
        up.append(sqlite_node)
        systems.append(System("sqlite", env, [sqlite_node], None))
        for name, count in (("pg1", 1), ("pg2", 2)):
            pg, procs = await start_postgres(env)
            pgs.append(pg)
            url = await asyncio.to_thread(pg.create_database, "bench")
            urls[name] = url
            nodes = []
            for k in range(count):
                node = Server("taskpush", env, f"{name}-{k}", free_port(), db=url)
                await node.start()  # one after the other: the first creates the schema
                up.append(node)
                nodes.append(node)
            systems.append(System(name, env, nodes, procs))
        for system in systems:
            commands[system.name] = [[redact(c) for c in n.command()] for n in system.nodes]

        if which & {"latency", "rate"}:
            log("== stream (latency, rate) on " + ", ".join(s.name for s in systems))
            lanes = [stream.Lane(s.name, s) for s in systems]  # type: ignore[arg-type]
            try:
                await stream.setup(ctx, lanes)
                if "latency" in which:
                    before = {s.name: s.cpu_parts() for s in systems}
                    counted = {n: await pg_counters(u) for n, u in urls.items()}
                    prof = None
                    if args.profile:  # the one-node PostgreSQL system's node
                        prof = await profile.start(systems[1].nodes[0],
                                                   os.path.abspath(args.profile))
                    try:
                        res.latency.update(await latency.run(ctx, lanes))
                    finally:
                        if prof is not None:
                            profiled["pg1 latency"] = await profile.stop(prof, args.profile)
                    await asyncio.sleep(1.5)  # the nodes' backends flush their counters
                    for n, u in urls.items():
                        after = await pg_counters(u)
                        events = (after["table events"][0]
                                  - counted[n].get("table events", [0])[0])
                        rows_per_event[n] = {
                            "events": events,
                            "table_columns": ["ins", "upd", "hot_upd", "del"],
                            "database_columns": ["commits", "tup_ins", "tup_upd", "blocks"],
                            "per_event": per_event(counted[n], after, events)}
                    for system in systems:
                        now = system.cpu_parts()
                        breakdown[system.name] = {
                            k: round(now[k] - v, 2) for k, v in before[system.name].items()}
                    log(f"  CPU-s per process over the latency phase: {breakdown}")
                if "rate" in which:
                    res.rate.update(await rate.run(ctx, lanes))
                for ln in lanes:
                    if ln.stats.seq_regressions or ln.stats.other_msgs:
                        errors.append(f"{ln.name}: {ln.stats.seq_regressions} seq regressions, "
                                      f"other messages {dict(ln.stats.other_msgs)}")
            finally:
                await stream.teardown(lanes)
        if "storm" in which:
            for system in systems:
                log(f"== storm on {system.name} ({len(system.nodes)} node(s))")
                res.storm[system.name] = await storm.run(ctx, system)  # type: ignore[arg-type]
        for system in systems:
            if not system.alive():
                errors.append(f"{system.name}: a node died:\n{system.log_tail(1500)}")
    except Exception as exc:  # reported, and the run fails
        errors.append(f"{type(exc).__name__}: {redact(str(exc))}")
        log(f"!! cluster bench failed: {redact(str(exc))}\n{redact(traceback.format_exc())}")
    finally:
        for srv in up:
            await srv.stop()
        for pg in pgs:
            await asyncio.to_thread(pg.cleanup)
        if not args.keep_tmp:
            shutil.rmtree(env.tmp, ignore_errors=True)
    names = list(SYSTEMS)
    rows = compare(res, names)
    figures = summary(res)
    out = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        "pinning": {"server_cpus": env.server_cpus, "loadgen_cpus": env.loadgen_cpus,
                    "publisher_processes": args.pub_procs, "generator_limit": GEN_LIMIT},
        "systems": {"sqlite": "1 node, SQLite", "pg1": "1 node, PostgreSQL",
                    "pg2": "2 nodes, one PostgreSQL; producers on node A, sockets on node B"},
        "servers": names,
        "commands": commands,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "comparison": rows,
        "figures": figures,
        "latency_phase_cpu_s": breakdown,
        "pg_rows_per_event": rows_per_event,
        "profile": profiled,
        "results": to_json(res),
        "errors": errors,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    ncpu = os.cpu_count() or 1
    print(f"\ncluster bench: every node and both PostgreSQL servers pinned to CPUs "
          f"{env.server_cpus or 'any'}, the load generator to {env.loadgen_cpus or 'any'} "
          f"({ncpu} CPUs); run took {out['elapsed_s']} s. pgX/sqlite = ratio to the SQLite "
          f"node; * = load generator above {GEN_LIMIT} of a core in that window")
    if ncpu <= 2:
        print("note: with 2 CPUs, the two nodes and PostgreSQL share ONE core: the 2-node "
              "figures are the cost of crossing nodes, not the gain of a second host")
    print(table(rows, names))
    for name, got in rows_per_event.items():
        print(f"\n{name}: PostgreSQL rows per event over the latency phase "
              f"({got['events']} events; table: inserted, updated, of which HOT, deleted; "
              "database: commits, tuples inserted, updated, blocks touched)")
        for k, v in got["per_event"].items():
            if any(v):
                print(f"  {k}: {' / '.join(f'{x:g}' for x in v)}")
    if res.rate:
        print("\nramp steps")
        print(report.ramp_table(report.Results(rate=res.rate), names))
    if breakdown:
        print("\nCPU seconds per process over the latency phase (all tries, idle time "
              "included): " + "; ".join(f"{k}: " + ", ".join(f"{p} {v}" for p, v in parts.items())
                                        for k, parts in breakdown.items()))
    if figures:
        print("\nsummary (cluster)")
        print(summary_table(figures))
    if errors:
        print("\nerrors:")
        for e in errors:
            print(" ", e[:2000])
    print(f"\nraw results: {args.out}")
    return 1 if errors else 0


def default_out(out: str) -> str:
    """bench/results.json holds the main run; a cluster run goes beside it."""
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")
    return os.path.join(REPO, "bench", "results-cluster.json") if out == base else out
