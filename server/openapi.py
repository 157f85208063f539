"""`/openapi.json` as the server behaves: the errors each route really sends, in OpenAI's shape.

FastAPI documents a 422 for every route with a body or a parameter; this server answers a bad
body with 400 (as OpenAI does), so the 422 goes, and each operation lists the statuses below with
the one error schema they all share.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}  # fmt: skip

WHY = {
    400: "Invalid or unsupported input; `param` names the field",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    413: "Request body larger than --max-body",
    429: "Queue full (--max-running running, --max-waiting waiting); see Retry-After",
    500: "Internal error",
    503: "No agent can serve, or an agent failed mid-request",
}

GENERATION = (400, 401, 404, 413, 429, 500, 503)
ERRORS: dict[str, tuple[int, ...]] = {  # path -> statuses besides 200
    "/v1/chat/completions": GENERATION, "/v1/completions": GENERATION,
    "/v1/models": (401, 500), "/v1/models/{model}": (401, 404, 500),
    "/admin/status": (401, 500), "/admin/stats": (401, 500, 503),
    "/admin/placement": (401, 500, 503), "/admin/replan": (401, 500, 503), "/health": (503,), "/metrics": (500,),
}  # fmt: skip


_TEXT = {"schema": {"type": "string"}}
OK_CONTENT: dict[str, dict[str, Any]] = {  # what a 200 carries besides JSON
    "/v1/chat/completions": {"text/event-stream": _TEXT}, "/v1/completions": {"text/event-stream": _TEXT},
    "/metrics": {"text/plain": _TEXT},
}  # fmt: skip


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            components["ErrorResponse"] = ERROR_SCHEMA
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    ok = responses.setdefault("200", {"description": "Successful Response"})
                    ok["content"] = {**ok.get("content", {}), **OK_CONTENT.get(path, {})}
                    if path == "/metrics":  # Prometheus' text format, not JSON
                        ok["content"].pop("application/json", None)
                    for status in ERRORS.get(path, (500,)):
                        responses[str(status)] = {"description": WHY[status], "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
