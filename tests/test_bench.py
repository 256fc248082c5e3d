"""The benchmark, as tests: the README's benchmark command runs on a checkout and reports
every scenario (fan-out to many sockets and workers reporting through taskpush-client
included) against BOTH baselines measured in the same run (the no-database relay and the
naive commit-per-event server written with orjson), with the load generator's own CPU per
step; the stdlib-json draft of the naive server can join the same run; docs/performance.md
shows each target with its value and both in-run ratios; and the suite itself asserts no
speed (speed is measured by bench/, never by a test)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"idle", "latency", "rate", "batch", "storm", "fanout", "workload"}
SERVERS = ["taskpush", "relay", "naive"]


@pytest.mark.slow
def test_the_readme_benchmark_command_runs_and_compares_every_scenario(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "python -m bench" in readme
    out = tmp_path / "results.json"
    small = ["--quick", "--idle", "20", "--users", "20", "--duration", "1", "--ramp", "200",
             "--ramp-step-s", "1", "--batch-s", "1", "--batch-size", "20", "--storm-clients",
             "20", "--fanout", "3x2@20", "--fanout-admins", "1", "--fanout-s", "1",
             "--workers", "2", "--workload-s", "1", "--workload-task-s", "0.5",
             "--out", str(out), "--tmpdir", str(tmp_path)]
    run = subprocess.run([sys.executable, "-m", "bench", *small], cwd=ROOT,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "/relay" in run.stdout and "/naive" in run.stdout  # the printed table
    assert "summary" in run.stdout  # the compact targets table
    results = json.loads(out.read_text())
    assert results["servers"] == SERVERS
    assert {row["scenario"] for row in results["comparison"]} == SCENARIOS
    for row in results["comparison"]:
        assert set(row["values"]) == set(SERVERS), row
        assert set(row["ratios"]) == {"relay", "naive"}, row
    assert [t["target"][:2] for t in results["targets"]] == ["1.", "2.", "3a", "4.", "5.", "6a",
                                                            "6b", "6c"]
    fan_rows = [r["metric"] for r in results["comparison"] if r["scenario"] == "fanout"]
    assert "3x2@20: deliveries per server CPU-s" in fan_rows
    per = results["results"]
    for server in SERVERS:
        step = per["latency"][server]["step"]
        assert step["delivered_ratio"] == 1.0, server  # every event pushed
        assert set(step["gen"]["procs"]) == {"receivers", "pub0", "pub1"}, server
        assert per["rate"][server]["steps"], server
        assert per["storm"][server]["ready_ok"] == 20, server  # every client, 5 tasks each
        assert per["batch"][server]["events_err"] == 0, server
        assert per["idle"][server]["connected_ok"] == 20, server
        fan = per["fanout"][server]["3x2@20"]
        assert fan["sockets_open"] == 3 * 2 + 1, server  # 2 per user, 1 admin
        assert fan["deliveries_expected"] == fan["events_ok"] * 3 > 0, server
        assert fan["delivered_ratio"] == 1.0, server  # every socket, the admin's too
        assert fan["deliveries_per_server_cpu_s"] is not None, server
        work = per["workload"][server]
        assert work["workers"] == 2 and work["tasks"] >= 2 and work["dropped"] == 0, server
        assert 0 < work["events_sent"] <= work["calls"], server  # the client coalesces
        assert 0 < work["delivered"] <= work["events_sent"], server
    # A seq going backwards on any socket is reported as an error, which fails the run: the
    # returncode above covers in-order delivery.


def test_naive_baseline_is_standalone() -> None:
    """The naive server is what a developer writes without taskpush: it must not use it."""
    tree = ast.parse((ROOT / "bench" / "naive.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert "server" not in imported and "bench" not in imported
    assert {"aiohttp", "aiosqlite", "orjson"} <= imported


@pytest.mark.slow
def test_both_naive_baselines_run_in_one_invocation(tmp_path: Path) -> None:
    """The orjson server is the baseline; the stdlib-json draft joins the same run when
    asked, so both can be reported once, each with its ratio."""
    out = tmp_path / "results.json"
    small = ["--quick", "--scenarios", "latency", "--users", "10", "--duration", "1",
             "--baseline", "naive,naive-json", "--out", str(out), "--tmpdir", str(tmp_path)]
    run = subprocess.run([sys.executable, "-m", "bench", *small], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "/naive-json" in run.stdout
    results = json.loads(out.read_text())
    assert results["servers"] == ["taskpush", "naive", "naive-json"]
    commands = results["commands"]
    assert commands["naive"][-2:] == ["--json", "orjson"]
    assert commands["naive-json"][-2:] == ["--json", "stdlib"]
    for row in results["comparison"]:
        assert set(row["ratios"]) == {"naive", "naive-json"}, row
    for server in results["servers"]:
        assert results["results"]["latency"][server]["step"]["delivered_ratio"] == 1.0, server


def test_performance_doc_shows_each_target_with_value_and_both_ratios() -> None:
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    section = text.split("### Against the targets", 1)[1].split("\n\n| ", 1)[1]
    section = "| " + section.split("\n\n", 1)[0]  # the first table of the section
    rows = [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")][1:]  # no header
    targets = ["events per server CPU-s at 500", "max single-event rate", "fanout 50x20",
               "fanout 10x200", "workload", "batch", "p99 at 500", "per idle socket", "storm"]
    for target in targets:
        (row,) = [r for r in rows if target in r]
        cells = [c.strip() for c in row.strip("|").split("|")]
        # target | taskpush | vs relay | vs naive | met?
        assert len(cells) == 5, row
        assert re.search(r"\d", cells[1]), row  # the measured value
        assert re.search(r"\d(\.\d+)?x", cells[2]), row  # ratio to the relay
        assert re.search(r"\d(\.\d+)?x", cells[3]), row  # ratio to the naive server
        verdict = re.match(r"\**(met|not met|measured)\**(.*)", cells[4])
        assert verdict, row
        if verdict.group(1) == "not met":
            assert len(verdict.group(2).strip(" :,;.-")) > 10, row  # and it says why


SPEED_WORDS = {"perf_counter", "perf_counter_ns", "process_time", "thread_time", "elapsed",
               "duration", "took", "timeit"}


def test_no_test_asserts_speed() -> None:
    """Deadlines that only catch a hang are fine; a measured time in an assert is not."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assert):
                names = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.test) if isinstance(n, ast.Attribute)}
                if names & SPEED_WORDS:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


