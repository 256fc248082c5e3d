"""Command line: `run.py [flags]` serves; `run.py token --user ID` prints a user token."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sqlite3
import sys
from collections.abc import Sequence

from aiohttp import web

from .config import ConfigError, parse_config, redact_db
from .core.auth import TokenVerifier
from .core.errors import StorageUnavailable
from .storage.api import StoreRefused
from .storage.engines import make_store
from .web.accesslog import RedactingAccessLogger, setup_logging

log = logging.getLogger("taskpush")


def _token_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py token",
                                     description="Print a user token signed with the "
                                     "configured secret (or the demo secret in the database).")
    parser.add_argument("--user", required=True, help="user id (digits)")
    parser.add_argument("--admin", action="store_true", help='add "role": "admin"')
    parser.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    args, rest = parser.parse_known_args(list(argv))
    config = parse_config(rest, serving=False)  # it signs; it serves nothing
    if not args.user.isdigit():
        raise ConfigError("--user: must be digits")
    if config.jwt_public_key is not None:
        raise ConfigError("token: cannot sign with a public key; tokens come from your issuer")
    if config.jwt_secret is not None:
        secret = config.jwt_secret.reveal()
    else:
        try:
            secret = asyncio.run(_demo_secret(config.db))
        except (StoreRefused, StorageUnavailable) as exc:
            raise ConfigError(str(exc)) from None
    print(TokenVerifier.for_secret(secret).issue(int(args.user), args.ttl, admin=args.admin))
    return 0


async def _demo_secret(path: str) -> str:
    store = make_store(path)
    await store.open(exclusive=False)  # the server may be running on it
    try:
        return await store.demo_secret()
    finally:
        await store.close()


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """uvloop when asked for or (with "auto") installed: it halves the loop's own cost per
    request and per frame (docs/performance.md); the stdlib loop otherwise."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("--event-loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def tune_gc() -> None:
    """Fewer, cheaper cyclic collections. Everything built at start-up (modules, the app) is
    frozen out of them, and the youngest generation is collected every 20,000 allocations
    instead of 700: under load the collector was ~6 % of the server's CPU and its full
    passes the largest stalls of a batch (docs/performance.md). Reference counting still
    frees almost everything at once; only cycles wait a little longer."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _start_error(exc: OSError, host: str, port: int) -> str:
    """Say what failed: a file (the database, its lock) names itself in the error, and
    only an error without one comes from listening on the address."""
    if exc.filename is not None:
        return f"cannot open {redact_db(str(exc.filename))}: {exc.strerror}"
    return f"cannot serve on {host}:{port}: {exc.strerror or exc}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["token"]:
            return _token_command(argv[1:])
        config = parse_config(argv)
        loop = new_event_loop(config.event_loop)
    except ConfigError as exc:
        print(f"taskpush: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, [s.reveal() for s in (config.jwt_secret, config.api_key)
                                     if s is not None])
    from .app import create_app

    mode = "demo mode (generated secret)" if config.demo_mode else "token auth"
    log.info("taskpush on http://%s:%d, database %s, %s, %s loop", config.host, config.port,
             redact_db(config.db), mode, type(loop).__module__.split(".")[0])
    try:
        app = create_app(config)
    except StoreRefused as exc:  # a PostgreSQL --db whose driver cannot be imported
        print(f"taskpush: error: {exc}", file=sys.stderr)
        return 1
    tune_gc()
    try:
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            access_log_class=RedactingAccessLogger,
            access_log=logging.getLogger("taskpush.access") if config.access_log else None,
            shutdown_timeout=config.shutdown_timeout,
            print=None,
            handle_signals=True,
            backlog=4096,  # a reconnect storm must not overflow the accept queue
            loop=loop,
        )
    except StoreRefused as exc:  # locked by another server, corrupt, cannot be opened
        print(f"taskpush: error: {exc}", file=sys.stderr)
        return 1
    except StorageUnavailable as exc:  # start-up writes (demo secret, recovery) refused
        print(f"taskpush: error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"taskpush: error: {_start_error(exc, config.host, config.port)}",
              file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # SQLite cannot open the path at all (say, a directory)
        print(f"taskpush: error: cannot open the database {redact_db(config.db)}: {exc}",
              file=sys.stderr)
        return 1
    return 0
