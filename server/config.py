"""Configuration: every setting declared once, with its default, environment variable and help.

`Config` is frozen; `parse_config(argv, environ)` builds one from flags, then environment
variables, then defaults, and raises `ConfigError` (one line saying why) on bad values.
Secrets are wrapped in `Secret` so they never show in a repr or a log line.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting is missing or invalid; the message is shown to the operator as is."""


class Secret:
    """A string that does not show itself in repr/str (so it never reaches a log)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def _setting(default: Any, help: str, *, env: str | None = None, flag: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "env": env, "flag": flag})


@dataclass(frozen=True)
class Config:
    host: str = _setting("127.0.0.1", "interface to listen on")
    port: int = _setting(8000, "TCP port to listen on")
    db: str = _setting(
        "./taskpush.db", "SQLite database file (created from schema.sql), or a PostgreSQL URL "
        "(postgresql://user:password@host:5432/name) shared by the nodes of a cluster"
    )
    db_timeout: float = _setting(
        5.0, "seconds a write may wait for the database (e.g. a lock held by another "
        "process) before it is answered 503"
    )
    jwt_secret: Secret | None = _setting(
        None, "HS256 secret for user tokens (at least 16 characters)")
    jwt_public_key: str | None = _setting(
        None, "PEM public key file for RS256/ES256 user tokens (path)"
    )
    api_key: Secret | None = _setting(
        None, "key producers send in X-API-Key (at least 16 characters); without it the "
        "producer API answers 403"
    )
    cors_origins: tuple[str, ...] = _setting(
        (), "comma-separated origins allowed to call the REST API from a browser"
    )
    stale_after: float = _setting(
        3600.0, "seconds without change after which an active task is marked failed (stale)"
    )
    retention_days: float = _setting(
        7.0, "days a finished task and its history are kept before the sweeper deletes them"
    )
    sweep_interval: float = _setting(60.0, "seconds between stale/retention sweeps")
    jwt_leeway: float = _setting(30.0, "seconds of clock skew tolerated on token exp")
    ping_interval: float = _setting(
        30.0, "seconds between protocol-level WebSocket pings (0 disables)"
    )
    ping_timeout: float = _setting(
        60.0, "seconds to wait for a pong before a peer is considered dead"
    )
    max_frame_bytes: int = _setting(65536, "largest inbound WebSocket frame (close 1009)")
    max_body_bytes: int = _setting(1048576, "largest HTTP request body (413)")
    max_json_bytes: int = _setting(65536, "largest serialized result or metadata value (413)")
    rate_limit: float = _setting(20.0, "inbound WebSocket messages per second per connection")
    rate_burst: int = _setting(40, "inbound message burst allowed above the rate")
    flood_strikes: int = _setting(
        50, "messages refused for rate in a row before the socket is closed with 1008"
    )
    sse_heartbeat: float = _setting(
        15.0, "seconds between comment lines on an idle Server-Sent Events stream"
    )
    max_subscriptions: int = _setting(100, "subscriptions one connection may hold")
    max_connections_per_user: int = _setting(
        20, "open WebSockets per user; the oldest is closed with 4409 when exceeded"
    )
    max_polls_per_user: int = _setting(
        20, "long polls (GET .../status?wait=S) one user may hold open at once; more answer "
        "429 with Retry-After"
    )
    max_active_tasks: int = _setting(1000, "active tasks one user may have (429 beyond)")
    send_queue: int = _setting(
        1000, "outgoing messages buffered per socket before it is closed with 4408"
    )
    snapshot_memory: int = _setting(
        32 * 1024 * 1024,
        "bytes of connect-time snapshots (active_tasks, the since replay) in memory at once "
        "over all sockets, read and written by pages; connects beyond it wait their turn",
    )
    send_timeout: float = _setting(
        10.0, "seconds a client may leave sent frames unread before it is closed with 4408"
    )
    shutdown_timeout: float = _setting(5.0, "seconds allowed for in-flight work at shutdown")
    demo_task_seconds: float = _setting(10.0, "duration of a simulated demo task")
    event_loop: str = _setting(
        "auto", "asyncio event loop: uvloop, asyncio, or auto (uvloop when installed)"
    )
    log_level: str = _setting("info", "debug, info, warning or error")
    access_log: bool = _setting(False, "log every HTTP request (token= redacted); off by "
                                 "default: one line per event costs a tenth of the CPU")
    # -- secrets read from files (kept out of ps), and the request body's deadline --
    jwt_secret_file: str | None = _setting(
        None, "file holding the HS256 secret (instead of --jwt-secret; keeps it out of ps)"
    )
    api_key_file: str | None = _setting(
        None, "file holding the producer key (instead of --api-key; keeps it out of ps)"
    )
    body_timeout: float = _setting(
        20.0, "seconds a request body may take to arrive in full (408, connection closed)"
    )
    # -- cluster mode (--db postgresql://...; docs/cluster.md) --
    node_timeout: float = _setting(
        30.0, "cluster mode: seconds without a heartbeat after which a node is gone and "
        "another node ends its in-process tasks as failed/interrupted"
    )
    node_name: str | None = _setting(
        None, "cluster mode: this node's name, unique in the cluster and kept across "
        "restarts (a restarted node ends its own in-process tasks); default HOSTNAME:PORT"
    )

    @property
    def demo_mode(self) -> bool:
        """No secret and no key configured: tokens are signed with a generated secret."""
        return self.jwt_secret is None and self.jwt_public_key is None

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        """Every field but a password in a database URL (secrets are `Secret`s already)."""
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["db"] = redact_db(self.db)
        fields = ", ".join(f"{name}={value!r}" for name, value in shown.items())
        return f"Config({fields})"

    @property
    def node(self) -> str:
        """This node's name in a cluster."""
        return self.node_name or f"{socket.gethostname()}:{self.port}"