CLUSTER_FIGURES = ["max rate, p99 < 100 ms (ev/s), 1 node",
                   "max rate, p99 < 100 ms (ev/s), 2 nodes",
                   "cross-node publish->receive p50", "cross-node publish->receive p99",
                   "events per server CPU-s, 1 node", "events per server CPU-s, 2 nodes",
                   "reconnect storm onto 2 nodes: all ready",
                   "reconnect storm onto 2 nodes: server CPU"]


@pytest.mark.slow
def test_the_cluster_benchmark_reports_every_figure(tmp_path: Path, pg_server: object) -> None:
    """`python -m bench --cluster` in its quickest form: PostgreSQL with 1 and 2 nodes next
    to a SQLite node, every cluster figure present with its ratio (no timing asserted).
    `pg_server` only makes the test skip (or fail in CI) where PostgreSQL is missing; the
    bench starts servers of its own."""
    out = tmp_path / "cluster.json"
    small = ["--cluster", "--quick", "--users", "20", "--duration", "1", "--ramp", "200",
             "--ramp-step-s", "1", "--storm-clients", "20", "--out", str(out),
             "--tmpdir", str(tmp_path)]
    run = subprocess.run([sys.executable, "-m", "bench", *small], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "pg2/sqlite" in run.stdout and "summary (cluster)" in run.stdout
    results = json.loads(out.read_text())
    assert results["servers"] == ["sqlite", "pg1", "pg2"]
    assert {row["scenario"] for row in results["comparison"]} == {"latency", "rate", "storm"}
    for row in results["comparison"]:
        assert set(row["ratios"]) == {"pg1", "pg2"}, row
    figures = results["figures"]
    for wanted in CLUSTER_FIGURES:
        (row,) = [f for f in figures if f["figure"].startswith(wanted)]
        assert row["value"] is not None and row["sqlite"] is not None, row
        assert row["ratio"] is not None, row
    per = results["results"]
    for system in ("sqlite", "pg1", "pg2"):
        assert per["latency"][system]["step"]["delivered_ratio"] == 1.0, system
        assert per["storm"][system]["ready_ok"] == 20, system
    assert "***@" in json.dumps(results["commands"])  # the database password is not kept
    # PostgreSQL's rows per event over the latency phase, for each PostgreSQL system
    assert set(results["pg_rows_per_event"]) == {"pg1", "pg2"}
    for got in results["pg_rows_per_event"].values():
        assert got["table_columns"] == ["ins", "upd", "hot_upd", "del"]
        assert "database" in got["per_event"], got
    assert "rows per event over the latency phase" in run.stdout
