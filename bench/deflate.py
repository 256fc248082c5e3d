"""What permessage-deflate would cost and buy, measured with a real Chromium client.

taskpush declines permessage-deflate (server/ws.py): every update is framed once and the same
bytes are written to every socket. This measures the alternative on the same frames: an
aiohttp server (a subprocess, so its CPU is its own) pushes taskpush `task_status` messages
to K WebSockets opened by headless Chromium (which offers deflate, as every browser does),
once with aiohttp's `compress=True` (one zlib stream per socket) and once with
`compress=False`, and reports per mode: server CPU per message delivered, bytes written to the
sockets per message, and the server's RSS growth per connected socket.

    python -m bench.deflate [--sockets 200] [--messages 300]

Needs Debian's chromium (/usr/bin/chromium) and playwright (PyPI); the browser is never
downloaded. Figures: docs/performance.md, "permessage-deflate".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson
from aiohttp import web

from bench.common import raise_nofile

PAGE = """<!doctype html><meta charset=utf-8><title>deflate</title><script>
async function open_sockets(url, k) {
  window.got = 0; window.chars = 0; window.socks = [];
  await Promise.all(Array.from({length: k}, () => new Promise((ok, bad) => {
    const ws = new WebSocket(url);
    ws.onmessage = (e) => { window.got += 1; window.chars += e.data.length; };
    ws.onopen = () => ok(); ws.onerror = bad; window.socks.push(ws);
  })));
  return window.socks.map((s) => s.extensions);
}
</script>"""


def _message(i: int) -> bytes:
    """A progress update shaped like taskpush's (SPEC `task_status`), a little different
    each time as real ones are."""
    return orjson.dumps({"type": "task_status", "task": {
        "task_id": f"interview_questions_{1000 + i % 50}", "user_id": 7,
        "task_type": "interview_questions", "status": "progress",
        "progress": round(i % 100 + 0.5, 1),
        "message": f"Generating question {i % 8 + 1} of 8", "step": "generate",
        "result": None, "error": None, "error_type": None,
        "metadata": {"job_id": f"job-{i % 50:04d}", "role": "backend engineer",
                     "resume_id": "r-2b7c"},
        "created_at": "2026-12-06T07:00:00.000Z",
        "updated_at": f"2026-12-06T07:{i // 60 % 60:02d}:{i % 60:02d}.123Z",
        "seq": 100_000 + i, "cancel_requested": False}})


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def serve(port: int, compress: bool) -> None:
    """The server subprocess: /page, /ws, /push?n=N (push N messages to every socket,
    answer CPU seconds and bytes written), /rss."""
    sockets: list[web.WebSocketResponse] = []
    written = [0]

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=compress)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        write = transport.write

        def counting_write(data: Any) -> None:
            written[0] += len(data)
            write(data)

        transport.write = counting_write  # type: ignore[method-assign]
        sockets.append(ws)
        async for _ in ws:
            pass
        return ws

    async def push(request: web.Request) -> web.Response:
        n = int(request.query["n"])
        texts = [_message(i).decode() for i in range(n)]
        written[0] = 0
        start = time.process_time()
        for text in texts:
            for ws in sockets:
                await ws.send_str(text)
        cpu = time.process_time() - start
        return web.json_response({"cpu": cpu, "bytes": written[0],
                                  "payload": sum(map(len, texts)) * len(sockets)})

    async def rss(_: web.Request) -> web.Response:
        return web.json_response({"rss_kb": _rss_kb(), "sockets": len(sockets)})

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/push", push)
    app.router.add_get("/rss", rss)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def _get(port: int, path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


async def measure(compress: bool, sockets: int, messages: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    from tests.procs import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.deflate", "--serve", str(port),
                             "--compress", "1" if compress else "0"])
    try:
        for _ in range(200):
            try:
                base = await _get(port, "/rss")
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the bench server did not start")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=os.environ.get("TASKPUSH_CHROMIUM", "/usr/bin/chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{port}/")
            extensions = await page.evaluate(
                "([u, k]) => open_sockets(u, k)", [f"ws://127.0.0.1:{port}/ws", sockets])
            connected = await _get(port, "/rss")
            pushed = await _get(port, f"/push?n={messages}")
            await page.wait_for_function(f"window.got >= {sockets * messages}",
                                         timeout=120_000)
            after = await _get(port, "/rss")
            await browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    delivered = sockets * messages
    return {
        "compress": compress,
        "negotiated": sorted(set(extensions)),
        "cpu_us_per_message": pushed["cpu"] / delivered * 1e6,
        "bytes_per_message": pushed["bytes"] / delivered,
        "payload_per_message": pushed["payload"] / delivered,
        "rss_kb_per_socket": (connected["rss_kb"] - base["rss_kb"]) / sockets,
        "rss_kb_per_socket_after_push": (after["rss_kb"] - base["rss_kb"]) / sockets,
    }


async def main(sockets: int, messages: int) -> None:
    results = [await measure(c, sockets, messages) for c in (False, True)]
    off, on = results
    for r in results:
        print(f"compress={r['compress']!s:5}  extensions={r['negotiated']}  "
              f"server CPU {r['cpu_us_per_message']:.1f} us/message  "
              f"{r['bytes_per_message']:.0f} bytes/message on the wire "
              f"(payload {r['payload_per_message']:.0f})  "
              f"RSS {r['rss_kb_per_socket']:.1f} KB/socket connected, "
              f"{r['rss_kb_per_socket_after_push']:.1f} KB/socket after the push")
    print(f"deflate: CPU x{on['cpu_us_per_message'] / off['cpu_us_per_message']:.2f}, "
          f"bytes x{on['bytes_per_message'] / off['bytes_per_message']:.2f}, "
          f"memory per socket after the push "
          f"+{on['rss_kb_per_socket_after_push'] - off['rss_kb_per_socket_after_push']:.1f} KB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compress", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile()
    if args.serve:
        serve(args.serve, bool(args.compress))
    else:
        asyncio.run(main(args.sockets, args.messages))
