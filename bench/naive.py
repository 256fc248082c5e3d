"""The naive baselines: the server a developer writes with aiohttp + aiosqlite, no framework.

Same protocol subset as bench/relay.py (register, single event, batch events, the WebSocket
with `connected`, `active_tasks`, `task_status` and `subscribe`). Tasks are kept in a dict
(rebuilt from the database at start); every event is one ``INSERT`` into the history,
committed before the reply and the push; a batch is a loop over the same code. SQLite in
WAL mode with ``synchronous=NORMAL``, taskpush's own durability (durable across a process
crash; the last commits may be lost on power loss). It does not import ``server``.

Two flavours, one file:

* ``--json orjson`` (the default, the baseline): what a developer who cares writes. orjson
  for every body and frame, each update serialised once for all of its sockets, uvloop, one
  connection in autocommit mode so an event is ONE statement and one thread hop (the
  ``INSERT`` is its own transaction), statements prepared once and reused (sqlite3's
  statement cache, sized explicitly), no access log.
* ``--json stdlib``: the first version anyone writes, kept to report once against the
  careful one: stdlib ``json`` (``send_json`` per socket), the default event loop,
  aiohttp's defaults (``web.run_app``, its access log), ``INSERT`` then ``COMMIT``.

    python -m bench.naive --port 8002 --db naive.db --api-key K --jwt-secret S
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import uuid
from datetime import UTC, datetime

import aiosqlite
import jwt
import orjson
from aiohttp import WSMsgType, web

ACTIVE = ("pending", "running", "progress")
STATES = {"pending", "running", "progress", "completed", "failed", "cancelled"}
FINISHED = {"completed", "failed", "cancelled"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, user_id INTEGER NOT NULL, task_type TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, status TEXT NOT NULL,
    progress REAL, message TEXT, created_at TEXT NOT NULL);
"""
INSERT_EVENT = ("INSERT INTO events (task_id, status, progress, message, created_at) "
                "VALUES (?, ?, ?, ?, ?)")

db_key = web.AppKey("db", aiosqlite.Connection)
tasks_key = web.AppKey("tasks", dict)
sockets_key = web.AppKey("sockets", dict)
subs_key = web.AppKey("subscribers", dict)
config_key = web.AppKey("config", dict)


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def careful(app: web.Application) -> bool:
    return app[config_key].get("json", "orjson") == "orjson"


def envelope(request: web.Request, body: dict, status: int) -> web.Response:
    if careful(request.app):
        return web.Response(body=orjson.dumps(body), status=status,
                            content_type="application/json")
    return web.json_response(body, status=status)


def reply(request: web.Request, data, status: int = 200) -> web.Response:
    return envelope(request, {"code": 0, "message": "success", "data": data}, status)


def error(request: web.Request, status: int, message: str) -> web.Response:
    return envelope(request, {"code": status, "message": message, "data": None}, status)


async def read_json(request: web.Request):
    """The body as JSON; ValueError when it is not (orjson's and json's errors both are)."""
    if careful(request.app):
        return orjson.loads(await request.read())
    return await request.json()


def check_key(request: web.Request) -> None:
    if request.headers.get("X-API-Key") != request.app[config_key]["api_key"]:
        raise web.HTTPUnauthorized(text='{"code":401,"message":"bad api key","data":null}',
                                   content_type="application/json")


async def push(app: web.Application, task: dict) -> None:
    """Send the update to every socket of the task's user and every socket subscribed to it."""
    targets = set(app[sockets_key].get(task["user_id"], ()))
    targets.update(app[subs_key].get(task["task_id"], ()))
    if not targets:
        return
    if careful(app):
        frame = orjson.dumps({"type": "task_status", **task})
        for ws in targets:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_frame(frame, WSMsgType.TEXT)
        return
    for ws in targets:
        with contextlib.suppress(ConnectionError):
            await ws.send_json({"type": "task_status", **task})


