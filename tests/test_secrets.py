"""Secrets never leak: not into any log record (every logger at DEBUG, the access log on,
with the server's own RedactingAccessLogger), not into any error answer, not into a repr.

A whole session runs in-process: WebSocket with good, bad, expired and foreign tokens,
refresh, REST with Bearer (good and bad), producers with the right and a wrong API key,
assorted errors, and demo mode (whose generated secret lives in the database).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sqlite3
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from server.app import create_app
from server.config import Config, Secret, parse_config, redact_db
from server.web.accesslog import RedactingAccessLogger, SecretFilter, redact
from tests.conftest import API_KEY, SECRET, make_token
from tests.procs import Servers, free_port, run_cli

ACCESS_LOGGER = "taskpush.access"
OTHER_SECRET = "some-other-secret-that-signs-forged-tokens-0123"
WRONG_KEY = "wrong-producer-key-abcdefghijklmnop"


async def start(aiohttp_client: Any, config: Config) -> TestClient:
    """An app served exactly as run.py serves it: RedactingAccessLogger on the access log."""
    server = TestServer(create_app(config))
    await server.start_server(access_log_class=RedactingAccessLogger,
                              access_log=logging.getLogger(ACCESS_LOGGER))
    return await aiohttp_client(server)


class Recorder:
    """Every response body and every WebSocket text the session saw."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.bodies: list[tuple[int, str]] = []

    async def request(self, method: str, path: Any, **kw: Any) -> tuple[int, Any]:
        resp = await self.client.request(method, path, **kw)
        text = await resp.text()
        self.bodies.append((resp.status, text))
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text

    async def ws(self, path: Any, sends: Sequence[Any] = ()) -> tuple[list[str], int | None]:
        """Connect, send each message (then a ping), read until pong or a close."""
        ws = await self.client.ws_connect(path)
        texts: list[str] = []
        for message in [*sends, {"type": "ping"}]:
            if ws.closed:
                break
            await ws.send_str(json.dumps(message))
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type != WSMsgType.TEXT:
                break
            texts.append(msg.data)
            if json.loads(msg.data)["type"] == "pong":
                break
        await ws.close()
        self.bodies.extend((0, t) for t in texts)
        return texts, ws.close_code


def log_text(records: list[logging.LogRecord]) -> str:
    """Everything a handler could write for these records, and their raw arguments."""
    parts = []
    for record in records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        parts.append(repr(record.__dict__))
        if record.exc_info and record.exc_info[1] is not None:
            parts.extend(traceback.format_exception(record.exc_info[1]))
    return "\n".join(parts)


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger propagates here
    for name in ("aiohttp", "aiohttp.access", "aiohttp.server", "aiohttp.web", ACCESS_LOGGER,
                 "server", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def assert_absent(secrets: list[str], text: str, where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:6]}...) appears in {where}"


