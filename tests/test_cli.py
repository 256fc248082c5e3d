"""The command line as an operator meets it: `python run.py` in a real subprocess.

Flags and their environment variables, one-line errors on bad values, the `token`
subcommand (configured secret and the demo secret kept in the database), RS256 with a
public key (and the algorithm-confusion attack refused), and an access log that never
shows a token.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import Config
from tests.procs import Servers, run_cli

pytestmark = pytest.mark.slow  # each test runs run.py as a process

API_KEY = "cli-producer-key-0123456789"
SECRET = "cli-secret-0123456789-abcdefghijklmnop"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or "TASKPUSH_" + f.name.upper()


def test_help_lists_every_setting_with_its_env_var() -> None:
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    for f in dataclasses.fields(Config):
        assert _flag(f.name) in text, f.name
        assert _env(f) in text, f.name
    assert "token" in text  # the subcommand is mentioned


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--port", "abc"], {}, "--port"),
        (["--jwt-secret", SECRET, "--jwt-public-key", "/nonexistent/key.pem"], {},
         "--jwt-public-key"),
        (["--jwt-public-key", "/nonexistent/key.pem"], {}, "--jwt-public-key"),
        (["--host", "0.0.0.0"], {}, "--host"),  # demo mode refuses a non-loopback host
        (["--log-level", "loud"], {}, "--log-level"),
        ([], {"TASKPUSH_PORT": "abc"}, "--port"),
        ([], {"TASKPUSH_STALE_AFTER": "-1"}, "--stale-after"),
    ],
    ids=["port-range", "port-text", "key-and-secret", "key-missing", "demo-public-host",
         "log-level", "env-port", "env-stale-after"],
)
def test_bad_value_exits_nonzero_with_one_line(tmp_path: Path, args: list[str],
                                               env: dict[str, str], names: str) -> None:
    done = run_cli("--db", str(tmp_path / "x.db"), *args, env=env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert names in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.db").exists()  # refused before touching anything


def test_env_vars_configure_the_server(servers: Servers, tmp_path: Path) -> None:
    """TASKPUSH_JWT_SECRET and TASKPUSH_API_KEY take effect like the flags."""
    server = servers(env={"TASKPUSH_JWT_SECRET": SECRET, "TASKPUSH_API_KEY": API_KEY}).start()
    request = urllib.request.Request(  # noqa: S310
        server.url + "/api/task/tasks", method="POST",
        data=json.dumps({"task_id": "envtask", "user_id": 3, "task_type": "t"}).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
        assert resp.status == 201
    token = jwt.encode({"sub": "3", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    request = urllib.request.Request(  # noqa: S310
        server.url + "/api/task/task/envtask/status",
        headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
        assert json.loads(resp.read())["data"]["status"] == "pending"
    assert server.stop() == 0


def test_token_command_signs_with_the_configured_secret(tmp_path: Path) -> None:
    done = run_cli("token", "--user", "7", "--admin", "--ttl", "60", "--jwt-secret", "S",
                   "--db", str(tmp_path / "t.db"))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert len(done.stdout.strip().splitlines()) == 1
    with warnings.catch_warnings():  # "S" is a short HMAC key, as the brief's example
        warnings.simplefilter("ignore")
        claims = jwt.decode(token, "S", algorithms=["HS256"])
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token, "not-S", algorithms=["HS256"])
    assert claims["sub"] == "7"
    assert claims["role"] == "admin"
    assert 0 < claims["exp"] - time.time() <= 61


def test_token_command_without_admin_has_no_role(tmp_path: Path) -> None:
    done = run_cli("token", "--user", "12", "--jwt-secret", SECRET,
                   "--db", str(tmp_path / "t.db"))
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "12" and "role" not in claims


def test_token_command_refuses_a_bad_user(tmp_path: Path) -> None:
    done = run_cli("token", "--user", "abc", "--jwt-secret", SECRET,
                   "--db", str(tmp_path / "t.db"))
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "--user" in done.stderr


def test_token_command_on_a_corrupt_database_says_so_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 500)
    done = run_cli("token", "--user", "1", "--db", str(bad))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "corrupt" in done.stderr
    assert "Traceback" not in done.stderr


async def _status(session: aiohttp.ClientSession, url: str, token: str, task_id: str
                  ) -> tuple[int, Any]:
    async with session.get(f"{url}/api/task/task/{task_id}/status",
                           headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


async def _list(session: aiohttp.ClientSession, url: str, token: str) -> int:
    async with session.get(f"{url}/api/task/tasks",
                           headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status


async def test_demo_token_command_uses_the_secret_kept_in_the_database(
        servers: Servers, tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = run_cli("token", "--user", "5", "--db", str(db))
    second = run_cli("token", "--user", "5", "--db", str(db))
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    other = run_cli("token", "--user", "5", "--db", str(tmp_path / "other.db"))
    assert other.returncode == 0, other.stderr
    server = servers(db=db).start()  # demo mode: no secret, no key
    async with aiohttp.ClientSession() as session:
        assert await _list(session, server.url, first.stdout.strip()) == 200
        assert await _list(session, server.url, second.stdout.strip()) == 200
        # a token from another database's demo secret is not accepted here
        assert await _list(session, server.url, other.stdout.strip()) == 401
        async with session.post(server.url + "/api/demo/login", json={"user_id": 5}) as resp:
            assert resp.status == 200
    assert server.stop() == 0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_by_hand(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token; pyjwt refuses to sign with a PEM as HMAC key, so sign by hand."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


async def test_rs256_public_key(servers: Servers, tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path = tmp_path / "public.pem"
    key_path.write_bytes(pem)
    server = servers("--jwt-public-key", str(key_path), "--api-key", API_KEY).start()
    claims = {"sub": "4", "exp": int(time.time()) + 300}
    good = jwt.encode(claims, private, algorithm="RS256")
    confused = _hs256_by_hand(claims, pem)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, other_key, algorithm="RS256")
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/api/task/tasks", headers={"X-API-Key": API_KEY},
                                json={"task_id": "rs1", "user_id": 4, "task_type": "t"}) as r:
            assert r.status == 201
        status, body = await _status(session, server.url, good, "rs1")
        assert status == 200 and body["data"]["task_id"] == "rs1"
        status, body = await _status(session, server.url, confused, "rs1")
        assert status == 401, body
        assert body["data"] is None
        status, _ = await _status(session, server.url, forged, "rs1")
        assert status == 401
        # demo endpoints do not exist when a key is configured
        async with session.post(server.url + "/api/demo/login", json={"user_id": 4}) as r:
            assert r.status == 404
        async with session.post(server.url + "/api/demo/tasks", json={"kind": "success"},
                                headers={"Authorization": f"Bearer {good}"}) as r:
            assert r.status == 404
    assert server.stop() == 0
    # and `run.py token` cannot sign with a public key
    done = run_cli("token", "--user", "1", "--jwt-public-key", str(key_path),
                   "--db", str(tmp_path / "t.db"))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1


async def test_access_log_redacts_tokens(servers: Servers) -> None:
    server = servers("--jwt-secret", SECRET, "--api-key", API_KEY,
                     "--log-level", "info", "--access-log", "true").start()
    token = jwt.encode({"sub": "1", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    bad_token = "not.a.valid-token-1234567890"
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{server.ws_url}/api/task/ws/task/1?token={token}")
        first = await ws.receive_json(timeout=5)
        assert first["type"] == "connected"
        await ws.close()
        bad = await session.ws_connect(f"{server.ws_url}/api/task/ws/task/1?token={bad_token}")
        await bad.receive(timeout=5)
        assert bad.close_code == 4401
        await bad.close()
        assert await _list(session, server.url, token) == 200
        async with session.get(f"{server.url}/healthz?x=1&token={token}") as resp:
            assert resp.status == 200
    assert server.stop() == 0
    logs = server.stdout() + server.stderr()
    assert "GET /api/task/tasks" in logs, logs  # the access log did run
    assert token not in logs
    assert bad_token not in logs
    for part in token.split("."):
        assert part not in logs
    assert "token=[redacted]" in logs
    assert API_KEY not in logs and SECRET not in logs


def test_an_unreachable_postgresql_database_is_refused_at_start_in_one_line() -> None:
    """run.py with a PostgreSQL URL nobody answers at: one line saying so (the password
    never shown), exit status 1, no traceback, within --db-timeout."""
    done = run_cli("--db", "postgresql://tp:hunter2-secret@127.0.0.1:1/tp", "--db-timeout", "2")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("taskpush: error: ") and "unreachable" in last, done.stderr
    assert "hunter2-secret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