async def insert_event(app: web.Application, row: tuple) -> int:
    """One committed history row; returns its id (the seq)."""
    db = app[db_key]
    if careful(app):  # autocommit: the INSERT is its own transaction, one thread hop
        cur = await db.execute(INSERT_EVENT, row)
        return cur.lastrowid  # type: ignore[return-value]
    cur = await db.execute(INSERT_EVENT, row)
    await db.commit()
    return cur.lastrowid  # type: ignore[return-value]


async def apply_event(app: web.Application, task_id, event: dict) -> tuple[int, dict | str]:
    """Validate, insert the event, commit, then push. Returns (status, task or reason)."""
    task = app[tasks_key].get(task_id)
    if task is None:
        return 404, "task not found"
    status = event.get("status")
    if status not in STATES:
        return 400, "invalid status"
    if task["status"] in FINISHED:
        return 409, "task already finished"
    progress = event.get("progress", task["progress"])
    if not isinstance(progress, int | float) or not 0 <= progress <= 100:
        return 400, "invalid progress"
    stamp = now()
    seq = await insert_event(app, (task_id, status, progress, event.get("message"), stamp))
    task.update(status=status, progress=progress, message=event.get("message"),
                updated_at=stamp, seq=seq)
    await push(app, task)
    return 200, task


async def register(request: web.Request) -> web.Response:
    check_key(request)
    try:
        body = await read_json(request)
        user_id = int(body["user_id"])
        task_type = str(body["task_type"])
    except (KeyError, TypeError, ValueError):
        return error(request, 400, "need user_id and task_type")
    task_id = body.get("task_id") or f"{task_type}_{uuid.uuid4().hex[:12]}"
    tasks = request.app[tasks_key]
    if task_id in tasks:
        return error(request, 409, "task exists")
    stamp = now()
    db = request.app[db_key]
    # Careful flavour: two autocommitted statements (no transaction left open on the one
    # connection that concurrent requests share); a task row with no event yet reads back
    # as pending at start.
    await db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?)",
                     (task_id, user_id, task_type, stamp))
    cur = await db.execute(INSERT_EVENT, (task_id, "pending", 0, None, stamp))
    if not careful(request.app):
        await db.commit()
    task = {"task_id": task_id, "user_id": user_id, "task_type": task_type,
            "status": "pending", "progress": 0, "message": None, "created_at": stamp,
            "updated_at": stamp, "seq": cur.lastrowid}
    tasks[task_id] = task
    await push(request.app, task)
    return reply(request, task, 201)


async def task_event(request: web.Request) -> web.Response:
    check_key(request)
    try:
        event = await read_json(request)
    except ValueError:
        return error(request, 400, "invalid JSON")
    if not isinstance(event, dict):
        return error(request, 400, "expected an object")
    code, result = await apply_event(request.app, request.match_info["task_id"], event)
    return reply(request, result) if code == 200 else error(request, code, result)


async def batch_events(request: web.Request) -> web.Response:
    check_key(request)
    try:
        events = (await read_json(request))["events"]
    except (ValueError, KeyError, TypeError):
        return error(request, 400, "need events")
    results = []
    for event in events:
        task_id = event.get("task_id")
        code, result = await apply_event(request.app, task_id, event)
        if code == 200:
            results.append({"task_id": task_id, "ok": True, "seq": result["seq"]})
        else:
            results.append({"task_id": task_id, "ok": False, "code": code, "message": result})
    return reply(request, {"results": results})


async def send(ws: web.WebSocketResponse, app: web.Application, message: dict) -> None:
    if careful(app):
        await ws.send_frame(orjson.dumps(message), WSMsgType.TEXT)
    else:
        await ws.send_json(message)


