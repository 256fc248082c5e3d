"""The proxy configurations of docs/cluster.md, run for real in front of two nodes.

Debian's nginx and HAProxy (`.ci/run` installs them) with examples/cluster/nginx.conf and
examples/cluster/haproxy.cfg, the files docs/cluster.md shows (a test checks the doc holds
them verbatim), only the addresses changed to this test's ports. Through the proxy, a
WebSocket receives a change produced through the other node; then the node that holds it is
killed and the client reconnects through the proxy with `since`, missing nothing. And the
demo page in Chromium keeps working through nginx while one node is killed.

Skipped on a developer machine without the proxy, PostgreSQL or Chromium; a failure in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster_support import (
    PRODUCER,
    TIMEOUT,
    TOKEN_FLAGS,
    Watcher,
    bearer,
    event,
    eventually,
    post,
    register,
    user_token,
)
from tests.procs import ROOT, ServerProcess, Servers, free_port

EXAMPLES = ROOT / "examples" / "cluster"
DOC = ROOT / "docs" / "cluster.md"
QUIET = ("--access-log", "false", "--log-level", "warning")


def binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                   else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed on this machine")
    return found


def render(text: str, listen: int, nodes: list[ServerProcess]) -> str:
    """The example with this test's ports: the listen address and one line per node (the
    example's two node lines are 127.0.0.1:8001 and :8002)."""
    assert "127.0.0.1:8080" in text and "127.0.0.1:8001" in text and "127.0.0.1:8002" in text
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{listen}")
    for k, node in enumerate(nodes):
        text = text.replace(f"127.0.0.1:800{k + 1}", f"127.0.0.1:{node.port}")
    return text


