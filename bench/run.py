"""taskpush benchmark: every figure next to two baselines measured in the same run.

    python -m bench            # full run (about 8 minutes, more on a busy machine)
    python -m bench --quick    # about 3 minutes
    python -m bench --target relay --baseline relay   # self-check without taskpush
    python -m bench --cluster  # PostgreSQL, 1 and 2 nodes, next to a SQLite node

The baselines are bench/relay.py (no database) and bench/naive.py (aiohttp + aiosqlite +
orjson, one commit per event; ``naive-json`` is its stdlib-json first draft). See
bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson

from bench import profile, report
from bench.common import free_port, install_uvloop, machine_info, raise_nofile, set_affinity
from bench.launcher import BENCH_DIR, KINDS, REPO, Env, Server, log
from bench.scenarios import (
    SCENARIOS,
    batch,
    fanout,
    idle,
    latency,
    rate,
    storm,
    stream,
    workload,
)
from bench.scenarios.base import GEN_LIMIT, Ctx


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, about 3 minutes")
    ap.add_argument("--cluster", action="store_true",
                    help="cluster mode (bench/cluster.py): taskpush on PostgreSQL with 1 and 2 "
                    "nodes (producers on one node, sockets on the other) next to a SQLite node; "
                    "scenarios latency, rate, storm; needs PostgreSQL (tests/pg.py)")
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results.json"))
    ap.add_argument("--target", default="taskpush",
                    help="the server measured: taskpush, relay, naive or naive-json "
                    "(see --baseline)")
    ap.add_argument("--baseline", default="relay,naive",
                    help="comma list of baselines: relay, naive (orjson), naive-json (the "
                    "stdlib-json first draft), taskpush, or taskpush:FLAGS for an A/B run of "
                    "run.py flags, e.g. 'taskpush:--access-log=false'")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma list of " + ",".join(SCENARIOS) + " (throughput = latency,rate)")
    ap.add_argument("--taskpush-dir", default=REPO, help="directory holding run.py")
    ap.add_argument("--taskpush-arg", action="append", default=[],
                    help="extra argument for run.py (repeatable, use --taskpush-arg=--flag=v)")
    ap.add_argument("--relay-no-uvloop", action="store_true")
    ap.add_argument("--no-uvloop", action="store_true", help="load generator without uvloop")
    ap.add_argument("--idle", type=int, help="idle connections (default 2000, quick 500)")
    ap.add_argument("--users", type=int, help="stream users (default 1000, quick 500)")
    ap.add_argument("--rate", type=float, default=500.0, help="latency scenario rate/s")
    ap.add_argument("--duration", type=float, help="latency scenario seconds (10, quick 3)")
    ap.add_argument("--ramp", help="comma list of rates (default 500,1000,2000,3000,4000,6000,"
                    "8000,12000,16000; quick 1000,2000,4000,8000,16000)")
    ap.add_argument("--ramp-step-s", type=float, help="seconds per ramp step (3, quick 1.5)")
    ap.add_argument("--no-refine", dest="refine", action="store_false",
                    help="skip the bisection steps after the first failing ramp rate")
    ap.add_argument("--refine-steps", type=int, default=2,
                    help="bisection steps between the last passing and first failing rate")
    ap.add_argument("--ramp-retries", type=int, help="reruns of a failing step (1, quick 0)")
    ap.add_argument("--p99-limit-ms", type=float, default=100.0)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--batch-concurrency", type=int, default=2,
                    help="batch posters in all (spread over the publisher processes)")
    ap.add_argument("--batch-s", type=float, help="batch scenario seconds (5, quick 2)")
    ap.add_argument("--batch-max", type=int, default=2000, help="max batches per run")
    ap.add_argument("--storm-clients", type=int, help="default 2000, quick 300")
    ap.add_argument("--storm-tasks", type=int, default=5)
    ap.add_argument("--storm-concurrency", type=int, default=0, help="0 = all at once")
    ap.add_argument("--storm-timeout", type=float, default=60.0)
    ap.add_argument("--fanout", help="fanout shapes USERSxSOCKETS@RATE, comma separated "
                    "(default 50x20@300,10x200@60; quick 10x5@100)")
    ap.add_argument("--fanout-admins", type=int, default=2,
                    help="admin sockets subscribed to every task (each update goes to them too)")
    ap.add_argument("--fanout-s", type=float, help="seconds per fanout shape (5, quick 2)")
    ap.add_argument("--workers", type=int, help="workload: workers reporting through "
                    "taskpush-client (default 32, quick 8)")
    ap.add_argument("--workload-rate", type=float, default=10.0,
                    help="workload: progress calls per second per worker")
    ap.add_argument("--workload-task-s", type=float, default=3.0,
                    help="workload: seconds of progress per task")
    ap.add_argument("--workload-s", type=float, help="workload seconds (10, quick 4)")
    ap.add_argument("--pub-conns", type=int, default=16,
                    help="keep-alive connections per publisher process")
    ap.add_argument("--pub-procs", type=int, default=2, help="publisher processes")
    ap.add_argument("--connect-concurrency", type=int, default=100,
                    help="handshakes in flight while setting up (storm: --storm-concurrency)")
    ap.add_argument("--server-cpus", help="CPU list for servers (default: the first CPU)")
    ap.add_argument("--loadgen-cpus", help="CPU list for the load generator (default: the rest)")
    ap.add_argument("--profile", metavar="PATH",
                    help="sample the target server with py-spy during the stream scenarios "
                    "(after setup) and write collapsed stacks to PATH (and to "
                    "PATH.fanout-SHAPE while each fanout shape is measured)")
    ap.add_argument("--tmpdir", default=None, help="where databases and logs go")
    ap.add_argument("--keep-tmp", action="store_true")
    return ap


def apply_defaults(a: argparse.Namespace) -> None:
    q = a.quick
    dflt = {
        "idle": 500 if q else 2000,
        "users": 500 if q else 1000,
        "duration": 3.0 if q else 10.0,
        "ramp": ("1000,2000,4000,8000,16000" if q
                 else "500,1000,2000,3000,4000,6000,8000,12000,16000"),
        "ramp_step_s": 1.5 if q else 3.0,
        "batch_s": 2.0 if q else 5.0,
        "storm_clients": 300 if q else 2000,
        "ramp_retries": 0 if q else 1,
        "fanout": "10x5@100" if q else "50x20@300,10x200@60",
        "fanout_s": 2.0 if q else 5.0,
        "workers": 8 if q else 32,
        "workload_s": 4.0 if q else 10.0,
    }
    for k, v in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.ramp = [float(x) for x in str(a.ramp).split(",") if x]
    a.fanout_shapes = [fanout.Shape.parse(x) for x in str(a.fanout).split(",") if x.strip()]
    a.settle_s = 0.5 if q else 1.0
    a.drain_s = 1.0 if q else 2.0
    if q:
        a.refine = False


def names_of(target: str, baselines: list[str]) -> list[tuple[str, str]]:
    """(name, spec) of every server, the target first; a spec used twice gets a suffix.

    A spec is a kind (taskpush, relay, naive), or ``taskpush:FLAGS`` (run.py flags, space
    separated, added to --taskpush-arg's) to compare settings of taskpush in one run."""
    out, seen = [], {}
    for spec in [target, *baselines]:
        if spec.split(":", 1)[0] not in KINDS or (":" in spec and not
                                                  spec.startswith("taskpush:")):
            raise SystemExit(f"unknown server {spec!r}: use one of {', '.join(KINDS)} or "
                             "taskpush:FLAGS")
        seen[spec] = seen.get(spec, 0) + 1
        out.append((spec if seen[spec] == 1 else f"{spec}#{seen[spec]}", spec))
    return out


async def amain(args: argparse.Namespace) -> int:
    which = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if "throughput" in which:
        which = (which - {"throughput"}) | {"latency", "rate"}
    if bad := which - set(SCENARIOS):
        raise SystemExit(f"unknown scenarios: {bad}")
    baselines = [b.strip() for b in args.baseline.split(",") if b.strip()]
    servers = names_of(args.target, baselines)
    names = [n for n, _ in servers]
    env = Env.pinned(tempfile.mkdtemp(prefix="taskpush-bench-", dir=args.tmpdir),
                     args.server_cpus, args.loadgen_cpus,
                     taskpush_dir=os.path.abspath(args.taskpush_dir),
                     taskpush_args=list(args.taskpush_arg),
                     relay_uvloop=not args.relay_no_uvloop)
    if any(k.startswith("taskpush") for _, k in servers):
        h = subprocess.run([sys.executable, "run.py", "--help"], cwd=env.taskpush_dir,
                           capture_output=True, text=True, timeout=60)
        if h.returncode != 0:
            raise SystemExit(f"python run.py --help failed in {env.taskpush_dir}:\n"
                             f"{h.stderr[-2000:]}")
    ctx = Ctx(env, args)
    nofile = raise_nofile()
    set_affinity(env.loadgen_cpus)
    fan = max((s.users * s.sockets for s in args.fanout_shapes), default=0)
    need = max(args.idle, args.storm_clients, args.users, fan) * len(servers) + 200
    if nofile[0] < need:
        log(f"warning: RLIMIT_NOFILE {nofile[0]} < {need}: connections may fail")
    log(f"servers pinned to CPUs {env.server_cpus or 'any'}, load generator to "
        f"{env.loadgen_cpus or 'any'}; {args.pub_procs} publisher processes; tmp {env.tmp}")
    res = report.Results()
    errors: list[str] = []
    commands: dict[str, list[str]] = {}
    profiled: dict[str, dict | None] = {}
    started = time.monotonic()

    async def with_servers(label: str, group: list[tuple[str, str]], body) -> None:
        up: dict[str, Server] = {}
        try:
            for name, kind in group:
                base, _, flags = kind.partition(":")
                up[name] = srv = Server(base, env, label, free_port(), flags.split())
                commands[name] = srv.command()
                await srv.start()
            await body(up)
            for name, srv in up.items():
                if not srv.alive():
                    errors.append(f"{name} {label}: server died:\n{srv.log_tail(1500)}")
        except Exception as e:
            errors.append(f"{label} on {list(up)}: {type(e).__name__}: {e}")
            log(f"!! {label} failed: {e}\n{traceback.format_exc()}")
        finally:
            for srv in up.values():
                await srv.stop()

    try:
        if "idle" in which:
            for name, kind in servers:
                log(f"== idle on {name}")

                async def body(up, name=name):
                    res.idle[name] = await idle.run(ctx, up[name])
                    r = res.idle[name]
                    log(f"  {name}: {r.connected_ok}/{r.connections} open, "
                        f"{r.rss_per_conn_kb} KB per socket")

                await with_servers("idle", [(name, kind)], body)
        if which & {"latency", "rate", "batch"}:
            log("== stream (latency, rate, batch) on " + ", ".join(names))

            async def body(up):
                lanes = [stream.Lane(n, s) for n, s in up.items()]
                prof = None
                try:
                    await stream.setup(ctx, lanes)
                    if args.profile:
                        prof = await profile.start(up[names[0]], os.path.abspath(args.profile))
                    if "latency" in which:
                        res.latency.update(await latency.run(ctx, lanes))
                    if "rate" in which:
                        res.rate.update(await rate.run(ctx, lanes))
                    if "batch" in which:
                        res.batch.update(await batch.run(ctx, lanes))
                    for ln in lanes:
                        if ln.stats.seq_regressions or ln.stats.other_msgs:
                            errors.append(f"{ln.name}: {ln.stats.seq_regressions} seq "
                                          f"regressions, other messages "
                                          f"{dict(ln.stats.other_msgs)}")
                    if prof is not None:
                        profiled["stream"] = await profile.stop(prof, args.profile)
                        prof = None
                finally:
                    if prof is not None:
                        await profile.stop(prof, args.profile)
                    await stream.teardown(lanes)

            await with_servers("stream", servers, body)
        if "storm" in which:
            for name, kind in servers:
                log(f"== storm on {name}")

                async def body(up, name=name):
                    res.storm[name] = await storm.run(ctx, up[name])

                await with_servers("storm", [(name, kind)], body)
        if "fanout" in which:
            for shape in args.fanout_shapes:
                log(f"== fanout {shape.label} on " + ", ".join(names))

                async def body(up, shape=shape):
                    for name, r in (await fanout.run(ctx, up, shape, profiled)).items():
                        res.fanout.setdefault(name, {})[shape.label] = r

                await with_servers("fanout", fanout.servers_for(servers, shape), body)
        if "workload" in which:
            log("== workload on " + ", ".join(names))

            async def body(up):
                res.workload.update(await workload.run(ctx, up))

            await with_servers("workload", servers, body)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(env.tmp, ignore_errors=True)
    rows = report.compare(res, names)
    bg = report.background(res)
    goals = report.targets(res, names)
    out = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        "pinning": {"server_cpus": env.server_cpus, "loadgen_cpus": env.loadgen_cpus,
                    "publisher_processes": args.pub_procs, "generator_limit": GEN_LIMIT},
        "servers": names,
        "commands": commands,
        "config": vars(args),
        "comparison": rows,
        "targets": goals,
        "results": report.to_json(res),
        "background_cores": bg,
        "profile": profiled,
        "errors": errors,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"\nservers pinned to CPUs {env.server_cpus or 'any'}, load generator to "
          f"{env.loadgen_cpus or 'any'}; run took {out['elapsed_s']} s. /X = {names[0]} / X; "
          f"* = load generator above {GEN_LIMIT} of a core in that window (generator-bound)\n")
    print(report.table(rows, names))
    print(f"\nother processes used {bg['avg']} cores of the machine on average during the "
          f"timed windows (worst {bg['worst']}) and {bg['server_core_avg']} of the server's "
          f"core (worst {bg['server_core_worst']}); above ~0.1 of the server's core the figures "
          "are noisy: rerun on a quiet machine")
    if res.rate:
        print("\nramp steps (invalid = generator-bound: says nothing about the server)")
        print(report.ramp_table(res, names))
    if goals:
        print("\nsummary")
        print(report.targets_table(goals))
    if errors:
        print("\nerrors:")
        for e in errors:
            print(" ", e[:2000])
    print(f"\nraw results: {args.out}")
    return 1 if errors else 0


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    apply_defaults(args)
    if not args.no_uvloop:
        install_uvloop()
    if args.cluster:
        from bench import cluster

        args.out = cluster.default_out(args.out)
        if args.scenarios == ",".join(SCENARIOS):
            args.scenarios = ",".join(cluster.SCENARIOS)
        sys.exit(asyncio.run(cluster.amain(args)))
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
