"""Server-Sent Events and the JS client's transports in a real headless Chromium against real
`run.py` servers: a bare `EventSource` resumes by itself across a server restart (through
`Last-Event-ID`) and gets the task completed while it was cut off; the client uses SSE when
WebSockets are blocked, polling when SSE is blocked too, and comes back, with no update lost
across the switches; the demo page's transport switch."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import API_KEY, SECRET, make_token
from tests.procs import ServerProcess, Servers

PRODUCER = {"X-API-Key": API_KEY}
WAIT_MS = 20_000
BLOCK_WEBSOCKET = """window.WebSocket = function () { throw new Error('blocked by the test'); };"""


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def start(servers: Servers, *args: str) -> ServerProcess:
    server = servers("--jwt-secret", SECRET, "--api-key", API_KEY, "--access-log", "false",
                     *args)
    await asyncio.to_thread(server.start)
    return server


async def produce(http: aiohttp.ClientSession, server: ServerProcess, task_id: str,
                  **body: Any) -> dict[str, Any]:
    if not body:
        path, payload = "/api/task/tasks", {"task_id": task_id, "user_id": 1, "task_type": "t"}
    else:
        path, payload = f"/api/task/task/{task_id}/events", body
    async with http.post(server.url + path, json=payload, headers=PRODUCER) as resp:
        data = await resp.json()
        assert resp.status in (200, 201), data
        return data["data"]


async def blank_page(browser: Any, server: ServerProcess, init: str = "") -> Any:
    """A page served by the server (same origin; loads taskpush.js; the demo's own client
    starts only on login). Not a page made up by the test: Chromium refuses a made-up
    page's sockets to a local address."""
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda err: errors.append(err))
    page.errors = errors
    if init:
        await page.add_init_script(init)
    await page.goto(server.url + "/")
    await page.wait_for_function("() => !!window.TaskNotificationClient")
    return page


async def wait_js(page: Any, expression: str, arg: Any = None) -> None:
    await page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)


async def test_event_source_resumes_across_a_restart_with_what_happened_meanwhile(
        browser: Any, servers: Servers, http: aiohttp.ClientSession) -> None:
    server = await start(servers)
    await produce(http, server, "report")
    await produce(http, server, "report", status="progress", progress=40)
    page = await blank_page(browser, server)
    await page.evaluate("""(token) => {
      window.__events = [];
      window.__opens = 0;
      const es = new EventSource('/api/task/stream?token=' + token);
      es.onopen = () => { window.__opens += 1; };
      for (const name of ['connected', 'resync', 'active_tasks', 'task_status', 'close']) {
        es.addEventListener(name, (ev) => window.__events.push(
          {type: ev.type, id: ev.lastEventId, data: JSON.parse(ev.data)}));
      }
      window.__es = es;
    }""", make_token(1))
    await wait_js(page, "() => window.__events.some((e) => e.type === 'active_tasks')")
    await produce(http, server, "report", status="progress", progress=60)
    await wait_js(page, "() => window.__events.some((e) => e.data.progress === 60)")
    port = server.port

    assert await asyncio.to_thread(server.stop) == 0  # the stream ends with `close` 1001
    await wait_js(page, "() => window.__events.some((e) => e.type === 'close')")
    # the task completes on the same database while the page cannot reach it
    await asyncio.to_thread(server.start)
    await produce(http, server, "report", status="completed", result={"pages": 12})
    assert await asyncio.to_thread(server.stop) == 0
    await asyncio.to_thread(server.start, port=port)

    await wait_js(page, "() => window.__events.some((e) => e.data.status === 'completed')")
    events = await page.evaluate("window.__events")
    assert await page.evaluate("window.__opens") >= 2  # EventSource reconnected by itself
    close = next(e for e in events if e["type"] == "close")
    assert close["data"]["code"] == 1001
    after = events[events.index(close) + 1:]
    assert [e["type"] for e in after[:2]] == ["connected", "active_tasks"]
    assert "resync" not in [e["type"] for e in after]
    assert after[1]["id"] == close["id"]  # resumed from the last id it had (Last-Event-ID)
    done = [e for e in after if e["type"] == "task_status"]
    assert [(e["data"]["task_id"], e["data"]["status"]) for e in done] == [
        ("report", "completed")]
    assert done[0]["id"].endswith(f":{done[0]['data']['seq']}")
    assert not page.errors


CLIENT = """({token, opts}) => {
  window.__seen = {transports: [], status: [], completed: [], errors: 0};
  const c = new TaskNotificationClient(1, () => window.__token || token, Object.assign({
    minDelayMs: 20, maxDelayMs: 200, pollIntervalMs: 200, failuresBeforeFallback: 2,
  }, opts || {}));
  c.on('transport', (t) => window.__seen.transports.push(t));
  c.on('task_status', (t) => window.__seen.status.push(t.task_id + ':' + t.status + ':' + t.seq));
  c.on('task_completed', (t) => window.__seen.completed.push(t.task_id));
  window.__client = c.connect();
}"""


