"""The middlewares every request passes: the one JSON error envelope for every failure,
and CORS for the API when `--cors-origins` is set."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..core.errors import BodyTimeout, TaskPushError, error_envelope

log = logging.getLogger(__name__)

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
