"""Server-sent events: `data: {json}\\n\\n` per chunk, `data: [DONE]\\n\\n` at the end.

`EventStreamResponse` sends an async generator of SSE frames and listens for the client's
disconnect at the same time; when the client goes away it stops sending, closes the generator
and calls `on_close` (which closes the engine's iterator: the request is cancelled everywhere).
Starlette's StreamingResponse only notices a disconnect on some ASGI versions, so we own this.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    """One SSE frame carrying `data` as compact JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStreamResponse(Response):
    """A text/event-stream response that stops, and closes its source, when the client leaves."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]]) -> None:
        # No body and so no Content-Length: the response is chunked.
        self.status_code = 200
        self.background = None
        self._frames = frames
        self._on_close = on_close  # runs last on every path, even if `frames` never started
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def pump() -> None:
                    await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                    async for frame in self._frames:
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    group.cancel_scope.cancel()  # done: stop listening for a disconnect

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()  # the client left: stop pumping

                group.start_soon(pump)
                group.start_soon(watch)
        except* OSError:
            pass  # the connection broke while sending: the same as a disconnect
        finally:
            with anyio.CancelScope(shield=True):
                await self._frames.aclose()
                await self._on_close()