# user:PASSWORD@ in a URL (anywhere in a text), and a password given as a query parameter
# (libpq and asyncpg take `?password=` and `?sslpassword=` too)
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@/\s]*@")
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)[^&#\s]*")


def redact_db(text: str) -> str:
    """A URL (or a text holding URLs) as it may be shown: its passwords replaced by `***`,
    in the user info and in the query. The one rule for --db in `repr(Config)`, start-up
    lines, errors and the log filter."""
    if "://" in text and "@" in text:
        text = _URL_PASSWORD.sub(r"\1***@", text)
    if "password=" in text.lower():
        text = _QUERY_PASSWORD.sub(r"\1***", text)
    return text


def _env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or "TASKPUSH_" + f.name.upper()


def _flag_name(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    name = _flag_name(f)
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(raw)
            return value
        if kind.startswith("bool"):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a valid {kind.split()[0]}") from None
    if kind.startswith("Secret"):
        return Secret(raw) if raw else None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="taskpush: durable real-time task status push server. "
        "Every flag can also be set by the environment variable shown.",
        epilog="Subcommand: `run.py token --user ID [--admin] [--ttl S]` prints a user token.",
    )
    for f in dataclasses.fields(Config):
        default = f.default
        shown = "none" if default in (None, ()) else default
        if f.name in ("jwt_secret", "api_key"):
            shown = "none"
        parser.add_argument(
            _flag_name(f),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (env {_env_name(f)}; default {shown})",
        )
    return parser


def parse_config(argv: Sequence[str], environ: Mapping[str, str] | None = None, *,
                 serving: bool = True) -> Config:
    """Flags win over environment variables, which win over defaults. `serving` False (the
    `token` subcommand, which only signs) does not hold the secrets to MIN_SECRET."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(_env_name(f))
        if raw is not None:
            values[f.name] = _convert(f, raw)
    config = read_secret_files(Config(**values))
    validate(config)
    if serving:
        check_secret_lengths(config)
    return config


MIN_SECRET = 16  # characters of --jwt-secret and --api-key a server accepts


def check_secret_lengths(config: Config) -> None:
    """A server refuses a JWT secret or API key shorter than MIN_SECRET: it is guessable,
    and the log filter (accesslog.SecretFilter) could not scrub it by value without
    blanking ordinary words."""
    for name in ("jwt_secret", "api_key"):
        secret = getattr(config, name)
        if secret is not None and len(secret.reveal()) < MIN_SECRET:
            flag = name.replace("_", "-")
            raise ConfigError(f"--{flag}: must be at least {MIN_SECRET} characters "
                              f"(got {len(secret.reveal())})")


SECRET_FILES = {"jwt_secret_file": "jwt_secret", "api_key_file": "api_key"}


def read_secret_files(config: Config) -> Config:
    """Fill --jwt-secret / --api-key from their *-file forms, so a secret need not sit in a
    command line (`ps`) or an environment. One trailing newline is dropped (what `echo` and
    editors leave); an empty file, an unreadable one, or both forms at once is an error."""
    changes: dict[str, Secret] = {}
    for file_name, secret_name in SECRET_FILES.items():
        path = getattr(config, file_name)
        if path is None:
            continue
        flag, secret_flag = _flag_name_of(file_name), _flag_name_of(secret_name)
        if getattr(config, secret_name) is not None:
            raise ConfigError(f"{secret_flag} and {flag}: give one, not both")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read(65537)
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None
        if len(text) > 65536:
            raise ConfigError(f"{flag}: {path} is larger than 64 KiB; is it the right file?")
        text = text.removesuffix("\n").removesuffix("\r")
        if not text:
            raise ConfigError(f"{flag}: {path} is empty")
        changes[secret_name] = Secret(text)
    return config.replace(**changes) if changes else config


def _flag_name_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(config: Config, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value < 0 or (value == 0 and not allow_zero):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(config: Config) -> None:
    """Raise ConfigError with one line saying what is wrong."""
    if not 0 < config.port < 65536:
        raise ConfigError(f"--port: must be 1-65535, got {config.port}")
    _positive(
        config,
        "stale_after",
        "retention_days",
        "sweep_interval",
        "max_frame_bytes",
        "max_body_bytes",
        "max_json_bytes",
        "rate_limit",
        "rate_burst",
        "flood_strikes",
        "max_subscriptions",
        "max_connections_per_user",
        "max_polls_per_user",
        "max_active_tasks",
        "send_queue",
        "snapshot_memory",
        "send_timeout",
        "sse_heartbeat",
        "demo_task_seconds",
        "body_timeout",
        "db_timeout",
        "node_timeout",
    )
    _positive(config, "jwt_leeway", "ping_interval", "ping_timeout", "shutdown_timeout",
              allow_zero=True)
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level: must be debug, info, warning or error, "
                          f"got {config.log_level!r}")
    if config.event_loop not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"--event-loop: must be auto, uvloop or asyncio, "
                          f"got {config.event_loop!r}")
    if config.jwt_secret is not None and config.jwt_public_key is not None:
        raise ConfigError("--jwt-secret and --jwt-public-key: configure one, not both")
    if config.jwt_public_key is not None:
        try:
            with open(config.jwt_public_key, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigError(
                f"--jwt-public-key: cannot read {config.jwt_public_key}: {exc.strerror}"
            ) from None
    if config.node_name is not None and (
            not config.node_name or len(config.node_name) > 200
            or not config.node_name.isprintable()):
        raise ConfigError("--node-name: must be 1-200 printable characters")
    if "://" not in config.db:  # a file: its directory must exist (it is not created)
        directory = os.path.dirname(os.path.abspath(config.db))
        if not os.path.isdir(directory):
            raise ConfigError(f"--db {config.db}: the directory {directory} does not exist")
    if config.demo_mode and not is_loopback(config.host):
        raise ConfigError(
            f"--host {config.host}: demo mode (no --jwt-secret or --jwt-public-key) "
            "only listens on a loopback address; configure a secret to serve other hosts"
        )
    for origin in config.cors_origins:
        if origin != "*" and "://" not in origin:
            raise ConfigError(f"--cors-origins: {origin!r} is not an origin like https://app.example")