async def test_a_full_session_leaks_no_secret(aiohttp_client: Any, config: Config,
                                              captured: pytest.LogCaptureFixture) -> None:
    client = await start(aiohttp_client, config.replace(access_log=True, log_level="debug"))
    rec = Recorder(client)
    good = make_token(1)
    fresh = make_token(1, ttl=7200)
    admin = make_token(9, admin=True)
    forged = make_token(1, secret=OTHER_SECRET)
    expired = make_token(1, ttl=-3600)
    foreign = make_token(2)
    producer = {"X-API-Key": API_KEY}

    # producers: right key, wrong key, no key, bad bodies
    status, body = await rec.request("POST", "/api/task/tasks", headers=producer,
                                     json={"task_id": "t1", "user_id": 1, "task_type": "job"})
    assert status == 201
    status, _ = await rec.request("POST", "/api/task/task/t1/events", headers=producer,
                                  json={"status": "progress", "progress": 10})
    assert status == 200
    status, body = await rec.request("POST", "/api/task/events", headers=producer,
                                     json={"events": [{"task_id": "t1", "status": "running"},
                                                      {"task_id": "zz", "status": "nope"}]})
    assert status == 200 and [r["ok"] for r in body["data"]["results"]] == [True, False]
    for headers in ({"X-API-Key": WRONG_KEY}, {"X-API-Key": API_KEY + "x"}, {}):
        status, body = await rec.request("POST", "/api/task/tasks", headers=headers,
                                         json={"user_id": 1, "task_type": "job"})
        assert status == 401 and body["data"] is None
    status, _ = await rec.request("POST", "/api/task/tasks", headers=producer, data=b"{nope")
    assert status == 400
    status, _ = await rec.request("POST", f"/api/task/tasks?api_key={API_KEY}",
                                  headers=producer, json={"user_id": 1, "task_id": "t1",
                                                          "task_type": "other"})
    assert status == 409

    # users over REST: good, forged, expired, foreign, malformed, and a token in the query
    status, body = await rec.request("GET", "/api/task/task/t1/status",
                                     headers={"Authorization": f"Bearer {good}"})
    assert status == 200 and body["data"]["status"] == "running"
    for token in (forged, expired, good + "x", "not.a.jwt", f"{SECRET}"):
        status, body = await rec.request("GET", "/api/task/tasks",
                                         headers={"Authorization": f"Bearer {token}"})
        assert status == 401 and body["data"] is None
    status, _ = await rec.request("GET", "/api/task/task/t1/status",
                                  headers={"Authorization": f"Bearer {foreign}"})
    assert status == 404
    status, _ = await rec.request("GET", f"/api/task/tasks?token={good}&access_token={good}")
    assert status == 401
    status, _ = await rec.request("DELETE", "/api/task/task/t1",
                                  headers={"Authorization": f"Bearer {good}"})
    assert status == 409
    status, _ = await rec.request("POST", "/api/task/task/t1/cancel",
                                  headers={"Authorization": f"Bearer {good}"})
    assert status == 200
    status, body = await rec.request("POST", "/api/task/task/t1/events", headers=producer,
                                     json={"status": "progress", "progress": 20})
    assert status == 409 and body["cancel_requested"] is True
    status, _ = await rec.request("GET", f"/no/such/path?token={good}")
    assert status == 404

    # WebSockets: good token with refreshes, then bad, expired, foreign, missing
    texts, code = await rec.ws(
        f"/api/task/ws/task/1?token={good}",
        [{"type": "refresh", "token": fresh},
         {"type": "refresh", "token": forged},
         {"type": "refresh", "token": expired},
         {"type": "refresh", "token": foreign},
         {"type": "refresh", "token": SECRET},
         {"type": "subscribe", "task_id": "t1"},
         {"type": "nonsense", "token": good}])
    kinds = [json.loads(t)["type"] for t in texts]
    assert kinds[:2] == ["connected", "active_tasks"] and kinds[-1] == "pong"
    assert kinds.count("refreshed") == 1 and kinds.count("error") == 5
    texts, code = await rec.ws(f"/api/task/ws/task/9?token={admin}",
                               [{"type": "subscribe", "task_id": "t1"}])
    assert "subscribed" in [json.loads(t)["type"] for t in texts]
    for token, expected in ((forged, 4401), (expired, 4401), (foreign, 4403),
                            (good + "x", 4401)):
        texts, code = await rec.ws(f"/api/task/ws/task/1?token={token}")
        assert texts == [] and code == expected
    texts, code = await rec.ws("/api/task/ws/task/1")
    assert code == 4401
    # the query key percent-encoded still reaches the server as `token`
    texts, code = await rec.ws(URL(f"/api/task/ws/task/1?%74oken={good}", encoded=True))
    assert texts and json.loads(texts[0])["type"] == "connected"

    await client.close()  # shutdown logs too
    secrets = [SECRET, API_KEY, good, fresh, admin, forged, expired, foreign,
               # the signature alone is the part that must never be seen
               good.rsplit(".", 1)[1], fresh.rsplit(".", 1)[1]]
    records = captured.records
    assert_absent(secrets, log_text(records), "a log record")
    assert_absent(secrets, captured.text, "the formatted log")
    for status, text in rec.bodies:
        assert_absent(secrets, text, f"a response ({status}): {text[:80]}")

    # the access log did run, and did see the requests that carried a token in the query
    access = [r.getMessage() for r in records if r.name == ACCESS_LOGGER]
    assert len(access) >= 20
    assert any("/api/task/ws/task/1?token=[redacted]" in line for line in access)
    assert any("access_token=[redacted]" in line for line in access)
    assert any("api_key=[redacted]" in line for line in access)


