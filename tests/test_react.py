"""The React hooks in headless Chromium: a page bundled by esbuild from npm's react and
react-dom and the taskpush package (tests/js/react_page.jsx), rendered under <StrictMode>,
against a real `run.py`. StrictMode mounts, unmounts and mounts again: the server must see
one socket for the user, never two, though two providers on the page use it; two components
for two tasks both update, and one re-renders only for its own task; the token callback is
asked again before expiry; unmounting one user of the client keeps the socket, unmounting
the last closes it."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import API_KEY, SECRET, make_token
from tests.jsenv import JS_DIR, node_bin, run_node
from tests.procs import ServerProcess, Servers

PRODUCER = {"X-API-Key": API_KEY}
WAIT_MS = 20_000


@pytest.fixture
def bundle(tmp_path: Path) -> str:
    out = tmp_path / "react_page.js"
    done = run_node(node_bin("esbuild"), str(JS_DIR / "react_page.jsx"), "--bundle",
                    "--preserve-symlinks", "--format=iife", "--jsx=automatic",
                    '--define:process.env.NODE_ENV="development"', f"--outfile={out}")
    assert done.returncode == 0, done.stderr
    return out.read_text()


async def metric(http: aiohttp.ClientSession, server: ServerProcess, name: str) -> float:
    async with http.get(server.url + "/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def until_metric(http: aiohttp.ClientSession, server: ServerProcess, name: str,
                       value: float) -> None:
    for _ in range(400):
        if await metric(http, server, name) == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never became {value}: {await metric(http, server, name)}")


async def produce(http: aiohttp.ClientSession, server: ServerProcess, path: str,
                  body: dict[str, Any]) -> None:
    async with http.post(server.url + path, json=body, headers=PRODUCER) as resp:
        assert resp.status in (200, 201), await resp.text()


async def test_strict_mode_one_socket_per_user_updates_and_close(
        browser: Any, servers: Servers, bundle: str) -> None:
    server = servers("--jwt-secret", SECRET, "--api-key", API_KEY, "--access-log", "false")
    await asyncio.to_thread(server.start)
    async with aiohttp.ClientSession() as http:
        for task_id in ("a", "b"):
            await produce(http, server, "/api/task/tasks",
                          {"task_id": task_id, "user_id": 1, "task_type": "t"})
        page = await (await browser.new_context()).new_page()
        errors: list[Any] = []
        page.on("pageerror", lambda err: errors.append(err))
        await page.goto(server.url + "/")  # the server's origin: sockets to it are allowed
        await page.add_script_tag(content=bundle)
        # a token 70 s from its end: the server says `token_expiring` about 10 s from now
        await page.evaluate("(token) => window.__mount(1, token)", make_token(1, ttl=70))

        a = page.get_by_test_id("task-a")
        b = page.get_by_test_id("task-b")
        from playwright.async_api import expect
        await expect(page.get_by_test_id("connection")).to_have_text("websocket",
                                                                    timeout=WAIT_MS)
        await expect(a).to_have_attribute("data-status", "pending", timeout=WAIT_MS)
        await expect(b).to_have_attribute("data-status", "pending", timeout=WAIT_MS)
        # StrictMode's double mount opened one socket, not two (accepted counts every one)
        assert await metric(http, server, "taskpush_websocket_connections") == 1
        assert await metric(http, server, "taskpush_websocket_accepted_total") == 1
        assert await page.evaluate("window.__tokenCalls") == 1

        renders_b = await page.evaluate("window.__renders.b")
        for progress in (10, 20, 30):
            await produce(http, server, "/api/task/task/a/events",
                          {"status": "progress", "progress": progress})
        await expect(a).to_have_attribute("data-progress", "30", timeout=WAIT_MS)
        assert await page.evaluate("window.__renders.b") == renders_b  # not its task
        # the token callback is asked again before the token expires (a refresh on the
        # same socket: still one accepted)
        await page.evaluate("(token) => { window.__token = token; }", make_token(1))
        await page.wait_for_function("() => window.__tokenCalls >= 2", timeout=WAIT_MS)
        assert await metric(http, server, "taskpush_websocket_accepted_total") == 1

        # one of the two users of the client goes: the same socket stays and delivers
        await page.evaluate("window.__hide('a')")
        await expect(page.get_by_test_id("gone-a")).to_be_visible()
        await produce(http, server, "/api/task/task/b/events",
                      {"status": "progress", "progress": 40})
        await expect(b).to_have_attribute("data-progress", "40", timeout=WAIT_MS)
        await produce(http, server, "/api/task/task/b/events", {"status": "completed"})
        await expect(b).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
        assert await metric(http, server, "taskpush_websocket_connections") == 1
        assert await metric(http, server, "taskpush_websocket_accepted_total") == 1
        # the last one goes: the socket is closed
        await page.evaluate("window.__hide('b')")
        await expect(page.get_by_test_id("gone-b")).to_be_visible()
        await until_metric(http, server, "taskpush_websocket_connections", 0)
        assert await metric(http, server, "taskpush_websocket_accepted_total") == 1
        assert not errors, errors