async def subscribe(ws: web.WebSocketResponse, app: web.Application, uid: int, admin: bool,
                    task_id, mine: set) -> None:
    task = app[tasks_key].get(task_id) if isinstance(task_id, str) else None
    if task is None or not (admin or task["user_id"] == uid):
        await send(ws, app, {"type": "error", "code": "forbidden", "message": "forbidden"})
        return
    app[subs_key].setdefault(task_id, set()).add(ws)
    mine.add(task_id)
    await send(ws, app, {"type": "subscribed", "task_id": task_id})
    await send(ws, app, {"type": "task_status", **task})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    app = request.app
    user_id = request.match_info["user_id"]
    try:
        claims = jwt.decode(request.query.get("token", ""),
                            app[config_key]["jwt_secret"], algorithms=["HS256"])
    except jwt.PyJWTError:
        await ws.close(code=4401, message=b"invalid token")
        return ws
    if str(claims.get("sub")) != user_id:
        await ws.close(code=4403, message=b"forbidden")
        return ws
    uid = int(user_id)
    admin = claims.get("role") == "admin"
    loads = orjson.loads if careful(app) else json.loads
    sockets = app[sockets_key].setdefault(uid, set())
    sockets.add(ws)
    subscribed: set[str] = set()
    try:
        await send(ws, app, {"type": "connected", "connection_id": str(uuid.uuid4()),
                             "timestamp": now()})
        tasks = [t for t in app[tasks_key].values()
                 if t["user_id"] == uid and t["status"] in ACTIVE]
        await send(ws, app, {"type": "active_tasks", "tasks": tasks, "count": len(tasks)})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                data = loads(msg.data)
            except ValueError:
                continue
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "ping":
                await send(ws, app, {"type": "pong", "timestamp": now()})
            elif kind == "subscribe":
                await subscribe(ws, app, uid, admin, data.get("task_id"), subscribed)
    finally:
        sockets.discard(ws)
        for task_id in subscribed:
            app[subs_key].get(task_id, set()).discard(ws)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def database(app: web.Application):
    if careful(app):
        # One connection; autocommit (isolation_level=None) so a lone INSERT commits by
        # itself; every statement text is prepared once and reused from the cache.
        db = await aiosqlite.connect(app[config_key]["db"], isolation_level=None,
                                     cached_statements=64)
    else:
        db = await aiosqlite.connect(app[config_key]["db"])
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.executescript(SCHEMA)
    await db.commit()
    # The current state of every task: its registration, then its events in order.
    tasks = app[tasks_key]
    async with db.execute("SELECT task_id, user_id, task_type, created_at FROM tasks") as cur:
        async for task_id, user_id, task_type, created in cur:
            tasks[task_id] = {"task_id": task_id, "user_id": user_id, "task_type": task_type,
                              "status": "pending", "progress": 0, "message": None,
                              "created_at": created, "updated_at": created, "seq": 0}
    async with db.execute("SELECT id, task_id, status, progress, message, created_at "
                          "FROM events ORDER BY id") as cur:
        async for seq, task_id, status, progress, message, stamp in cur:
            if task_id in tasks:
                tasks[task_id].update(status=status, progress=progress, message=message,
                                      updated_at=stamp, seq=seq)
    app[db_key] = db
    yield
    await db.close()


def make_app(config: dict) -> web.Application:
    app = web.Application()
    app[config_key] = config
    app[sockets_key] = {}
    app[subs_key] = {}
    app[tasks_key] = {}
    app.cleanup_ctx.append(database)
    app.router.add_post("/api/task/tasks", register)
    app.router.add_post("/api/task/task/{task_id}/events", task_event)
    app.router.add_post("/api/task/events", batch_events)
    app.router.add_get("/api/task/ws/task/{user_id}", websocket)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--db", default="naive.db")
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--jwt-secret", required=True)
    ap.add_argument("--json", choices=("orjson", "stdlib"), default="orjson",
                    help="orjson: the careful server (the baseline); stdlib: the first draft")
    args = ap.parse_args(argv)
    config = {"db": args.db, "api_key": args.api_key, "jwt_secret": args.jwt_secret,
              "json": args.json}
    if args.json == "stdlib":
        web.run_app(make_app(config), host=args.host, port=args.port)
        return
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(config), host=args.host, port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