async def test_demo_mode_secret_and_tokens_stay_out_of_logs(
        aiohttp_client: Any, config: Config, captured: pytest.LogCaptureFixture) -> None:
    client = await start(aiohttp_client, config.replace(jwt_secret=None, api_key=None,
                                                        demo_task_seconds=0.05))
    resp = await client.post("/api/demo/login", json={"user_id": 3})
    assert resp.status == 200
    token = (await resp.json())["data"]["token"]
    headers = {"Authorization": f"Bearer {token}"}
    ws = await client.ws_connect(f"/api/task/ws/task/3?token={token}")
    assert json.loads((await ws.receive(timeout=5)).data)["type"] == "connected"
    resp = await client.post("/api/demo/tasks", headers=headers, json={"kind": "fail"})
    assert resp.status == 201
    while True:  # the demo job fails part way: its failure is logged, nothing else
        msg = json.loads((await ws.receive(timeout=5)).data)
        if msg.get("status") == "failed":
            break
    resp = await client.get("/api/task/tasks", headers={"Authorization": "Bearer nope"})
    error_body = await resp.text()
    await ws.close()
    await client.close()
    conn = sqlite3.connect(config.db)
    try:
        (demo_secret,) = conn.execute(
            "SELECT value FROM settings WHERE key = 'demo_secret'").fetchone()
    finally:
        conn.close()
    secrets = [demo_secret, token, token.rsplit(".", 1)[1]]
    assert_absent(secrets, log_text(captured.records), "a log record")
    assert_absent(secrets, error_body, "an error response")
    assert any("token=[redacted]" in r.getMessage() for r in captured.records
               if r.name == ACCESS_LOGGER)


# ---- unit: the redaction and the reprs ---------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("/ws/1?token=abc.def.ghi", "/ws/1?token=[redacted]"),
    ("/ws/1?since=5&token=abc.def&epoch=e", "/ws/1?since=5&token=[redacted]&epoch=e"),
    ("/ws/1?TOKEN=abc&x=1", "/ws/1?TOKEN=[redacted]&x=1"),
    ("/p?access_token=abc#frag", "/p?access_token=[redacted]#frag"),
    ("/p?api_key=k1&api_key=k2", "/p?api_key=[redacted]&api_key=[redacted]"),
    ("/p?a=1;token=abc", "/p?a=1;token=[redacted]"),
    ("/p?token=", "/p?token=[redacted]"),
    ("token=abc", "token=[redacted]"),
    ("/p?mytoken=keep&tokens=keep", "/p?mytoken=keep&tokens=keep"),
    ("/api/task/tasks?limit=5", "/api/task/tasks?limit=5"),
])
def test_redact(raw: str, expected: str) -> None:
    assert redact(raw) == expected


@pytest.mark.parametrize("raw", [
    "/ws/1?%74oken=SECRETVALUE",
    "/ws/1?x=1&%74%6F%6B%65%6E=SECRETVALUE",
    "/ws/1?api%5Fkey=SECRETVALUE",
    "/ws/1?Access_Token=SECRETVALUE&y=2",
])
def test_redact_sees_through_percent_encoded_keys(raw: str) -> None:
    assert "SECRETVALUE" not in redact(raw)


