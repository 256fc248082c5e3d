"""The naive baseline: the server a typical developer writes first with aiohttp + aiosqlite.

Same protocol subset as bench/relay.py (register, single event, batch events, the WebSocket
with `connected`, `active_tasks` and `task_status`). Tasks are kept in a dict (rebuilt from
the database at start); every event is one ``INSERT`` into the history and a ``COMMIT``,
awaited before the reply and the push; a batch is a loop over the same code. stdlib
``json``, the default event loop and aiohttp's defaults (``web.run_app``), SQLite in WAL
mode with ``synchronous=NORMAL`` (the same durability as taskpush). It does not import
``server``.

    python -m bench.naive --port 8002 --db naive.db --api-key K --jwt-secret S
"""

from __future__ import annotations

import argparse
import contextlib
import json
import uuid
from datetime import UTC, datetime

import aiosqlite
import jwt
from aiohttp import web

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

db_key = web.AppKey("db", aiosqlite.Connection)
tasks_key = web.AppKey("tasks", dict)
sockets_key = web.AppKey("sockets", dict)
config_key = web.AppKey("config", dict)


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def reply(data, status: int = 200) -> web.Response:
    return web.json_response({"code": 0, "message": "success", "data": data}, status=status)


def error(status: int, message: str) -> web.Response:
    return web.json_response({"code": status, "message": message, "data": None}, status=status)


def check_key(request: web.Request) -> None:
    if request.headers.get("X-API-Key") != request.app[config_key]["api_key"]:
        raise web.HTTPUnauthorized(text='{"code":401,"message":"bad api key","data":null}',
                                   content_type="application/json")


async def push(app: web.Application, task: dict) -> None:
    for ws in list(app[sockets_key].get(task["user_id"], ())):
        with contextlib.suppress(ConnectionError):
            await ws.send_json({"type": "task_status", **task})


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
    db = app[db_key]
    cur = await db.execute(
        "INSERT INTO events (task_id, status, progress, message, created_at) "
        "VALUES (?, ?, ?, ?, ?)", (task_id, status, progress, event.get("message"), stamp))
    await db.commit()
    task.update(status=status, progress=progress, message=event.get("message"),
                updated_at=stamp, seq=cur.lastrowid)
    await push(app, task)
    return 200, task


async def register(request: web.Request) -> web.Response:
    check_key(request)
    body = await request.json()
    try:
        user_id = int(body["user_id"])
        task_type = str(body["task_type"])
    except (KeyError, TypeError, ValueError):
        return error(400, "need user_id and task_type")
    task_id = body.get("task_id") or f"{task_type}_{uuid.uuid4().hex[:12]}"
    tasks = request.app[tasks_key]
    if task_id in tasks:
        return error(409, "task exists")
    stamp = now()
    db = request.app[db_key]
    await db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?)",
                     (task_id, user_id, task_type, stamp))
    cur = await db.execute(
        "INSERT INTO events (task_id, status, progress, message, created_at) "
        "VALUES (?, 'pending', 0, NULL, ?)", (task_id, stamp))
    await db.commit()
    task = {"task_id": task_id, "user_id": user_id, "task_type": task_type,
            "status": "pending", "progress": 0, "message": None, "created_at": stamp,
            "updated_at": stamp, "seq": cur.lastrowid}
    tasks[task_id] = task
    await push(request.app, task)
    return reply(task, 201)


async def task_event(request: web.Request) -> web.Response:
    check_key(request)
    try:
        event = await request.json()
    except json.JSONDecodeError:
        return error(400, "invalid JSON")
    if not isinstance(event, dict):
        return error(400, "expected an object")
    code, result = await apply_event(request.app, request.match_info["task_id"], event)
    return reply(result) if code == 200 else error(code, result)


async def batch_events(request: web.Request) -> web.Response:
    check_key(request)
    try:
        events = (await request.json())["events"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return error(400, "need events")
    results = []
    for event in events:
        task_id = event.get("task_id")
        code, result = await apply_event(request.app, task_id, event)
        if code == 200:
            results.append({"task_id": task_id, "ok": True, "seq": result["seq"]})
        else:
            results.append({"task_id": task_id, "ok": False, "code": code, "message": result})
    return reply({"results": results})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    user_id = request.match_info["user_id"]
    try:
        claims = jwt.decode(request.query.get("token", ""),
                            request.app[config_key]["jwt_secret"], algorithms=["HS256"])
    except jwt.PyJWTError:
        await ws.close(code=4401, message=b"invalid token")
        return ws
    if str(claims.get("sub")) != user_id:
        await ws.close(code=4403, message=b"forbidden")
        return ws
    uid = int(user_id)
    sockets = request.app[sockets_key].setdefault(uid, set())
    sockets.add(ws)
    try:
        await ws.send_json({"type": "connected", "connection_id": str(uuid.uuid4()),
                            "timestamp": now()})
        tasks = [t for t in request.app[tasks_key].values()
                 if t["user_id"] == uid and t["status"] in ACTIVE]
        await ws.send_json({"type": "active_tasks", "tasks": tasks, "count": len(tasks)})
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT and msg.data == '{"type":"ping"}':
                await ws.send_json({"type": "pong", "timestamp": now()})
    finally:
        sockets.discard(ws)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def database(app: web.Application):
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
    args = ap.parse_args(argv)
    web.run_app(make_app({"db": args.db, "api_key": args.api_key,
                          "jwt_secret": args.jwt_secret}), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
