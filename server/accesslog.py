"""Logging setup and an access logger that never writes a token."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

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


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
