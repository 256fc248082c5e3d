"""Logging setup and an access logger that never writes a token."""

from __future__ import annotations

import logging
import re

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

_SECRET_QUERY = re.compile(r"((?:^|[?&;])(?:token|access_token|api_key)=)[^&;#\s]*", re.I)


def redact(text: str) -> str:
    """Replace the value of token=, access_token= and api_key= query parameters."""
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


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
