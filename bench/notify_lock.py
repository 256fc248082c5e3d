"""NOTIFY's global lock on raw transactions: `python -m bench.notify_lock` (~2 minutes).

bench/notify_cost.py measures taskpush's own engine with and without NOTIFY; this measures
the lock itself on plain SQL, including writers that share nothing, i.e. what taskpush's
notifications cost other applications of the same PostgreSQL server (and theirs cost us).

A transaction that ran NOTIFY takes a lock global to the PostgreSQL server while it commits
(so notifications are queued in commit order), which serializes every notifying commit,
WAL flush included: commits that could share one flush (group commit) no longer do.
taskpush's write transaction is serialized anyway (the `seq_counter` row lock gives seq
in commit order) and notifies once per batch. This measures both shapes on a private
PostgreSQL server (tests/pg.py, fsync on) with and without `pg_notify`:

  counter   taskpush's shape: lock the counter row, insert a feed row, update the counter
  separate  each writer inserts into its own table (nothing shared but the NOTIFY lock)

for 1 and 4 concurrent writers (4 nodes' writers), reporting commits/s and p50/p99 commit
latency: the median of `--rounds` runs, with and without NOTIFY alternating, so that a
burst of other work on a shared machine hits both alike. Figures go to docs/cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

from bench.common import ns_to_ms, pct

SETUP = """
CREATE TABLE IF NOT EXISTS counter (id int PRIMARY KEY, seq bigint NOT NULL);
INSERT INTO counter VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS feed (seq bigint PRIMARY KEY, task text NOT NULL);
"""


async def writer(url: str, shape: str, notify: bool, k: int, until: float,
                 lat: list[int]) -> int:
    conn = await asyncpg.connect(url)
    table = f"own_{k}"
    await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (n bigserial, task text)")
    body = "x" * 300
    n = 0
    try:
        while time.monotonic() < until:
            t0 = time.monotonic_ns()
            async with conn.transaction():
                if shape == "counter":
                    seq = await conn.fetchval("SELECT seq FROM counter WHERE id = 1 FOR UPDATE")
                    await conn.execute("INSERT INTO feed VALUES ($1, $2)", seq + 1, body)
                    await conn.execute("UPDATE counter SET seq = $1 WHERE id = 1", seq + 1)
                else:
                    await conn.execute(f"INSERT INTO {table} (task) VALUES ($1)", body)
                if notify:
                    await conn.execute("SELECT pg_notify('taskpush', $1)", str(n))
            lat.append(time.monotonic_ns() - t0)
            n += 1
    finally:
        await conn.close()
    return n


async def measure(url: str, shape: str, notify: bool, writers: int, seconds: float
                  ) -> dict:
    lat: list[int] = []
    until = time.monotonic() + seconds
    counts = await asyncio.gather(*(writer(url, shape, notify, k, until, lat)
                                    for k in range(writers)))
    lat.sort()
    return {"shape": shape, "notify": notify, "writers": writers,
            "commits_per_s": round(sum(counts) / seconds), "p50_ms": ns_to_ms(pct(lat, 50)),
            "p99_ms": ns_to_ms(pct(lat, 99))}


def median(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("commits_per_s", "p50_ms", "p99_ms"):
        values = sorted(r[key] for r in runs)
        out[key] = values[len(values) // 2]
    return out


async def amain(seconds: float, rounds: int) -> list[dict]:
    from tests.pg import PostgresServer

    pg = PostgresServer(fsync=True).start()
    try:
        url = pg.create_database("notify")
        conn = await asyncpg.connect(url)
        await conn.execute(SETUP)
        await conn.close()
        out = []
        for shape in ("counter", "separate"):
            for writers in (1, 4):
                runs: dict[bool, list[dict]] = {False: [], True: []}
                for _ in range(rounds):
                    for notify in (False, True):
                        runs[notify].append(await measure(url, shape, notify, writers,
                                                          seconds))
                for notify in (False, True):
                    r = median(runs[notify])
                    print(f"{shape:8} writers={writers} notify={notify!s:5} "
                          f"{r['commits_per_s']:6}/s p50 {r['p50_ms']} ms "
                          f"p99 {r['p99_ms']} ms", flush=True)
                    out.append(r)
        return out
    finally:
        pg.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.notify_lock",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per figure (median)")
    args = ap.parse_args()
    asyncio.run(amain(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
