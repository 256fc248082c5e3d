"""The client's sender thread against answers that are late, malformed or too large: it
never stops, never raises into the caller, and delivers a final state while the process
lives. A real taskpush server subprocess behind, and where the item is about bad answers a
real aiohttp server in front of it that answers badly (or slowly), then forwards."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import taskpush_client as tp
from aiohttp import web

from tests.conftest import API_KEY
from tests.fake_front import BadAnswer, Front
from tests.procs import ServerProcess
from tests.workers_support import history, taskpush_server


@contextlib.contextmanager
def queued_together(client: tp.Client) -> Iterator[None]:
    """Hold the sender's lock while queueing, so what is queued inside is taken as one
    request (as when a busy worker queues while a request is in flight)."""
    with client._lock:
        yield




def html_page() -> web.Response:
    return web.Response(status=200, text="<html><body>Welcome to nginx!</body></html>",
                        content_type="text/html")


def results_not_objects() -> web.Response:
    return web.json_response({"code": 200, "message": "ok", "data": {"results": [1]}})


def results_miscounted() -> web.Response:
    return web.json_response({"code": 200, "message": "ok", "data": {"results": []}})


def retry_after_nan() -> web.Response:
    return web.json_response({"code": 429, "message": "slow down", "data": None}, status=429,
                             headers={"Retry-After": "nan"})


# ---- late answers for loops that are gone --------------------------------------------


def test_answers_for_a_closed_event_loop_do_not_stop_the_sender(server: ServerProcess) -> None:
    """Two reports awaited (and given up on) in an `asyncio.run()` that has returned; their
    answers come after its loop is closed. The sender goes on: the final state queued
    behind them (after a registration, so in the next request) arrives."""
    client = tp.Client(server.url, API_KEY, max_delay=0.0, wait=0.05, backoff=0.02)
    try:
        for task in ("gone1", "gone2"):
            client.register(task, 1, "t")
        assert client.flush(10)

        async def await_briefly() -> list[object]:
            reports = [client.event("gone1", "running"), client.event("gone2", "running")]
            return [await report for report in reports]

        with queued_together(client):  # nothing is sent before the loop is closed
            assert asyncio.run(await_briefly()) == [None, None]
            client.register("gone3", 1, "t")
            done = client.event("gone1", "completed", result={"ok": 1})
        assert client.flush(10)
        assert done.wait(0)["ok"]
    finally:
        client.close(1)
    assert [e["status"] for e in history(server, "gone1")] == ["pending", "running",
                                                               "completed"]
    assert [e["status"] for e in history(server, "gone2")] == ["pending", "running"]


def test_a_slow_answer_after_the_loop_closed_does_not_lose_the_final_state(
        server: ServerProcess) -> None:
    """A server that answers slowly: the awaiting loop gives up and closes while the
    request is in flight, the task's final state is queued meanwhile; when the answer comes
    the sender sends it."""
    gate = threading.Event()
    front = Front(server.url, gate=gate)
    client = tp.Client(front.url, API_KEY, max_delay=0.0, wait=0.05, backoff=0.02)
    try:
        for task in ("slow1", "slow2"):
            client.register(task, 1, "t")
        gate.set()
        assert client.flush(10)
        gate.clear()

        async def await_briefly() -> list[object]:
            with queued_together(client):
                reports = [client.event("slow1", "running"), client.event("slow2", "running")]
            return [await report for report in reports]

        assert asyncio.run(await_briefly()) == [None, None]
        done = client.event("slow1", "completed", result=[1])
        gate.set()
        assert client.flush(10)
        assert done.wait(0)["ok"]
    finally:
        client.close(1)
        front.close()
    assert [e["status"] for e in history(server, "slow1")] == ["pending", "running",
                                                               "completed"]


# ---- malformed answers ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [html_page, results_not_objects, results_miscounted,
                                 retry_after_nan])
def test_malformed_answers_are_retried_until_the_final_state_arrives(
        server: ServerProcess, bad: BadAnswer) -> None:
    """A front that answers the batch badly twice, then forwards: the client retries (with
    the same idempotency keys), the final state is recorded once, nothing raises."""
    task = f"bad-{bad.__name__}"
    front = Front(server.url)
    client = tp.Client(front.url, API_KEY, max_delay=0.0, backoff=0.02, max_backoff=0.05)
    try:
        assert client.register(task, 1, "t").wait()["status"] == "pending"
        front.bad = [bad, bad]
        with queued_together(client):
            client.event(task, "running")
            done = client.event(task, "completed", result={"n": 1})
        assert client.flush(10)
        assert done.wait(0)["ok"]
        assert front.refused == 2 and client.stats["dropped"] == 0
    finally:
        client.close(1)
        front.close()
    assert [e["status"] for e in history(server, task)] == ["pending", "running", "completed"]


def test_a_malformed_answer_to_a_registration_is_retried(server: ServerProcess) -> None:
    front = Front(server.url, bad=[html_page])
    client = tp.Client(front.url, API_KEY, max_delay=0.0, backoff=0.02)
    try:
        assert client.register("bad-register", 1, "t").wait()["status"] == "pending"
        assert front.refused == 1 and front.forwarded == 1
    finally:
        client.close(1)
        front.close()


def test_a_malformed_answer_awaited_does_not_raise(server: ServerProcess) -> None:
    front = Front(server.url)
    client = tp.Client(front.url, API_KEY, max_delay=0.0, backoff=0.02)
    try:
        client.register("bad-async", 1, "t").wait()
        front.bad = [results_not_objects, retry_after_nan]

        async def report() -> object:
            return await client.event("bad-async", "completed")

        assert asyncio.run(report())["ok"]
    finally:
        client.close(1)
        front.close()


# ---- a batch split on 413 keeps its place -----------------------------------------------


def test_the_halves_of_a_split_batch_keep_their_place_in_the_queue(tmp_path: Path) -> None:
    """12 events for 12 tasks against a server taking 64 KiB per request: the first request
    takes 8 of them (4 of 20 KB, then 4 of 1 KB: the client's 90 KB) and is refused whole;
    its first half is refused again and split while its second half would fit, and 4 more
    wait in the queue. The server records all 12 in the order they were queued, across
    tasks."""
    small = taskpush_server(tmp_path, "--max-body-bytes", "65536")
    client = tp.Client(small.url, API_KEY, max_delay=0.0, backoff=0.02,
                       max_batch_bytes=90_000)
    sizes = [20_000] * 4 + [1_000] * 4 + [20_000] * 4
    tasks = [f"order{n:02d}" for n in range(len(sizes))]
    try:
        for task in tasks:
            client.register(task, 1, "t")
        assert client.flush(10)
        with queued_together(client):
            for task, size in zip(tasks, sizes, strict=True):
                client.event(task, "completed", result="c" * size)
        assert client.flush(30)
        assert client.stats["dropped"] == 0
        seqs = [history(small, task)[-1]["seq"] for task in tasks]
    finally:
        client.close(1)
        small.cleanup()
    assert seqs == sorted(seqs)
