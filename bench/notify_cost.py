"""What PostgreSQL's NOTIFY costs the cluster's commits.

    python -m bench.notify_cost [--seconds 3] [--rounds 3] [--fsync]

Every write transaction of the PostgreSQL engine ends with `pg_notify('taskpush', seq)`:
the wake-up the other nodes listen for. NOTIFY takes a global lock on the notification
queue at commit, so commits that notify are serialized there (ours are serialized by the
counter row already). This starts a private PostgreSQL server (tests/pg.py), and measures
commits per second of `server.storage.postgres.store.PgStore` with and without the NOTIFY (the
`notify=False` switch exists for this measure only), in two shapes:

- `serial 1 node`: one writer waiting for each commit (one operation per transaction),
  one node: NOTIFY's own cost per commit (the node ignores its own wake-ups);
- `serial 2 nodes`: the same with a second, idle node listening: with NOTIFY it reads the
  feed on every wake-up (what fan-out costs the database and the machine), without it
  once a second;
- `2 nodes x 32`: two nodes, 32 concurrent writers each: group commit on, the shape of a
  loaded cluster (operations per second).

The two modes are interleaved round by round and the best round counts, so a busy machine
slows them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from server.core.model import Change, Register
from server.storage.postgres.store import PgStore
from tests.pg import PostgresServer

SHAPES = ("serial 1 node", "serial 2 nodes", "2 nodes x 32")


async def _serial(store: PgStore, seconds: float) -> tuple[int, int]:
    await store.submit(Register("serial", 1, "job"))
    commits = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        await store.submit(Change("serial", "progress", progress=commits % 100))
        commits += 1
    return commits, commits


async def _concurrent(stores: list[PgStore], seconds: float, writers: int) -> tuple[int, int]:
    counts = [0]
    commits = [0]
    for store in stores:
        store.on_commit = lambda outcomes, s: commits.__setitem__(0, commits[0] + 1)
    for n, store in enumerate(stores):
        await store.submit_many([Register(f"c{n}-{w}", 1, "job") for w in range(writers)])
    commits[0] = 0
    end = time.perf_counter() + seconds

    async def writer(store: PgStore, task_id: str) -> None:
        i = 0
        while time.perf_counter() < end:
            await store.submit(Change(task_id, "progress", progress=i % 100))
            counts[0] += 1
            i += 1

    await asyncio.gather(*(writer(store, f"c{n}-{w}") for n, store in enumerate(stores)
                           for w in range(writers)))
    return commits[0], counts[0]


async def _measure(server: PostgresServer, notify: bool, shape: str, seconds: float
                   ) -> tuple[int, int]:
    url = server.create_database("bench")
    nodes = 1 if shape == "serial 1 node" else 2
    stores = [PgStore(url, node_name=f"bench-{n}", notify=notify) for n in range(nodes)]
    for store in stores:
        await store.open()
    try:
        if shape.startswith("serial"):
            return await _serial(stores[0], seconds)
        return await _concurrent(stores, seconds, 32)
    finally:
        for store in stores:
            await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.notify_cost")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync", action="store_true",
                        help="fsync on (durable commits; slower, closer to production)")
    args = parser.parse_args(argv)
    server = PostgresServer(fsync=args.fsync).start()
    try:
        best: dict[tuple[str, bool], tuple[float, float]] = {}
        for _ in range(args.rounds):
            for shape in SHAPES:
                for notify in (True, False):
                    commits, ops = asyncio.run(_measure(server, notify, shape, args.seconds))
                    rate = (commits / args.seconds, ops / args.seconds)
                    key = (shape, notify)
                    if key not in best or rate[1] > best[key][1]:
                        best[key] = rate
        print(f"PostgreSQL commits with and without NOTIFY (fsync {'on' if args.fsync else 'off'},"
              f" best of {args.rounds} x {args.seconds:g} s)")
        print(f"{'shape':<14} {'notify':>6} {'commits/s':>10} {'ops/s':>10} {'vs quiet':>9}")
        for shape in SHAPES:
            quiet = best[(shape, False)][1]
            for notify in (True, False):
                commits, ops = best[(shape, notify)]
                print(f"{shape:<14} {'yes' if notify else 'no':>6} {commits:>10.0f}"
                      f" {ops:>10.0f} {ops / quiet:>9.2f}")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
