"""The OpenAPI document covers every routed HTTP endpoint and is well-formed OpenAPI 3;
/docs is a self-contained page that renders it."""

from __future__ import annotations

import re
from typing import Any

import pytest
from aiohttp import web

from server.app import create_app
from server.config import Config
from server.core.model import TASK_FIELDS
from server.web.openapi import openapi_document

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def routed(config: Config) -> set[tuple[str, str]]:
    """(method, path) of every route of the app, static files and HEAD aliases excepted."""
    app = create_app(config)
    found = set()
    for route in app.router.routes():
        if isinstance(route.resource, web.StaticResource) or route.method == "HEAD":
            continue
        assert route.resource is not None
        found.add((route.method.lower(), route.resource.canonical))
    return found


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item}


def resolve(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for part in pointer[2:].split("/"):
        assert part in node, f"unresolvable $ref {pointer}"
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


@pytest.fixture(params=["token", "demo"])
def any_config(request: pytest.FixtureRequest, config: Config) -> Config:
    return config if request.param == "token" else config.replace(jwt_secret=None)


def test_every_route_is_documented(any_config: Config) -> None:
    routes = routed(any_config)
    doc = openapi_document(any_config)
    missing = routes - documented(doc)
    assert not missing, f"routes without documentation: {sorted(missing)}"
    assert ("get", "/api/task/ws/task/{user_id}") in routes
    assert len(routes) >= 14


def test_nothing_documented_that_is_not_routed(any_config: Config) -> None:
    doc = openapi_document(any_config)
    extra = documented(doc) - routed(any_config)
    assert not extra, f"documented but not routed: {sorted(extra)}"


def test_demo_paths_only_in_demo_mode(config: Config) -> None:
    token_doc = openapi_document(config)
    demo_doc = openapi_document(config.replace(jwt_secret=None))
    assert not [p for p in token_doc["paths"] if p.startswith("/api/demo/")]
    assert {"/api/demo/login", "/api/demo/tasks"} <= set(demo_doc["paths"])


def test_document_is_valid_looking_openapi_3(any_config: Config) -> None:
    doc = openapi_document(any_config)
    assert re.fullmatch(r"3\.0\.\d+", doc["openapi"])
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["paths"]
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        params_in_path = set(re.findall(r"{(\w+)}", path))
        for method, operation in item.items():
            assert method in METHODS
            assert operation["responses"], f"{method} {path} has no responses"
            for code, response in operation["responses"].items():
                assert code == "default" or re.fullmatch(r"[1-5]\d\d", code)
                if "$ref" not in response:
                    assert response["description"]
            declared = {p["name"] for p in operation.get("parameters", ())
                        if p["in"] == "path"}
            assert declared == params_in_path, (method, path)
            for requirement in operation.get("security", doc.get("security", [])):
                for scheme in requirement:
                    assert scheme in doc["components"]["securitySchemes"]
    for pointer in refs(doc):
        resolve(doc, pointer)
    operation_ids = [op["operationId"] for item in doc["paths"].values()
                     for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_document_passes_the_openapi_spec_validator(any_config: Config) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi_document(any_config))


def test_security_schemes_and_schemas(config: Config) -> None:
    doc = openapi_document(config)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http",
                                     "scheme": "bearer", "bearerFormat": "JWT"}
    assert schemes["apiKey"]["type"] == "apiKey"
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    schemas = doc["components"]["schemas"]
    assert set(TASK_FIELDS) <= set(schemas["Task"]["properties"])
    assert "cancel_requested" in schemas["Task"]["properties"]
    for name in ("Envelope", "Error", "Event", "Register", "Batch", "BatchResult"):
        assert name in schemas
    assert set(schemas["Envelope"]["required"]) == {"code", "message", "data"}
    assert set(schemas["Event"]["properties"]) == {
        "status", "progress", "message", "step", "result", "error", "error_type"}
    assert schemas["Batch"]["properties"]["events"]["maxItems"] == 1000
    paths = doc["paths"]
    assert paths["/api/task/tasks"]["post"]["security"] == [{"apiKey": []}]
    assert paths["/api/task/tasks"]["get"]["security"] == [{"bearerAuth": []}]
    assert paths["/healthz"]["get"]["security"] == []
    register = paths["/api/task/tasks"]["post"]
    assert register["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Register"}
    assert {"200", "201", "409"} <= set(register["responses"])


def test_websocket_description_covers_the_protocol(config: Config) -> None:
    ws = openapi_document(config)["paths"]["/api/task/ws/task/{user_id}"]["get"]
    text = ws["description"]
    for word in ("connected", "active_tasks", "task_status", "task_deleted", "subscribe",
                 "unsubscribe", "refresh", "token_expiring", "ping", "error", "resync"):
        assert word in text, word
    for code in ("1001", "1008", "1009", "4401", "4403", "4408", "4409"):
        assert code in text, code
    assert {p["name"] for p in ws["parameters"]} >= {"user_id", "token", "since", "epoch"}


async def test_openapi_json_is_served(client: Any, config: Config) -> None:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == openapi_document(config)


async def test_docs_page_is_served_and_self_contained(client: Any) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert "/api/openapi.json" in html
    assert "<style>" in html and "<script>" in html
    assert "WebSocket protocol" in html
    # no CDN, no external stylesheet or script
    assert not re.search(r"<(script|link)[^>]+(src|href)=", html)
    assert "http://" not in html and "https://" not in html


def test_the_task_schema_is_model_tasks_public_fields(config: Config) -> None:
    """Declared once: the schema's properties are model.Task's public fields in their
    order, typed from the declaration; internal columns never show."""
    from server.core.model import INTERNAL_FIELDS

    task = openapi_document(config)["components"]["schemas"]["Task"]
    assert tuple(task["properties"]) == TASK_FIELDS
    assert not set(INTERNAL_FIELDS) & set(task["properties"])
    assert task["properties"]["progress"]["type"] == "number"
    assert task["properties"]["message"] == {"type": "string", "nullable": True}
    assert "message" not in task["required"] and "seq" in task["required"]
