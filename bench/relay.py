"""The baseline: the thinnest aiohttp relay that speaks taskpush's protocol subset.

No database, no history, no coalescing, no access log: tasks live in a dict, each change
is pushed to every WebSocket of the task's user. taskpush is measured against this.

    python -m bench.relay --port 8001 --api-key K --jwt-secret S
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import uuid
from datetime import UTC, datetime

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import contextlib

import jwt
import orjson
from aiohttp import WSMsgType, web

from bench.common import install_uvloop, raise_nofile

ACTIVE = frozenset({"pending", "running", "progress"})
TERMINAL = frozenset({"completed", "failed", "cancelled"})
STATES = ACTIVE | TERMINAL
FIELDS = ("message", "step", "result", "error", "error_type")
JSON = "application/json"
TEXT = WSMsgType.TEXT


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def ok(data, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps({"code": 0, "message": "success", "data": data}),
        status=status,
        content_type=JSON,
    )


def fail(status: int, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"code": status, "message": message, "data": None}),
        status=status,
        content_type=JSON,
    )


class Relay:
    def __init__(self, api_key: str | None, secret: str):
        self.api_key = api_key.encode() if api_key else None
        self.secret = secret
        self.tasks: dict[str, dict] = {}
        self.by_user: dict[int, dict[str, dict]] = {}
        self.sockets: dict[int, set[web.WebSocketResponse]] = {}
        self.subscribers: dict[str, set[web.WebSocketResponse]] = {}
        self.seq = 0
        self.counter = 0
        self.epoch = uuid.uuid4().hex

    # ---- helpers -------------------------------------------------------------------
    def producer_denied(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return fail(403, "producer API disabled")
        given = request.headers.get("X-API-Key", "").encode()
        if not hmac.compare_digest(given, self.api_key):
            return fail(401, "bad api key")
        return None

    def apply(self, task: dict, ev: dict) -> tuple[int, str]:
        status = ev.get("status")
        if status not in STATES:
            return 400, "invalid status"
        if task["status"] in TERMINAL:
            return 409, "task already finished"
        progress = ev.get("progress")
        if progress is not None:
            if not isinstance(progress, int | float) or not 0 <= progress <= 100:
                return 400, "invalid progress"
            task["progress"] = progress
        elif status == "completed":
            task["progress"] = 100
        task["status"] = status
        for f in FIELDS:
            if f in ev:
                task[f] = ev[f]
        task["updated_at"] = now_iso()
        self.seq += 1
        task["seq"] = self.seq
        return 0, ""

    async def push(self, task: dict) -> None:
        socks = self.sockets.get(task["user_id"])
        subs = self.subscribers.get(task["task_id"])
        if subs:
            socks = (socks or set()) | subs
        if not socks:
            return
        frame = orjson.dumps({"type": "task_status", **task})
        for ws in tuple(socks):
            if ws.closed:
                continue
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_frame(frame, TEXT)

    # ---- WebSocket -----------------------------------------------------------------
    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024)
        await ws.prepare(request)
        uid_s = request.match_info["user_id"]
        token = request.query.get("token")
        if not token:
            await ws.close(code=4401, message=b"missing token")
            return ws
        try:
            claims = jwt.decode(token, self.secret, algorithms=["HS256"], leeway=30)
        except jwt.ExpiredSignatureError:
            await ws.close(code=4401, message=b"token expired")
            return ws
        except jwt.PyJWTError:
            await ws.close(code=4401, message=b"invalid token")
            return ws
        if str(claims.get("sub")) != uid_s or not uid_s.isdigit():
            await ws.close(code=4403, message=b"forbidden")
            return ws
        uid = int(uid_s)
        admin = claims.get("role") == "admin"
        mine: set[str] = set()
        active = [t for t in self.by_user.get(uid, {}).values() if t["status"] in ACTIVE]
        hello = orjson.dumps(
            {
                "type": "connected",
                "connection_id": str(uuid.uuid4()),
                "message": "connected",
                "timestamp": now_iso(),
                "epoch": self.epoch,
                "seq": self.seq,
            }
        )
        snapshot = orjson.dumps({"type": "active_tasks", "tasks": active, "count": len(active)})
        # Register before the first await so no change made meanwhile is missed.
        socks = self.sockets.setdefault(uid, set())
        socks.add(ws)
        try:
            await ws.send_frame(hello, TEXT)
            await ws.send_frame(snapshot, TEXT)
            async for msg in ws:
                if msg.type == TEXT:
                    try:
                        data = orjson.loads(msg.data)
                    except orjson.JSONDecodeError:
                        await ws.send_frame(
                            b'{"type":"error","code":"bad_json","message":"invalid JSON"}', TEXT
                        )
                        continue
                    if isinstance(data, dict) and data.get("type") == "ping":
                        await ws.send_frame(
                            orjson.dumps({"type": "pong", "timestamp": now_iso()}), TEXT
                        )
                    elif isinstance(data, dict) and data.get("type") == "subscribe":
                        await self.subscribe(ws, uid, admin, data.get("task_id"), mine)
                    else:
                        await ws.send_frame(
                            b'{"type":"error","code":"unknown_type","message":"unsupported"}',
                            TEXT,
                        )
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_frame(
                        b'{"type":"error","code":"binary","message":"text frames only"}', TEXT
                    )
        finally:
            socks.discard(ws)
            if not socks and self.sockets.get(uid) is socks:
                del self.sockets[uid]
            for tid in mine:
                self.subscribers.get(tid, set()).discard(ws)
        return ws

    async def subscribe(self, ws: web.WebSocketResponse, uid: int, admin: bool, tid,
                        mine: set[str]) -> None:
        task = self.tasks.get(tid) if isinstance(tid, str) else None
        if task is None or not (admin or task["user_id"] == uid):
            await ws.send_frame(
                b'{"type":"error","code":"forbidden","message":"forbidden"}', TEXT)
            return
        self.subscribers.setdefault(tid, set()).add(ws)
        mine.add(tid)
        await ws.send_frame(orjson.dumps({"type": "subscribed", "task_id": tid}), TEXT)
        await ws.send_frame(orjson.dumps({"type": "task_status", **task}), TEXT)

    # ---- producer REST -------------------------------------------------------------
    async def register(self, request: web.Request) -> web.Response:
        if (denied := self.producer_denied(request)) is not None:
            return denied
        try:
            body = orjson.loads(await request.read())
            user_id = int(body["user_id"])
            task_type = str(body["task_type"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return fail(400, "need user_id and task_type")
        metadata = body.get("metadata")
        task_id = body.get("task_id")
        if not task_id:
            self.counter += 1
            task_id = f"{task_type}_{self.counter}"
        existing = self.tasks.get(task_id)
        if existing is not None:
            same = (existing["user_id"], existing["task_type"], existing["metadata"]) == (
                user_id,
                task_type,
                metadata,
            )
            return ok(existing, 201) if same else fail(409, "task exists")
        now = now_iso()
        self.seq += 1
        task = {
            "task_id": task_id,
            "user_id": user_id,
            "task_type": task_type,
            "status": "pending",
            "progress": 0,
            "message": None,
            "step": None,
            "result": None,
            "error": None,
            "error_type": None,
            "metadata": metadata,
            "created_at": now,
            "updated_at": now,
            "seq": self.seq,
        }
        self.tasks[task_id] = task
        self.by_user.setdefault(user_id, {})[task_id] = task
        await self.push(task)
        return ok(task, 201)

    async def event(self, request: web.Request) -> web.Response:
        if (denied := self.producer_denied(request)) is not None:
            return denied
        task = self.tasks.get(request.match_info["task_id"])
        if task is None:
            return fail(404, "task not found")
        try:
            ev = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return fail(400, "invalid JSON")
        if not isinstance(ev, dict):
            return fail(400, "expected an object")
        code, why = self.apply(task, ev)
        if code:
            return fail(code, why)
        await self.push(task)
        return ok(task)

    async def batch(self, request: web.Request) -> web.Response:
        if (denied := self.producer_denied(request)) is not None:
            return denied
        try:
            events = orjson.loads(await request.read())["events"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return fail(400, "need events")
        if not isinstance(events, list) or len(events) > 1000:
            return fail(400, "events must be a list of at most 1000")
        results, changed = [], []
        for ev in events:
            tid = ev.get("task_id") if isinstance(ev, dict) else None
            task = self.tasks.get(tid) if isinstance(tid, str) else None
            if task is None:
                results.append({"task_id": tid, "ok": False, "code": 404, "message": "not found"})
                continue
            code, why = self.apply(task, ev)
            if code:
                results.append({"task_id": tid, "ok": False, "code": code, "message": why})
                continue
            results.append({"task_id": tid, "ok": True, "seq": task["seq"]})
            changed.append(dict(task))
        for task in changed:
            await self.push(task)
        return ok({"results": results})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def make_app(api_key: str | None, secret: str) -> web.Application:
    relay = Relay(api_key, secret)
    app = web.Application()
    app.router.add_get("/api/task/ws/task/{user_id}", relay.ws_handler)
    app.router.add_post("/api/task/tasks", relay.register)
    app.router.add_post("/api/task/task/{task_id}/events", relay.event)
    app.router.add_post("/api/task/events", relay.batch)
    app.router.add_get("/healthz", relay.healthz)
    return app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--api-key", default=os.environ.get("TASKPUSH_API_KEY"))
    ap.add_argument("--jwt-secret", default=os.environ.get("TASKPUSH_JWT_SECRET", "relay-secret"))
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args(argv)
    raise_nofile()
    if not args.no_uvloop:
        install_uvloop()
    web.run_app(
        make_app(args.api_key, args.jwt_secret),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=2.0,
    )


if __name__ == "__main__":
    main()
