"""The static pages (the demo page, the API docs, `/static/`) and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from . import keys
from .openapi import openapi_document

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def docs_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "docs.html")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[keys.CONFIG]))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
