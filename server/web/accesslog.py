"""Logging setup, an access logger that never writes a token, and the filter that scrubs
every other record (aiohttp's parser errors quote the offending request line or header
whole, token and key included)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote_plus

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from ..config import redact_db

_SECRET_KEYS = frozenset({"token", "access_token", "api_key"})
_PARAM = re.compile(r"((?:^|[&;])([^=&;#\s]*)=)[^&;#\s]*")


def _redact_param(match: re.Match[str]) -> str:
    # the server decodes the key (`%74oken=` is `token=`), so judge the decoded key
    if unquote_plus(match.group(2)).lower() in _SECRET_KEYS:
        return match.group(1) + "[redacted]"
    return match.group(0)


def redact(text: str) -> str:
    """Replace the value of token=, access_token= and api_key= query parameters. Only the
    query string is examined: a path may contain `=` (task ids can)."""
    path, sep, query = text.partition("?")
    if not sep:  # a bare query string, or a path with no query at all
        return text if text.startswith("/") else _PARAM.sub(_redact_param, text)
    return path + sep + _PARAM.sub(_redact_param, query)


class RedactingAccessLogger(AbstractAccessLogger):
    """Combined-style access line; the query string is redacted, headers are not logged."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fms',
            request.remote,
            request.method,
            redact(request.path_qs),
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time * 1000,
        )


REDACTED = "[redacted]"
# A parameter anywhere in free text (a quoted request line): `token=...` after ?, &, ;,
# a space or a quote.
_PARAM_ANYWHERE = re.compile(r"((?:^|[?&;\s'\"])([^=&;#\s'\"?/]*)=)[^&;#\s'\"]*")
# A credential header and its value, as aiohttp quotes it (`b'X-API-Key: k\x7f'`) or as a
# dict's repr shows it (`'Authorization': 'Bearer ...'`): up to the quote or line end.
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|(?:set-)?cookie)"
                     r"(['\"]?\s*[:=]\s*['\"]?)[^\r\n'\"]*")
# A JWT (or its header alone): base64url JSON always begins `eyJ` (`{"`).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){0,2}")
# In exception text only: a long opaque run, such as the tail of a token whose start was in
# an earlier read of the request (aiohttp quotes only the line's part in that read).
_OPAQUE = re.compile(r"[A-Za-z0-9_-]{32,}")
# Each rule runs only when its trigger is in the (lowercased) text: substring tests cost
# well under a microsecond, the rules themselves several (a log line per request).
_HEADER_WORDS = ("authorization", "x-api-key", "cookie")
_PARAM_WORDS = ("token=", "api_key=")


def _unredacted_param(text: str, low: str) -> bool:
    """A secret-named parameter whose value is not already `[redacted]` (the access log's
    own lines are), or a percent-encoded key that could be one."""
    if "%" in text:
        return True
    return any(word in low and low.count(word) != low.count(word + REDACTED)
               for word in _PARAM_WORDS)


def _param_anywhere(match: re.Match[str]) -> str:
    if unquote_plus(match.group(2)).lower() in _SECRET_KEYS:
        return match.group(1) + REDACTED
    return match.group(0)


class SecretFilter(logging.Filter):
    """Rewrites a record's message, arguments and exception text so that no token, key or
    password reaches any handler: query parameters named token/access_token/api_key, the
    values of credential headers, anything shaped like a JWT, URL passwords, and the
    configured secrets themselves. The record keeps its level and logger; its arguments are
    merged into the message (a formatter that printed `args` would otherwise see them)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # too short a "secret" would blank ordinary words; a server refuses one shorter
        # than config.MIN_SECRET anyway (check_secret_lengths)
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def scrub(self, text: str, *, opaque: bool = False) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        low = text.lower()
        if any(word in low for word in _HEADER_WORDS):
            text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        if "=" in text and _unredacted_param(text, low):
            text = _PARAM_ANYWHERE.sub(_param_anywhere, text)
        if "eyJ" in text:
            text = _JWT.sub(REDACTED, text)
        text = redact_db(text)  # URL passwords (user info or `?password=`)
        if opaque:
            text = _OPAQUE.sub(REDACTED, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to the handler to report
            return True
        record.msg, record.args = self.scrub(message), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = self.scrub(text, opaque=True), None
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text, opaque=True)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info, opaque=True)
        return True


# Loggers whose records can carry a request: a filter on a logger also protects handlers
# that someone adds to it later (the root handlers' filter covers every other logger).
REQUEST_LOGGERS = ("aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.websocket",
                   "taskpush", "taskpush.access", "asyncio")


def setup_logging(level: str, secrets: Iterable[str] = ()) -> SecretFilter:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    secret_filter = SecretFilter(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    for name in REQUEST_LOGGERS:
        logging.getLogger(name).addFilter(secret_filter)
    return secret_filter
