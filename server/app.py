"""The FastAPI application: `create_app(settings, open_engine)`.

    app = create_app(ServerSettings(model_dir, "my-model"), open_engine)
    uvicorn.run(app)     # the lifespan enters open_engine() and exits it on shutdown

`open_engine` is an async context manager factory: the CLI passes one that calls
`scheduler.service.start_engine` and `service.stop()`; nothing in this package knows how agents
are reached. The tokenizer is loaded when the app is created, so a bad model folder fails
before the server binds its port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from scheduler.api import Engine
from server.body_limit import BodyLimit
from server.openapi import install_openapi
from server.version import potluck_version
from server.errors import install_error_handlers
from server.metrics import RequestCounter
from server.routes import router
from server.state import ServerSettings, ServerState
from server.text import TextModel

__all__ = ["EngineOpener", "ServerSettings", "create_app"]

EngineOpener = Callable[[], AbstractAsyncContextManager[Engine]]


def create_app(settings: ServerSettings, open_engine: EngineOpener) -> FastAPI:
    state = ServerState(settings, TextModel.load(settings.model_dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_engine() as engine:
            state.attach(engine)
            try:
                yield
            finally:
                state.attach(None)

    app = FastAPI(title="potluck", version=potluck_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.potluck = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=state.metrics)  # outermost: counts the 413s too
    app.include_router(router)
    install_openapi(app)
    return app
