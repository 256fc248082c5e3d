"""create_app(config): keys, routes, middlewares and the lifecycle. No I/O of its own until
the app starts, so tests build apps with their own Config and a tmp_path database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .config import Config
from .core.auth import TokenVerifier
from .core.errors import BodyTimeout, StorageUnavailable, TaskPushError, error_envelope
from .core.model import Change
from .push.hub import Hub
from .push.polls import PollSlots
from .push.protocol import CLOSE_TRY_AGAIN, SessionLimits
from .push.snapshot import ByteBudget
from .push.watch import TokenDeadlines, Watched, socket_watch
from .service.notify import task_notification_service
from .service.tasks import INTERRUPTED, TaskService
from .storage.engines import is_postgres, make_store
from .web import demo, keys, producer, rest, sse, ws
from .web.jobs import sweeper_ctx
from .web.metrics import CONTENT_TYPE, Metrics
from .web.openapi import openapi_document

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the one JSON envelope; never a stack trace, never a secret."""
    try:
        return await handler(request)
    except TaskPushError as exc:
        retry_after = getattr(exc, "retry_after", None)  # 503, and 429 of long polls
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        response = web.json_response(error_envelope(exc.status, exc.message, **exc.extra),
                                     status=exc.status, headers=headers)
        if isinstance(exc, BodyTimeout):
            # answer, then close at once: aiohttp would otherwise linger reading the rest
            # of the body (up to 10 s more), which is what the timeout is there to stop
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()  # the transport flushes the answer first
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason
        if exc.status == 413:
            message = "request body too large"
        return web.json_response(error_envelope(exc.status, message), status=exc.status,
                                 headers={k: v for k, v in exc.headers.items()
                                          if k.lower() == "allow"})
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(error_envelope(500, "internal server error"), status=500)


def cors_middleware(origins: tuple[str, ...]) -> tuple[
        Callable[..., Awaitable[web.StreamResponse]],
        Callable[[web.Request, web.StreamResponse], Awaitable[None]]]:
    """The preflight middleware, and the hook that adds the CORS headers as any response's
    headers go out (a streamed one, SSE, sends them before its handler returns)."""
    allow_any = "*" in origins

    def headers_for(request: web.Request) -> dict[str, str] | None:
        origin = request.headers.get("Origin")
        if origin is None or not request.path.startswith("/api/") or not (
                allow_any or origin in origins):
            return None
        return {
            "Access-Control-Allow-Origin": "*" if allow_any else origin,
            "Access-Control-Expose-Headers": "ETag",
            "Vary": "Origin",
        }

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            headers = headers_for(request)
            if headers is not None:
                headers.update({
                    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers":
                        "Authorization, Content-Type, If-None-Match, Last-Event-ID",
                    "Access-Control-Max-Age": "600",
                })
                return web.Response(status=204, headers=headers)
        return await handler(request)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        headers = headers_for(request)
        if headers is not None:
            response.headers.update(headers)

    return cors, on_prepare


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def docs_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "docs.html")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[keys.CONFIG]))


async def healthz(request: web.Request) -> web.Response:
    """503 while the store refuses writes (a state it keeps: this never waits on the
    writer) or reads do not answer within --db-timeout."""
    store = request.app[keys.STORE]
    reason = store.unavailable()
    if reason is None:
        try:
            await asyncio.wait_for(store.ping(), store.timeout)
        except Exception:
            reason = "storage unavailable: the database does not answer reads"
    body = {"status": "ok" if reason is None else "unavailable", "database": reason is None,
            "epoch": store.epoch, "seq": store.last_seq,
            "connections": request.app[keys.HUB].connection_count}
    if reason is None:
        return web.json_response(body)
    body["message"] = reason
    return web.json_response(body, status=503, headers={"Retry-After": "1"})


