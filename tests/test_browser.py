"""The demo page and the JS client in a real headless Chromium, against real `run.py` servers.

Log in, start tasks and watch them move (progress, completed with a result, failed with its
error, cancelled from the card); survive `kill -9` and a SIGTERM restart without a reload
(the JS client reconnects and resumes with `since`), including a task that completed while
the page's server was down; a second browser context of the same user sees the same cards
and live updates; the layout holds at desktop and phone widths.

Needs the `playwright` Python package and a system Chromium (Debian: `apt-get install
chromium`; `TASKPUSH_CHROMIUM` overrides the path). Playwright never downloads a browser
here; without either the tests skip on a developer machine and fail in CI (`CI` set).
Each test leaves screenshots in its tmp_path.
`TASKPUSH_WRITE_SCREENSHOT=1` also rewrites docs/demo.png (tracked, so not by default).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.browser_support import PHONE, WAIT_MS, expect, open_demo
from tests.engines import Engine
from tests.procs import ROOT, ServerProcess, Servers

API_KEY = "browser-producer-key-0123456789"
PRODUCER = {"X-API-Key": API_KEY}


# Records every value each card's progress bar takes, so "it advanced" is checked on the
# actual sequence of renders rather than on two samples taken at lucky moments.
RECORD_PROGRESS = """() => {
  window.__progress = {};
  new MutationObserver((records) => {
    for (const r of records) {
      const card = r.target.closest('[data-testid="task-card"]');
      if (!card) continue;
      (window.__progress[card.dataset.taskId] ||= []).push(Number(r.target.dataset.progress));
    }
  }).observe(document.getElementById('tasks'),
             {subtree: true, attributes: true, attributeFilter: ['data-progress']});
}"""


# kill -9 / restart run on both engines (conftest's `engine`); a 2-node cluster behind nginx:
# tests/test_cluster_proxy.py


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def start_server(servers: Servers, *args: str, db: str | None = None) -> ServerProcess:
    server = servers("--demo-task-seconds", "3", "--access-log", "false", *args, db=db)
    await asyncio.to_thread(server.start)
    return server


async def produce(http: aiohttp.ClientSession, server: ServerProcess, path: str,
                  body: dict[str, Any], expect_status: int = 200) -> dict[str, Any]:
    async with http.post(server.url + path, json=body, headers=PRODUCER) as resp:
        payload = await resp.json()
        assert resp.status == expect_status, payload
        return payload["data"]


async def event(http: aiohttp.ClientSession, server: ServerProcess, task_id: str,
                **body: Any) -> dict[str, Any]:
    return await produce(http, server, f"/api/task/task/{task_id}/events", body)


async def test_success_task_progresses_and_completes(browser: Any, servers: Servers,
                                                     tmp_path: Path) -> None:
    server = await start_server(servers)
    demo = await open_demo(browser, server, tmp_path)
    await expect(demo.page.locator("#empty")).to_have_text("No tasks yet. Start one above.")
    await demo.page.evaluate(RECORD_PROGRESS)

    task_id = await demo.start("success")
    card = demo.card(task_id)
    await expect(card).to_have_attribute("data-status", re.compile("running|progress"))
    await demo.shot("running")
    await expect(card).to_have_attribute("data-status", "completed")
    await expect(demo.progress(task_id)).to_have_attribute("data-progress", "100")
    await expect(card.get_by_test_id("status")).to_have_text("completed")
    await expect(card.get_by_test_id("step")).to_have_text("Step 10/10")
    result = card.get_by_test_id("result")
    await expect(result).to_contain_text('"Question 1"')
    await result.locator("summary").click()
    await expect(result.locator("pre")).to_be_visible()
    await expect(card.get_by_test_id("delete")).to_be_visible()  # cancel became delete

    seen = await demo.page.evaluate("(id) => window.__progress[id]", task_id)
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert seen[-1] == 100
    steps = {p for p in seen if 0 < p < 100}
    assert len(steps) >= 3, f"the bar did not advance step by step: {seen}"
    await demo.shot("completed")
    demo.assert_no_page_errors()


async def test_cancel_from_the_card(browser: Any, servers: Servers, tmp_path: Path) -> None:
    server = await start_server(servers)
    demo = await open_demo(browser, server, tmp_path)
    task_id = await demo.start("long")  # 18 s: still running when cancelled
    card = demo.card(task_id)
    await expect(demo.progress(task_id)).not_to_have_attribute("data-progress", "0")
    await card.get_by_test_id("cancel").click()
    await expect(card).to_have_attribute("data-status", "cancelled")
    await expect(card.get_by_test_id("status")).to_have_text("cancelled")
    await expect(card.get_by_test_id("cancel")).to_have_count(0)
    await expect(card.get_by_test_id("delete")).to_be_visible()
    await demo.shot("cancelled")

    # Deleting the finished task removes its card (the server answered, not just the page).
    await card.get_by_test_id("delete").click()
    await expect(card).to_have_count(0)
    await demo.page.reload()
    await expect(demo.conn).to_have_text("connected")
    await expect(demo.page.locator("#empty")).to_be_visible()
    await expect(card).to_have_count(0)
    demo.assert_no_page_errors()


async def test_failed_task_shows_its_error(browser: Any, servers: Servers,
                                           tmp_path: Path) -> None:
    server = await start_server(servers)
    demo = await open_demo(browser, server, tmp_path)
    task_id = await demo.start("fail")
    card = demo.card(task_id)
    await expect(card).to_have_attribute("data-status", "failed")
    error = card.get_by_test_id("error")
    await expect(error).to_have_text("DemoFailure: could not parse page 4: unreadable scan")
    await expect(demo.progress(task_id)).to_have_attribute("data-progress", "30")
    await expect(card.get_by_test_id("result")).to_have_count(0)
    await demo.shot("failed")
    demo.assert_no_page_errors()


async def test_kill_9_and_restart_resumes_without_reload(
        browser: Any, servers: Servers, http: aiohttp.ClientSession, tmp_path: Path,
        engine: Engine) -> None:
    server = await start_server(servers, "--api-key", API_KEY, db=engine.database())
    demo = await open_demo(browser, server, tmp_path)
    # An HTTP-producer task (outlives the server: its producer goes on) ...
    await produce(http, server, "/api/task/tasks",
                  {"task_id": "export_1", "user_id": 1, "task_type": "report_export"}, 201)
    await event(http, server, "export_1", status="progress", progress=30,
                message="Exporting rows...", step="Step 3/10")
    await expect(demo.progress("export_1")).to_have_attribute("data-progress", "30")
    # ... and an in-process job (dies with the server).
    job = await demo.start("long")
    await expect(demo.card(job)).to_have_attribute("data-status", re.compile("running|progress"))
    await demo.page.evaluate("window.__sameDocument = true")

    await asyncio.to_thread(server.kill)
    await expect(demo.conn).to_have_text(re.compile("reconnecting|polling"))
    await demo.shot("server-down")
    await asyncio.to_thread(server.start, port=server.port)

    await event(http, server, "export_1", status="progress", progress=60, step="Step 6/10")
    await event(http, server, "export_1", status="completed", result={"rows": 1200},
                message="Export ready")
    card = demo.card("export_1")
    await expect(card).to_have_attribute("data-status", "completed")
    await expect(card.get_by_test_id("result")).to_contain_text('"rows": 1200')
    await expect(card.get_by_test_id("message")).to_have_text("Export ready")
    # The killed server's job was marked failed/interrupted by the next start.
    await expect(demo.card(job)).to_have_attribute("data-status", "failed")
    await expect(demo.card(job).get_by_test_id("error")).to_contain_text("interrupted")
    await expect(demo.conn).to_have_text("connected")
    assert await demo.page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    await demo.shot("resumed")
    demo.assert_no_page_errors()


async def test_recovers_a_task_completed_while_its_server_was_down(
        browser: Any, servers: Servers, http: aiohttp.ClientSession, tmp_path: Path,
        engine: Engine) -> None:
    server = await start_server(servers, "--api-key", API_KEY, db=engine.database())
    demo = await open_demo(browser, server, tmp_path)
    await produce(http, server, "/api/task/tasks",
                  {"task_id": "report_7", "user_id": 1, "task_type": "report_export"}, 201)
    await event(http, server, "report_7", status="progress", progress=40)
    card = demo.card("report_7")
    await expect(card.get_by_test_id("progress")).to_have_attribute("data-progress", "40")
    await demo.page.evaluate("window.__sameDocument = true")
    port = server.port

    assert await asyncio.to_thread(server.stop) == 0  # SIGTERM: sockets closed with 1001
    await expect(demo.conn).to_have_text(re.compile("reconnecting|polling"))
    # The task completes on the same database while nothing listens where the page looks:
    # a run of the server on another port the page does not know.
    await asyncio.to_thread(server.start)
    assert server.port != port
    await event(http, server, "report_7", status="completed", result={"pages": 12})
    assert await asyncio.to_thread(server.stop) == 0
    await expect(card).to_have_attribute("data-status", re.compile("running|progress"))
    await expect(demo.conn).not_to_have_text("connected")

    await asyncio.to_thread(server.start, port=port)
    await expect(card).to_have_attribute("data-status", "completed")
    await expect(card.get_by_test_id("progress")).to_have_attribute("data-progress", "100")
    await expect(card.get_by_test_id("result")).to_contain_text('"pages": 12')
    await expect(demo.conn).to_have_text("connected")
    assert await demo.page.evaluate("window.__sameDocument") is True, "the page was reloaded"
    await demo.shot("recovered")
    demo.assert_no_page_errors()


async def test_second_browser_of_the_same_user_sees_the_same_tasks(
        browser: Any, servers: Servers, tmp_path: Path) -> None:
    server = await start_server(servers)
    first = await open_demo(browser, server, tmp_path)
    failed = await first.start("fail")
    await expect(first.card(failed)).to_have_attribute("data-status", "failed")
    long = await first.start("long")

    (tmp_path / "second").mkdir()
    second = await open_demo(browser, server, tmp_path / "second")  # another context
    # What existed before it opened: a finished task (from the list) and a running one.
    await expect(second.card(failed)).to_have_attribute("data-status", "failed")
    await expect(second.card(failed).get_by_test_id("error")).to_contain_text("unreadable scan")
    await expect(second.card(long)).to_have_attribute("data-status", re.compile("running|progress"))
    await second.page.evaluate(RECORD_PROGRESS)

    # Live: a task started in the first tab moves in the second.
    done = await first.start("success")
    await expect(second.card(done)).to_have_attribute("data-status", "completed")
    await expect(second.card(done).get_by_test_id("result")).to_contain_text('"Question 1"')
    seen = await second.page.evaluate("(id) => window.__progress[id]", done)
    assert len({p for p in seen if 0 < p < 100}) >= 3, f"no live progress in tab 2: {seen}"

    # And back: a cancel in the second tab shows in the first.
    await second.card(long).get_by_test_id("cancel").click()
    await expect(first.card(long)).to_have_attribute("data-status", "cancelled")
    await expect(second.card(long)).to_have_attribute("data-status", "cancelled")
    await expect(first.page.get_by_test_id("task-card")).to_have_count(3)
    await expect(second.page.get_by_test_id("task-card")).to_have_count(3)
    await first.shot("first-tab")
    await second.shot("second-tab")
    first.assert_no_page_errors()
    second.assert_no_page_errors()


async def test_layout_at_desktop_and_phone_widths(browser: Any, servers: Servers,
                                                  tmp_path: Path) -> None:
    """One completed, one failed and one running card; nothing overflows sideways.

    With TASKPUSH_WRITE_SCREENSHOT=1 the desktop view is saved as docs/demo.png."""
    server = await start_server(servers)
    demo = await open_demo(browser, server, tmp_path)
    running = await demo.start("long")  # 18 s: let it get somewhere first
    await demo.page.wait_for_function(
        "(id) => Number(document.querySelector(`[data-task-id='${id}'] [data-testid=progress]`)"
        ".dataset.progress) >= 20", arg=running, timeout=WAIT_MS)
    cancelled = await demo.start("long")
    failed = await demo.start("fail")
    completed = await demo.start("success")
    await demo.card(cancelled).get_by_test_id("cancel").click()
    await expect(demo.card(failed)).to_have_attribute("data-status", "failed")
    await expect(demo.card(completed)).to_have_attribute("data-status", "completed")
    await expect(demo.card(cancelled)).to_have_attribute("data-status", "cancelled")
    await expect(demo.card(running)).to_have_attribute("data-status", "progress")

    phone = await open_demo(browser, server, tmp_path, viewport=PHONE)
    await expect(phone.page.get_by_test_id("task-card")).to_have_count(4)
    for view, name in ((demo, "desktop"), (phone, "phone")):
        width = view.page.viewport_size["width"]
        scroll = await view.page.evaluate("document.documentElement.scrollWidth")
        assert scroll <= width, f"{name}: the page scrolls sideways ({scroll} > {width})"
        for card in await view.page.get_by_test_id("task-card").all():
            box = await card.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, \
                f"{name}: a card sticks out: {box}"
        await view.shot(f"layout-{name}", full_page=False)
    # Desktop: the cards sit side by side; phone: one column.
    tops = {round((await c.bounding_box())["y"])
            for c in await demo.page.get_by_test_id("task-card").all()}
    assert len(tops) < 4, "desktop cards should share rows"
    xs = {round((await c.bounding_box())["x"])
          for c in await phone.page.get_by_test_id("task-card").all()}
    assert len(xs) == 1, "phone cards should form one column"

    if os.environ.get("TASKPUSH_WRITE_SCREENSHOT") == "1":
        await demo.page.mouse.move(0, 0)
        await demo.page.screenshot(path=str(ROOT / "docs" / "demo.png"), full_page=False)
    demo.assert_no_page_errors()
    phone.assert_no_page_errors()


@pytest.mark.slow
async def test_the_page_names_the_cluster_node_holding_its_socket(
        browser: Any, servers: Servers, tmp_path: Path, pg_server: Any) -> None:
    """On a cluster each tab shows which node holds its socket ("kill the node" then shows
    something); a single server shows none."""
    db = str(pg_server.create_database())
    nodes = servers.cluster(db, "--demo-task-seconds", "3", "--access-log", "false")
    for node in nodes:
        await asyncio.to_thread(node.start)
    for node in nodes:
        demo = await open_demo(browser, node, tmp_path)
        label = demo.page.get_by_test_id("conn-node")
        await expect(label).to_be_visible()
        await expect(label).to_have_text(f"node {node.name}")
        await demo.shot(f"cluster-{node.name}")
        demo.assert_no_page_errors()
    single = await start_server(servers)
    demo = await open_demo(browser, single, tmp_path)
    await expect(demo.page.get_by_test_id("conn-node")).to_be_hidden()