def test_config_repr_never_shows_secrets() -> None:
    config = Config(jwt_secret=Secret(SECRET), api_key=Secret(API_KEY))
    for shown in (repr(config), str(config), f"{config}", repr(dataclasses.asdict(config)),
                  repr(config.jwt_secret), str(config.api_key)):
        assert SECRET not in shown and API_KEY not in shown
    assert config.jwt_secret is not None and config.jwt_secret.reveal() == SECRET

    parsed = parse_config(["--jwt-secret", SECRET], {"TASKPUSH_API_KEY": API_KEY})
    assert SECRET not in repr(parsed) and API_KEY not in repr(parsed)
    assert parsed.api_key == Secret(API_KEY) and parsed.jwt_secret == Secret(SECRET)


# ---- a real server: bytes aiohttp's parser refuses, secrets from files, start-up lines ------


def secret_files(tmp_path: Path) -> tuple[Path, Path]:
    """The secret and the key as an operator writes them (`echo ... > file`)."""
    secret_file, key_file = tmp_path / "jwt.secret", tmp_path / "api.key"
    secret_file.write_text(SECRET + "\n")
    key_file.write_text(API_KEY + "\n")
    secret_file.chmod(0o600)
    key_file.chmod(0o600)
    return secret_file, key_file


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes exactly as given (a client library would refuse to) and read the answer
    to its end: aiohttp's parser, not ours, sees the invalid byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_requests_with_an_invalid_byte_leave_no_secret_in_the_log(
        servers: Servers, tmp_path: Path) -> None:
    """aiohttp logs a request it cannot parse at ERROR with a traceback quoting the request
    line or the header whole: the token in the query, the Bearer token, the API key. Every
    such record is scrubbed before it is written; the secrets came from files, so they are
    not in the process's command line either."""
    secret_file, key_file = secret_files(tmp_path)
    server = servers("--jwt-secret-file", str(secret_file), "--log-level", "debug",
                     env={"TASKPUSH_API_KEY_FILE": str(key_file)}).start()
    assert server.proc is not None
    cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode()
    assert SECRET not in cmdline and API_KEY not in cmdline
    token = make_token(1)
    assert raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                        b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200")
    sent = [
        f"GET /api/task/tasks?token={token}&x=\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /api/task/ws/task/1?since=0&%74oken={token}\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
        f"GET /api/task/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n",
        f"GET /api/task/tasks HTTP/1.1\r\nHost: x\r\nauthorization: bearer {token}\x00\r\n\r\n",
        f"POST /api/task/tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\x7f\r\n"
        "Content-Length: 2\r\n\r\n{}",
        f"POST /api/task/tasks HTTP/1.1\r\nHost: x\r\nx-api-key:{API_KEY}\x01\r\n"
        "Content-Length: 2\r\n\r\n{}",
        # a valid request that names the secrets in the query: the access log's line
        f"GET /healthz?api_key={API_KEY}&token={token} HTTP/1.1\r\nHost: x\r\n"
        "Connection: close\r\n\r\n",
    ]
    answers = [raw_exchange(server.port, request.encode("latin-1")) for request in sent]
    assert all(a.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")) for a in answers[:-1]), \
        [a[:40] for a in answers]
    assert server.stop() == 0
    logs = server.stdout() + server.stderr()
    # the parser's errors were logged (else this test would prove nothing) ...
    assert logs.count("Error handling request") >= len(sent) - 1, logs
    assert "[redacted]" in logs
    # ... with no token, signature or key in them, nor the secret
    for secret in (token, token.rsplit(".", 1)[1], token.split(".")[1], API_KEY, SECRET):
        assert secret not in logs, f"{secret[:8]}... is in the log:\n{logs}"


def test_a_database_url_is_logged_without_its_password(servers: Servers, tmp_path: Path
                                                       ) -> None:
    done = run_cli("--db", "postgresql://taskpush:hunter2-db-password@127.0.0.1:1/tp",
                   "--port", str(free_port()), env={"PYTHONUNBUFFERED": "1"}, timeout=30)
    output = done.stdout + done.stderr
    assert "postgresql://taskpush:***@127.0.0.1:1/tp" in output, output
    assert "hunter2-db-password" not in output


@pytest.mark.slow  # runs run.py as a process
def test_start_up_errors_say_what_failed(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "t.db"
    done = run_cli("--db", str(missing), "--port", str(free_port()))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"taskpush: error: --db {missing}: the directory {missing.parent} does not exist"]
    # the lock file cannot be opened (here: a directory stands where it would be)
    db = tmp_path / "t.db"
    (tmp_path / "t.db.lock").mkdir()
    port = free_port()
    done = run_cli("--db", str(db), "--port", str(port))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"taskpush: error: cannot open {db}.lock: Is a directory", done.stderr
    assert "Traceback" not in done.stderr
    # the database itself cannot be opened (a directory where the file would be)
    (tmp_path / "dir.db").mkdir()
    done = run_cli("--db", str(tmp_path / "dir.db"), "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"taskpush: error: cannot open the database {tmp_path / 'dir.db'}: "
        "unable to open database file"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("content", "expected"), [
    ("s3cret-from-a-file\n", "s3cret-from-a-file"),
    ("s3cret-from-a-file\r\n", "s3cret-from-a-file"),
    ("s3cret-from-a-file", "s3cret-from-a-file"),
    ("s3cret  with spaces \n\n", "s3cret  with spaces \n"),  # only one newline goes
])
def test_secret_files_are_read_with_one_trailing_newline_dropped(
        tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content, newline="")
    by_flag = parse_config(["--jwt-secret-file", str(path), "--api-key-file", str(path),
                            "--db", str(tmp_path / "t.db")], {})
    by_env = parse_config(["--db", str(tmp_path / "t.db")],
                          {"TASKPUSH_JWT_SECRET_FILE": str(path),
                           "TASKPUSH_API_KEY_FILE": str(path)})
    for config in (by_flag, by_env):
        assert config.jwt_secret == Secret(expected) and config.api_key == Secret(expected)
        assert expected not in repr(config)


@pytest.mark.slow  # runs run.py as a process
@pytest.mark.parametrize(("args", "env", "says"), [
    (["--jwt-secret-file", "{empty}"], {}, "--jwt-secret-file: {empty} is empty"),
    (["--api-key-file", "{newline}"], {}, "--api-key-file: {newline} is empty"),
    (["--api-key-file", "{missing}"], {},
     "--api-key-file: cannot read {missing}: No such file or directory"),
    (["--jwt-secret-file", "{good}", "--jwt-secret", SECRET], {},
     "--jwt-secret and --jwt-secret-file: give one, not both"),
    (["--api-key-file", "{good}"], {"TASKPUSH_API_KEY": API_KEY},
     "--api-key and --api-key-file: give one, not both"),
    ([], {"TASKPUSH_JWT_SECRET_FILE": "{good}", "TASKPUSH_JWT_SECRET": SECRET},
     "--jwt-secret and --jwt-secret-file: give one, not both"),
], ids=["empty", "only-newline", "missing", "both-flags", "flag-and-env", "both-env"])
def test_bad_secret_files_stop_the_server_with_one_line(
        tmp_path: Path, args: list[str], env: dict[str, str], says: str) -> None:
    files = {"empty": tmp_path / "empty", "newline": tmp_path / "newline",
             "missing": tmp_path / "missing", "good": tmp_path / "good"}
    files["empty"].write_text("")
    files["newline"].write_text("\n")
    files["good"].write_text(SECRET)
    names = {name: str(path) for name, path in files.items()}
    done = run_cli("--db", str(tmp_path / "t.db"), *[a.format(**names) for a in args],
                   env={k: v.format(**names) for k, v in env.items()})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"taskpush: error: {says.format(**names)}"]
    assert SECRET not in done.stderr and API_KEY not in done.stderr
    assert not (tmp_path / "t.db").exists()


