"""Floods of WebSocket control frames: a ping or an unsolicited pong
counts against the socket's message budget like a text message, so a client sending them
in a tight loop is closed with 1008 after a bounded number of answers; the pong that
answers the server's own keepalive ping is free, so keepalive works under any limit."""

from __future__ import annotations

import asyncio
import struct

import pytest
from aiohttp import WSMsgType

from tests.conftest import MakeClient, handshake, ws_connect
from tests.support import raw_socket

pytestmark = pytest.mark.slow  # each flood takes seconds to be judged and closed

LIMITS = {"rate_limit": 5, "rate_burst": 5, "flood_strikes": 10}


def flood_and_read(port: int, opcode: int, frames: int) -> tuple[dict[int, int], int | None]:
    """Send `frames` masked empty control frames at once, then read until the server's close
    frame: (frames received by opcode, close code or None if the server never closed)."""
    sock = raw_socket(port, 1)
    try:
        sock.sendall(bytes((0x80 | opcode, 0x80, 0, 0, 0, 0)) * frames)
        counts: dict[int, int] = {}
        buf = b""
        while True:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionError):
                return counts, None
            if not data:
                return counts, None
            buf += data
            while len(buf) >= 2:
                op, size, head = buf[0] & 0x0F, buf[1] & 0x7F, 2
                if size == 126:
                    if len(buf) < 4:
                        break
                    size, head = struct.unpack("!H", buf[2:4])[0], 4
                elif size == 127:
                    if len(buf) < 10:
                        break
                    size, head = struct.unpack("!Q", buf[2:10])[0], 10
                if len(buf) < head + size:
                    break
                payload, buf = buf[head:head + size], buf[head + size:]
                counts[op] = counts.get(op, 0) + 1
                if op == 0x8:
                    return counts, struct.unpack("!H", payload[:2])[0]
    finally:
        sock.close()


async def test_a_ping_flood_is_closed_1008_after_a_bounded_number_of_pongs(
        make_client: MakeClient) -> None:
    client = await make_client(**LIMITS)
    port = client.server.port
    counts, code = await asyncio.get_running_loop().run_in_executor(
        None, flood_and_read, port, 0x9, 20_000)
    assert code == 1008, (counts, code)
    # the burst is answered, the rest is not: 5 tokens, plus what refills in the meantime
    assert counts.get(0xA, 0) <= 10, counts


async def test_an_unsolicited_pong_flood_is_closed_1008(make_client: MakeClient) -> None:
    client = await make_client(**LIMITS)
    counts, code = await asyncio.get_running_loop().run_in_executor(
        None, flood_and_read, client.server.port, 0xA, 20_000)
    assert code == 1008, (counts, code)


async def test_pings_through_a_client_library_are_limited_too(make_client: MakeClient
                                                              ) -> None:
    client = await make_client(**LIMITS)
    ws = await ws_connect(client, 1, autoping=False)
    await handshake(ws)
    for _ in range(200):
        await ws.ping()
    pongs = 0
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type == WSMsgType.PONG:
            pongs += 1
        elif msg.type == WSMsgType.TEXT:
            continue  # the one rate_limited error
        else:
            break
    assert msg.type == WSMsgType.CLOSE and msg.data == 1008, (msg.type, msg.data)
    assert 1 <= pongs <= 10
    # the flooder's later frames are not read: the server drops it after the close frame
    await ws.close()


async def test_keepalive_pongs_are_free_and_occasional_pings_answered(
        make_client: MakeClient) -> None:
    """Tighter limits than keepalive needs: every server ping is answered and the socket
    stays open, and a client's own ping now and then still gets its pong."""
    client = await make_client(rate_limit=1, rate_burst=2, flood_strikes=2,
                               ping_interval=0.05, ping_timeout=5)
    ws = await ws_connect(client, 1, autoping=False)
    await handshake(ws)
    answered = 0
    while answered < 20:  # 20 server pings, each answered: 20 pongs in about a second
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.PING, (msg.type, msg.data)
        await ws.pong(msg.data)
        answered += 1
    await ws.ping(b"mine")
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type == WSMsgType.PING:
            await ws.pong(msg.data)
            continue
        assert msg.type == WSMsgType.PONG and msg.data == b"mine", (msg.type, msg.data)
        break
    await ws.send_json({"type": "ping"})
    while (msg := await ws.receive(timeout=5)).type == WSMsgType.PING:
        await ws.pong(msg.data)
    assert msg.type == WSMsgType.TEXT and '"pong"' in msg.data, (msg.type, msg.data)
    await ws.close()


