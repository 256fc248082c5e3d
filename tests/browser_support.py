"""The demo page in a real browser, for the modules that drive it (tests/test_browser.py,
tests/test_cluster_proxy.py): Playwright's `expect` with a generous timeout, and `Demo`, one
logged-in tab. Importing it skips the importing module when Playwright is not installed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ServerProcess

pw = pytest.importorskip("playwright.async_api",
                         reason="the playwright package is not installed (pip install playwright)")

WAIT_MS = 20_000  # generous: two noisy cores, a browser and a server
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

expect = pw.expect
expect.set_options(timeout=WAIT_MS)


@dataclass
class Demo:
    """One browser tab on the demo page, logged in."""

    page: Any
    shots: Path
    errors: list[Any] = field(default_factory=list)

    @property
    def conn(self) -> Any:
        return self.page.get_by_test_id("conn-state")

    def card(self, task_id: str) -> Any:
        return self.page.locator(f'[data-testid="task-card"][data-task-id="{task_id}"]')

    def progress(self, task_id: str) -> Any:
        return self.card(task_id).get_by_test_id("progress")

    async def login(self, user_id: int) -> None:
        await self.page.get_by_test_id("login-user").fill(str(user_id))
        await self.page.get_by_test_id("login-button").click()
        await expect(self.conn).to_have_text("connected")
        await expect(self.page.get_by_test_id("start-success")).to_be_enabled()

    async def start(self, kind: str) -> str:
        """Click a start button; the id of the task the server created."""
        def is_start(resp: Any) -> bool:
            return resp.url.endswith("/api/demo/tasks") and resp.request.method == "POST"

        async with self.page.expect_response(is_start) as info:
            await self.page.get_by_test_id(f"start-{kind}").click()
        resp = await info.value
        assert resp.status == 201, await resp.text()
        task_id: str = (await resp.json())["data"]["task_id"]
        await expect(self.card(task_id)).to_be_visible()
        return task_id

    async def shot(self, name: str, full_page: bool = True) -> Path:
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def assert_no_page_errors(self) -> None:
        assert not self.errors, f"uncaught errors in the page: {self.errors}"


async def open_demo(browser: Any, server: ServerProcess, shots: Path, *, user_id: int = 1,
                    viewport: dict[str, int] | None = None) -> Demo:
    """A new browser context (its own storage: like another browser) on the page, logged in."""
    context = await browser.new_context(viewport=viewport or DESKTOP, color_scheme="light")
    page = await context.new_page()
    demo = Demo(page, shots)
    page.on("pageerror", lambda err: demo.errors.append(err))
    await page.goto(server.url + "/")
    await demo.login(user_id)
    return demo
