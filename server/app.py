"""The composition root: `create_app(config)` picks the storage engine for `--db` and wires
storage, push, service and web together (keys, routes, middlewares, the lifecycle). The one
module that knows every layer; no I/O of its own until the app starts, so tests build apps
with their own Config and a tmp_path database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from .config import Config
from .core.auth import TokenVerifier
from .core.errors import StorageUnavailable
from .push.hub import Hub
from .push.messages import CLOSE_TRY_AGAIN
from .push.polls import PollSlots
from .push.session import SessionLimits
from .push.snapshot import ByteBudget
from .push.watch import TokenDeadlines, Watched, socket_watch
from .service.notify import task_notification_service
from .service.tasks import TaskService
from .storage.engines import is_postgres, make_store
from .web import connection, demo, health, keys, pages, producer, rest, sse, ws
from .web.jobs import cluster_ctx, sweeper_ctx
from .web.metrics import Metrics
from .web.middlewares import cors_middleware, error_middleware

log = logging.getLogger(__name__)



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


async def on_shutdown(app: web.Application) -> None:
    """Stop serving sockets (1001), answer the long polls now, and end our in-process jobs
    as interrupted."""
    await connection.close_all(app[keys.SOCKETS])
    app[keys.HUB].release_watchers()
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
    services = connection.Services(app[keys.HUB], sockets, deadlines, app[keys.METRICS],
                           session_limits(config), config.max_connections_per_user,
                           config.node if is_postgres(config.db) else None)

    app.router.add_get("/api/task/ws/task/{user_id}", ws.handler(services))
    app.router.add_get("/api/task/stream", sse.handler(services),
                       allow_head=False)  # no body-less stream
    producer.add_routes(app)  # first: the hottest path, tried before the user routes
    rest.add_routes(app)
    if config.demo_mode:
        demo.add_routes(app)
    pages.add_routes(app)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/metrics", health.metrics)

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