def test_the_filter_scrubs_message_arguments_and_exception_text() -> None:
    secret_filter = SecretFilter([API_KEY, SECRET])
    token = make_token(1)
    try:
        raise ValueError(f"b'GET /p?token={token}&x=\\x01'\nb'X-API-Key: {API_KEY}\\x7f'")
    except ValueError:
        record = logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "from %s with %r", (
                "127.0.0.1", {"Authorization": f"Bearer {token}"}), sys.exc_info())
    assert secret_filter.filter(record)
    text = logging.Formatter().format(record) + log_text([record])
    assert "127.0.0.1" in text and "GET /p?token=[redacted]" in text
    for secret in (token, token.rsplit(".", 1)[1], API_KEY):
        assert secret not in text
    # a record with nothing to hide keeps its words
    plain = logging.LogRecord("taskpush", logging.INFO, __file__, 1, "sweep: %d stale", (3,),
                              None)
    assert secret_filter.filter(plain) and plain.getMessage() == "sweep: 3 stale"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://user:pa:ss@db.example:5432/tp", "postgresql://user:***@db.example:5432/tp"),
    ("postgresql://user@db/tp", "postgresql://user@db/tp"),
    ("./taskpush.db", "./taskpush.db"),
    ("postgresql://db.example/tp?user=u&password=hunter2-secret&sslmode=require",
     "postgresql://db.example/tp?user=u&password=***&sslmode=require"),
    ("postgres://db/tp?sslpassword=k3y-pass", "postgres://db/tp?sslpassword=***"),
    ("connect postgresql://u:p4ss@h/d?Password=p4ss failed",
     "connect postgresql://u:***@h/d?Password=*** failed"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_db(url) == shown


def test_a_password_given_as_a_url_parameter_is_never_shown(caplog) -> None:
    """`--db postgresql://host/db?password=...` (libpq's other spelling): not in repr(config),
    nor in any log record that passes the filter."""
    from server.config import Config

    url = "postgresql://u@127.0.0.1:1/tp?password=query-pass-0123456789"
    assert "query-pass-0123456789" not in repr(Config(db=url))
    record = logging.LogRecord("taskpush", logging.INFO, __file__, 1, "opening %s", (url,),
                               None)
    assert SecretFilter().filter(record)
    assert "query-pass-0123456789" not in record.getMessage()


@pytest.mark.slow  # runs run.py as a process
@pytest.mark.parametrize(("args", "env", "says"), [
    (["--api-key", "k3y"], {}, "--api-key: must be at least 16 characters (got 3)"),
    (["--jwt-secret", "short-secret"], {},
     "--jwt-secret: must be at least 16 characters (got 12)"),
    ([], {"TASKPUSH_API_KEY": "fifteen-chars-k"},
     "--api-key: must be at least 16 characters (got 15)"),
    (["--api-key-file", "{short}"], {}, "--api-key: must be at least 16 characters (got 5)"),
], ids=["api-key-flag", "jwt-secret-flag", "api-key-env", "api-key-file"])
def test_a_short_secret_stops_the_server_with_one_line(
        tmp_path: Path, args: list[str], env: dict[str, str], says: str) -> None:
    """A guessable secret that the log filter could not scrub (it scrubs secrets by value
    from 6 characters on) is refused; the token subcommand, which only signs, is not."""
    short = tmp_path / "short"
    short.write_text("k3y-5")
    done = run_cli("--db", str(tmp_path / "t.db"), *[a.format(short=short) for a in args],
                   env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"taskpush: error: {says}"]
    assert "k3y" not in done.stderr and "short-secret" not in done.stderr
    assert not (tmp_path / "t.db").exists()
    sixteen = parse_config(["--api-key", "k" * 16, "--jwt-secret", "s" * 16,
                            "--db", str(tmp_path / "t.db")], {})
    assert sixteen.api_key == Secret("k" * 16)
