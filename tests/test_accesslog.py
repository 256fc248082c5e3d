"""The access log (server/web/accesslog.py): what it writes must never carry a secret."""

from __future__ import annotations

from server.web.accesslog import redact


def test_redact_when_the_path_contains_an_equals_sign() -> None:
    line = redact("/api/task/task/a=b/status?token=SUPERSECRET&x=1")
    assert "SUPERSECRET" not in line and line.endswith("?token=[redacted]&x=1")