async def test_client_falls_back_to_sse_then_polling_and_back_without_a_gap(
        browser: Any, servers: Servers, http: aiohttp.ClientSession) -> None:
    server = await start(servers)
    page = await blank_page(browser, server, BLOCK_WEBSOCKET)
    await page.evaluate(CLIENT, {"token": make_token(1)})
    await wait_js(page, "() => window.__client.transport === 'sse'")
    assert (await page.evaluate("window.__client.state")) == "connected"
    await produce(http, server, "one")
    await produce(http, server, "one", status="completed")
    await wait_js(page, "() => window.__seen.completed.includes('one')")

    # SSE blocked as well (a proxy that refuses the stream), and the server restarts: the
    # client ends up polling, and gets what completed while it switched.
    await page.route("**/api/task/stream**", lambda route: route.abort())
    await produce(http, server, "two")
    port = server.port
    assert await asyncio.to_thread(server.stop) == 0
    await asyncio.to_thread(server.start, port=port)
    await produce(http, server, "two", status="completed")
    await wait_js(page, "() => window.__client.transport === 'polling'")
    await wait_js(page, "() => window.__seen.completed.includes('two')")
    await produce(http, server, "three")
    await produce(http, server, "three", status="progress", progress=50)

    # SSE gets through again: polling probes it and switches back; nothing in between lost
    await page.unroute("**/api/task/stream**")
    await wait_js(page, "() => window.__client.transport === 'sse'")
    await produce(http, server, "three", status="completed")
    await wait_js(page, "() => window.__seen.completed.includes('three')")

    seen = await page.evaluate("window.__seen")
    assert seen["completed"] == ["one", "two", "three"]  # each once, none missed
    transports = [t for t in seen["transports"] if t]
    assert transports[0] == "sse" and "polling" in transports and transports[-1] == "sse"
    assert "websocket" not in transports
    statuses = [s.split(":") for s in seen["status"]]
    for task in ("one", "two", "three"):  # per task, seq only increases
        seqs = [int(s[2]) for s in statuses if s[0] == task]
        assert seqs == sorted(set(seqs)), (task, seqs)
    assert not page.errors


async def test_client_prefers_websocket_and_sse_reopens_on_token_refresh(
        browser: Any, servers: Servers, http: aiohttp.ClientSession) -> None:
    server = await start(servers)
    page = await blank_page(browser, server)
    await page.evaluate(CLIENT, {"token": make_token(1)})
    await wait_js(page, "() => window.__client.transport === 'websocket'")
    await page.evaluate("window.__client.disconnect()")

    # only SSE: a new token makes it reopen the stream, resuming where it was
    await page.evaluate(CLIENT, {"token": make_token(1), "opts": {"transports": ["sse"]}})
    await wait_js(page, "() => window.__client.transport === 'sse'")
    await produce(http, server, "r")
    await wait_js(page, "() => window.__seen.status.some((s) => s.startsWith('r:pending'))")
    await page.evaluate("(t) => window.__client.setToken(t)", make_token(1, ttl=7200))
    await produce(http, server, "r", status="completed")
    await wait_js(page, "() => window.__seen.completed.includes('r')")
    assert await page.evaluate("window.__client.send({type: 'ping'})") is False
    assert not page.errors


async def test_demo_page_shows_and_switches_the_transport(browser: Any,
                                                          servers: Servers) -> None:
    server = servers("--demo-task-seconds", "1", "--access-log", "false")
    await asyncio.to_thread(server.start)
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(server.url + "/")
    await page.get_by_test_id("login-user").fill("1")
    await page.get_by_test_id("login-button").click()
    indicator = page.get_by_test_id("conn-transport")
    conn = page.get_by_test_id("conn-state")
    from playwright.async_api import expect
    await expect(conn).to_have_text("connected", timeout=WAIT_MS)
    await expect(indicator).to_have_text("WebSocket", timeout=WAIT_MS)
    for pick, shown, state in (("sse", "SSE", "connected"), ("polling", "polling", "polling")):
        await page.get_by_test_id("transport-pick").select_option(pick)
        await expect(indicator).to_have_text(shown, timeout=WAIT_MS)
        await expect(conn).to_have_text(state, timeout=WAIT_MS)
        await page.get_by_test_id("start-success").click()
        card = page.locator('[data-testid="task-card"][data-status="completed"]')
        await expect(card).to_have_count(1 if pick == "sse" else 2, timeout=WAIT_MS)
    await page.get_by_test_id("transport-pick").select_option("auto")
    await expect(indicator).to_have_text("WebSocket", timeout=WAIT_MS)
    await page.reload()  # the choice is kept for the tab
    await expect(indicator).to_have_text("WebSocket", timeout=WAIT_MS)
    assert re.match("auto", await page.get_by_test_id("transport-pick").input_value())
