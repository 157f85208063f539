"""The HTTP boundary's errors: every failure leaves as OpenAI's error object, mapped here once.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

`describe(exc)` is the one mapping (exception -> status and body); `install_error_handlers` hands
it to FastAPI, and the SSE stream uses it for errors that happen after the first byte was sent.
FastAPI's own 422 for a bad body is turned into a 400 naming the field, as OpenAI does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from scheduler.errors import AgentFailed, NoAgentsAvailable, PotluckError, PromptTooLong, QueueFull

log = logging.getLogger("potluck.server")

# A 503 says when to try again: agents are polled every 2 s, and `potluck up` restarts a dead one
# within seconds.
AGAIN = {"Retry-After": "5"}


class InvalidRequest(Exception):
    """The request is well-formed JSON but asks for something we cannot do (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class AuthenticationFailed(Exception):
    """An API key is configured and the request's Bearer token is missing or wrong (HTTP 401)."""


class ModelNotFound(Exception):
    """The request names a model this server does not serve (HTTP 404)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"the model '{model}' does not exist; see GET /v1/models")


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; the request was cancelled."""


@dataclass(frozen=True)
class ApiError:
    """An error as it leaves the server."""

    status: int  # HTTP status
    message: str
    type: str  # OpenAI's error type, e.g. "invalid_request_error"
    param: str | None = None  # the request field at fault, dotted (e.g. "messages[0].content")
    code: str | None = None  # machine-readable reason, e.g. "context_length_exceeded"
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def describe(exc: Exception, path: str = "") -> ApiError:
    """The one mapping from an exception to an HTTP error; `path` is the request's URL path."""
    match exc:
        case InvalidRequest():
            return ApiError(400, exc.message, "invalid_request_error", exc.param, exc.code)
        case RequestValidationError():
            return _validation_error(exc)
        case PromptTooLong():
            param = "messages" if path.endswith("/chat/completions") else "prompt"
            return ApiError(400, str(exc), "invalid_request_error", param, "context_length_exceeded")
        case AuthenticationFailed():
            message = "invalid or missing API key; send 'Authorization: Bearer <key>'"
            return ApiError(401, message, "invalid_request_error", None, "invalid_api_key")
        case ModelNotFound():
            return ApiError(404, str(exc), "invalid_request_error", "model", "model_not_found")
        case QueueFull():
            # Retry-After is whole seconds (RFC 9110), at least 1.
            retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
            return ApiError(429, str(exc), "rate_limit_error", None, "queue_full", retry)
        case NoAgentsAvailable():
            message = f"no node agent is available: {exc}" if str(exc) else "no node agent is available"
            return ApiError(503, message, "service_unavailable_error", None, "no_agents_available", AGAIN)
        case AgentFailed():
            return ApiError(503, f"a node agent failed: {exc}", "service_unavailable_error", None, "agent_failed", AGAIN)
        case PotluckError():
            return ApiError(500, str(exc), "server_error", None, type(exc).__name__)
        case ClientDisconnected():
            # Nobody reads this; 499 (nginx's "client closed request") keeps it apart in metrics.
            return ApiError(499, "client disconnected", "invalid_request_error")
        case HTTPException():
            kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
            return ApiError(exc.status_code, str(exc.detail), kind, None, None, dict(exc.headers or {}))
        case _:
            return ApiError(500, "internal server error; see the server log", "server_error")


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    error = describe(exc, request.url.path)
    if error.status > 500 and not isinstance(exc, AgentFailed):
        # 500s are not logged here: Starlette re-raises them after this handler, and the ASGI
        # server logs them with their traceback. An agent's failure was logged where it happened.
        log.error("request %s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    for kind in (InvalidRequest, RequestValidationError, AuthenticationFailed, ModelNotFound, ClientDisconnected,
                 PotluckError, HTTPException, Exception):  # fmt: skip
        app.add_exception_handler(kind, handle_error)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's validation errors (a list) -> one 400 naming the first bad field."""
    errors = list(exc.errors())
    if not errors:
        return ApiError(400, "invalid request", "invalid_request_error")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON: {detail}", "invalid_request_error")
    if not loc:
        return ApiError(400, f"invalid request body: {first.get('msg', '')}", "invalid_request_error")
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if first.get("type") == "missing":
        return ApiError(400, f"missing required parameter '{param}'", "invalid_request_error", param)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in first:
        message += f" (got {_short(first['input'])})"
    return ApiError(400, f"invalid value for '{param}': {message}", "invalid_request_error", param)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