async def metrics(request: web.Request) -> web.Response:
    metrics_ = request.app[keys.METRICS]
    metrics_.storage_available.set(0 if request.app[keys.STORE].unavailable() else 1)
    return web.Response(body=metrics_.render(),
                        headers={"Content-Type": CONTENT_TYPE})


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the database, wire store -> hub, bind the in-process API, recover jobs."""
    config = app[keys.CONFIG]
    store = app[keys.STORE]
    hub = app[keys.HUB]
    metrics_ = app[keys.METRICS]
    tasks = app[keys.TASKS]

    def on_publish(outcomes: list, local: bool) -> None:
        hub.publish(outcomes)
        if not local:  # another node's commit: a cancel may be of a job running here
            tasks.changes_committed_elsewhere(outcomes)

    def on_feed_lost() -> None:
        """Changes this node can no longer deliver (cluster feed): clients resume by seq."""
        for conn in list(app[keys.SOCKETS]):
            conn.close(CLOSE_TRY_AGAIN, "missed changes: resume")

    store.on_publish = on_publish
    store.on_commit = metrics_.observe_commit
    if hasattr(store, "on_feed_lost"):
        store.on_feed_lost = on_feed_lost
    await store.open()
    if config.jwt_public_key is not None:
        pem = Path(config.jwt_public_key).read_bytes()  # noqa: ASYNC240 (once, at start)
        app[keys.VERIFIER] = TokenVerifier.for_public_key(pem, config.jwt_leeway)
    else:
        secret = config.jwt_secret.reveal() if config.jwt_secret else await store.demo_secret()
        app[keys.VERIFIER] = TokenVerifier.for_secret(secret, config.jwt_leeway)
    recovered = await tasks.interrupt_inprocess("the server stopped while this task ran")
    if recovered:
        log.warning("marked %d in-process task(s) of a previous run as interrupted", recovered)
    task_notification_service.bind(tasks, config.max_json_bytes)
    yield
    task_notification_service.unbind(tasks)
    await store.close()


async def end_gone_nodes_tasks(app: web.Application) -> int:
    """Cluster mode: in-process tasks of a node gone for --node-timeout end failed /
    interrupted (pushed like any change); one node does it (`lead("nodes")`)."""
    store = app[keys.STORE]
    if not await store.lead("nodes"):
        return 0
    gone = await store.gone_nodes_tasks()
    if not gone:
        return 0
    ops = [Change(t.task_id, "failed", error="the node running this task is gone",
                  error_type=INTERRUPTED, expect_seq=t.seq) for t in gone]
    ended = sum(1 for o in await app[keys.TASKS].apply_many(ops) if o.ok)
    if ended:
        log.warning("marked %d in-process task(s) of gone node(s) as interrupted", ended)
    return ended


async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Looks for gone nodes a few times per --node-timeout (SQLite: never any)."""
    interval = app[keys.CONFIG].node_timeout / 3

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await end_gone_nodes_tasks(app)
            except StorageUnavailable:
                pass  # the store logs the outage once; the next round tries again
            except Exception:
                log.exception("ending the tasks of gone nodes failed")

    task = asyncio.create_task(loop(), name="taskpush-cluster")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def on_shutdown(app: web.Application) -> None:
    """Stop serving sockets (1001) and end our in-process jobs as interrupted."""
    await ws.close_all(app[keys.SOCKETS])
    try:
        await app[keys.TASKS].interrupt_inprocess("the server shut down while this task ran")
    except StorageUnavailable as exc:  # the next start marks them (store_ctx)
        log.warning("in-process tasks not marked interrupted at shutdown: %s", exc.message)


def session_limits(config: Config) -> SessionLimits:
    """The per-socket bounds every session of this server shares."""
    return SessionLimits(config.send_queue, config.rate_limit, config.rate_burst,
                         config.flood_strikes, config.max_subscriptions)


def create_app(config: Config) -> web.Application:
    middlewares = [error_middleware]
    cors_prepare = None
    if config.cors_origins:  # no per-request cost when CORS is off (the default)
        cors, cors_prepare = cors_middleware(config.cors_origins)
        middlewares.insert(0, cors)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    if cors_prepare is not None:
        app.on_response_prepare.append(cors_prepare)
    store = make_store(config.db, timeout=config.db_timeout, node_name=config.node,
                       node_timeout=config.node_timeout)
    app[keys.CONFIG] = config
    app[keys.STORE] = store
    app[keys.HUB] = Hub()
    app[keys.POLLS] = PollSlots(config.max_polls_per_user)
    app[keys.METRICS] = Metrics()
    app[keys.TASKS] = TaskService(store, max_active=config.max_active_tasks)
    sockets: set[Watched] = set()
    deadlines = TokenDeadlines(config.jwt_leeway)
    app[keys.SOCKETS] = sockets
    app[keys.SNAPSHOT_BUDGET] = ByteBudget(config.snapshot_memory)
    app[keys.DEADLINES] = deadlines
    app[keys.DEMO_RUNNERS] = set()
    # what every socket and stream shares, handed to them (they read no app keys)
    services = ws.Services(app[keys.HUB], sockets, deadlines, app[keys.METRICS],
                           session_limits(config), config.max_connections_per_user,
                           config.node if is_postgres(config.db) else None)

    app.router.add_get("/api/task/ws/task/{user_id}", ws.handler(services))
    app.router.add_get("/api/task/stream", sse.handler(services),
                       allow_head=False)  # no body-less stream
    producer.add_routes(app)  # first: the hottest path, tried before the user routes
    rest.add_routes(app)
    if config.demo_mode:
        demo.add_routes(app)
    app.router.add_get("/", index)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)

    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(sweeper_ctx)
    app.cleanup_ctx.append(cluster_ctx)
    app.cleanup_ctx.append(socket_watch(lambda: sockets, deadlines,
                                        app[keys.METRICS].slow_closed.inc,
                                        ping_interval=config.ping_interval,
                                        ping_timeout=config.ping_timeout,
                                        send_timeout=config.send_timeout))
    app.cleanup_ctx.append(sse.stream_watch(config.sse_heartbeat, lambda: sockets))
    app.on_shutdown.append(on_shutdown)
    return app
