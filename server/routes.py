"""HTTP routes: each parses, delegates and converts in a few lines.

/v1/* requires the API key when one is configured; /health and /metrics never do (probes and
Prometheus scrape without credentials, as with vLLM and TGI).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from server import responses as objects
from server import serving, status
from server.version import potluck_version
from server.state import ServerState
from server.errors import AuthenticationFailed
from server.schemas import ChatCompletionRequest, CompletionRequest


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.potluck
    return state


State = Annotated[ServerState, Depends(get_state)]


def require_api_key(state: State, authorization: Annotated[str | None, Header()] = None) -> None:
    expected = state.settings.api_key
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    # Constant-time comparison, so response timing does not leak how much of a key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthenticationFailed()


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_api_key)])


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    return await serving.chat_completion(state, body, request)


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    return await serving.text_completion(state, body, request)


@v1.get("/models")
async def list_models(state: State) -> JSONResponse:
    card = objects.model_card(state.settings.served_model_name, state.created)
    return JSONResponse({"object": "list", "data": [card]})


@v1.get("/models/{model:path}")
async def retrieve_model(model: str, state: State) -> JSONResponse:
    return JSONResponse(objects.model_card(state.check_model(model), state.created))


@router.get("/health")
async def health(state: State) -> JSONResponse:
    """ok: every agent of the inventory serves; degraded (still 200): some do, the others are named
    with the reason; unavailable (503): none does."""
    snapshot = state.snapshot()
    agents = [{"name": a.name, "address": a.address, "up": a.up, **({} if a.up else {"problem": a.problem})}
              for a in (snapshot.agents if snapshot else ())]  # fmt: skip
    up = sum(a.up for a in (snapshot.agents if snapshot else ()))
    status = "unavailable" if not up else "ok" if up == len(agents) else "degraded"
    body = {
        "status": status, "agents": agents,
        "running": snapshot.running if snapshot else 0, "waiting": snapshot.waiting if snapshot else 0,
    }  # fmt: skip
    return JSONResponse(body, status_code=503 if status == "unavailable" else 200)


@admin.get("/status")
async def cluster_status(state: State) -> JSONResponse:
    """The cluster for `potluck status`: every agent's state, memory, holdings, traffic; the queue."""
    return JSONResponse(status.cluster_status(state.snapshot(), state.settings.served_model_name, potluck_version()))


@admin.get("/stats")
async def activation_stats(state: State) -> JSONResponse:
    """Which experts each home agent's requests chose over the statistics window: per MoE layer,
    every expert's selections, the histogram's entropy and the most frequent pairs."""
    return JSONResponse(state.engine.activation_stats())


@admin.get("/placement")
async def placement(state: State) -> JSONResponse:
    """Which experts each agent pins (the placement) and holds as cache, per MoE layer; the last
    replan's costs and whether it migrated."""
    return JSONResponse(state.engine.placement_report())


@admin.post("/replan")
async def replan(state: State) -> JSONResponse:
    """Re-plan the placement from the activation window now; migrates only if that pays."""
    return JSONResponse(await state.engine.replan())


@router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


router.include_router(v1)
router.include_router(admin)