class Proxy:
    """nginx or HAProxy as a subprocess on a free port, from the documented file."""

    def __init__(self, kind: str, workdir: Path, nodes: list[ServerProcess]) -> None:
        self.kind = kind
        self.port = free_port()
        self.dir = workdir / kind
        self.dir.mkdir()
        self.log = self.dir / "proxy.log"
        if kind == "nginx":
            conf = self.dir / "nginx.conf"
            conf.write_text(render((EXAMPLES / "nginx.conf").read_text(), self.port, nodes))
            self.cmd = [binary("nginx"), "-p", str(self.dir), "-c", str(conf), "-g",
                        f"daemon off; pid {self.dir / 'nginx.pid'};"]
        else:
            conf = self.dir / "haproxy.cfg"
            conf.write_text(render((EXAMPLES / "haproxy.cfg").read_text(), self.port, nodes))
            self.cmd = [binary("haproxy"), "-f", str(conf), "-db"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, f"{self.kind} exited:\n{self.log.read_text()}"
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"{self.kind} not up:\n{self.log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for proxy in made:
        proxy.stop()


def test_the_doc_shows_the_tested_configurations() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for name in ("nginx.conf", "haproxy.cfg"):
        text = (EXAMPLES / name).read_text(encoding="utf-8").strip()
        assert text in doc, f"docs/cluster.md does not show examples/cluster/{name} verbatim"
        directives = [line.split("#", 1)[0] for line in text.splitlines()]
        sticky = [d for d in directives if re.search(r"\b(ip_hash|hash|sticky|stick|"
                                                      r"stick-table|cookie|balance source)\b", d)]
        assert not sticky, f"{name}: no stickiness: {sticky}"


async def holder(session: aiohttp.ClientSession, nodes: list[ServerProcess]
                 ) -> tuple[ServerProcess, ServerProcess]:
    """(the node holding our one socket, the other one), from each node's /healthz."""
    async def counts() -> list[int] | None:
        out = []
        for node in nodes:
            async with session.get(node.url + "/healthz") as resp:
                out.append((await resp.json())["connections"])
        return out if sorted(out) == [0, 1] else None

    found = await eventually(counts, 10, "one node holds the socket")
    k = found.index(1)
    return nodes[k], nodes[1 - k]


async def sse_events(resp: aiohttp.ClientResponse) -> Any:
    """(event, data) of a text/event-stream, as they arrive."""
    kind, data = None, None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif not line and kind is not None:
            yield kind, data
            kind, data = None, None


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
async def test_through_the_proxy_sse_and_long_polls_flow_unbuffered(
        servers: Servers, pg_url: str, proxies: list[Proxy], tmp_path: Path,
        kind: str) -> None:
    """A Server-Sent Events stream and a long poll through the proxy, each released by a
    change made through a node (any node: the proxy picked theirs): the documented
    configuration does not buffer them."""
    nodes = servers.cluster(pg_url, *TOKEN_FLAGS, *QUIET)
    for node in nodes:
        await asyncio.to_thread(node.start)
    proxy = Proxy(kind, tmp_path, nodes)
    proxies.append(proxy)
    await asyncio.to_thread(proxy.start)
    token = user_token(1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        task = await register(session, proxy.url, "streamed")
        async with session.get(f"{proxy.url}/api/task/stream?token={token}") as stream:
            assert stream.status == 200
            events = sse_events(stream)
            assert (await asyncio.wait_for(anext(events), 10))[0] == "connected"
            # a change committed before the snapshot is read comes in it, not after it
            assert (await asyncio.wait_for(anext(events), 10))[0] == "active_tasks"
            for node in nodes:  # a change through each node, each pushed at once
                done = await event(session, node.url, "streamed", status="progress",
                                   progress=10 + nodes.index(node))
                while True:
                    name, data = await asyncio.wait_for(anext(events), 10)
                    if name == "task_status" and data["seq"] == done["seq"]:
                        break

        etag = f'"{done["seq"]}"'
        held = {**bearer(token), "If-None-Match": etag}
        url = f"{proxy.url}/api/task/task/streamed/status"
        async with session.get(url + "?wait=1", headers=held) as resp:
            assert resp.status == 304  # held for its second by a node, through the proxy
        poll = asyncio.create_task(session.get(url + "?wait=30", headers=held))
        async with session.get(proxy.url + "/healthz") as resp:  # a round trip meanwhile
            assert resp.status == 200
        assert not poll.done()
        changed = await event(session, nodes[0].url, "streamed", status="completed")
        async with await asyncio.wait_for(poll, 20) as resp:
            assert resp.status == 200
            assert (await resp.json())["data"]["seq"] == changed["seq"]
        assert changed["seq"] > task["seq"]


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
async def test_through_the_proxy_a_change_via_the_other_node_and_a_node_killed(
        servers: Servers, pg_url: str, proxies: list[Proxy], tmp_path: Path,
        kind: str) -> None:
    nodes = servers.cluster(pg_url, *TOKEN_FLAGS, *QUIET)
    for node in nodes:
        await asyncio.to_thread(node.start)
    proxy = Proxy(kind, tmp_path, nodes)
    proxies.append(proxy)
    await asyncio.to_thread(proxy.start)
    token = user_token(1)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for task_id in ("via_other", "while_down", "after"):
            await register(session, proxy.url, task_id)
        # a producer batch of about 200 KB goes through too
        batch = [{"task_id": "via_other", "status": "progress", "progress": k % 40,
                  "message": "m" * 600} for k in range(300)]
        results = (await post(session, f"{proxy.url}/api/task/events", {"events": batch},
                              PRODUCER))["results"]
        assert all(r["ok"] for r in results)
        client = Watcher(session, 1, token)
        await client.connect(proxy.ws_url)
        held, other = await holder(session, nodes)

        changed = await event(session, other.url, "via_other", status="progress", progress=50)
        await client.wait_for(lambda w: w.has("via_other", "progress", changed["seq"]), 10,
                              "a change through the other node, pushed through the proxy")

        await asyncio.to_thread(held.kill)
        await asyncio.wait_for(client.ended.wait(), 10)
        # while the client is away: a change it must not miss, through the survivor
        missed = await event(session, other.url, "while_down", status="completed",
                             result={"ok": True})
        await client.connect(proxy.ws_url)  # the same address: the proxy picks the survivor
        later = await post(session, f"{proxy.url}/api/task/task/after/events",
                           {"status": "running"}, PRODUCER)
        await client.wait_for(
            lambda w: w.has("while_down", "completed", missed["seq"])
            and w.has("after", "running", later["seq"]), 15,
            "resumed with since through the proxy: nothing missed")
        client.assert_increasing()
        assert client.connects == 2
        await client.close()


async def test_demo_page_through_nginx_keeps_working_while_a_node_is_killed(
        servers: Servers, pg_url: str, proxies: list[Proxy], tmp_path: Path) -> None:
    from tests.browser_support import expect, open_demo
    from tests.jsenv import chromium

    nodes = servers.cluster(pg_url, "--api-key", "browser-producer-key-0123456789",
                            "--demo-task-seconds", "3", *QUIET)
    for node in nodes:
        await asyncio.to_thread(node.start)
    proxy = Proxy("nginx", tmp_path, nodes)
    proxies.append(proxy)
    await asyncio.to_thread(proxy.start)
    async for browser in chromium():
        demo = await open_demo(browser, proxy, tmp_path)  # type: ignore[arg-type]
        await demo.page.evaluate("window.__sameDocument = true")
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            held, survivor = await holder(session, nodes)
            await asyncio.to_thread(held.kill)
            # the page's socket came back through nginx, on the survivor
            await eventually(lambda s=survivor: _connections(session, s, 1), 30,
                             "the page reconnected to the survivor")
        await expect(demo.conn).to_have_text("connected")
        job = await demo.start("success")  # served by the survivor
        await expect(demo.card(job)).to_have_attribute("data-status", "completed")
        assert await demo.page.evaluate("window.__sameDocument") is True
        await demo.shot("cluster-node-killed")
        demo.assert_no_page_errors()


async def _connections(session: aiohttp.ClientSession, node: ServerProcess, n: int) -> bool:
    async with session.get(node.url + "/healthz") as resp:
        return (await resp.json())["connections"] == n
