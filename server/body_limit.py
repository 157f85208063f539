"""A bound on request bodies, before the app reads them: 413 in OpenAI's error shape.

    app.add_middleware(BodyLimit, max_bytes=4 * 2**20)

A declared Content-Length over the bound is refused without handing the body to the app; a body
sent without one (chunked) is counted as it arrives and refused when it passes the bound. Either
way no client can make the server parse and tokenize more than `max_bytes` (a 10 MB body held
the event loop for 12 s). What the client still sends of a refused body is read and dropped
before the answer (up to DRAIN_FACTOR bounds), so that it gets to read the 413.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protos.human import format_size
from server.errors import ApiError


DRAIN_FACTOR = 16  # a refused body is read and dropped up to this many times the bound, then cut off


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes  # 0: no bound

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.max_bytes:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive)
            await self._refuse(send, int(declared))
            return
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # The 413 goes out now; the app sees a client that left, and what it answers
                    # to that is dropped.
                    refused = True
                    if message.get("more_body"):
                        await self._drain(receive)
                    await self._refuse(send, None)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    async def _drain(self, receive: Receive) -> None:
        """Read what the client still sends of a refused body, without keeping it, before the 413:
        closing the connection on unread bytes resets it, and the client may never read the
        answer. A client that sends more than DRAIN_FACTOR bounds' worth is cut off."""
        left = DRAIN_FACTOR * self.max_bytes
        while left > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            left -= len(message.get("body", b""))

    async def _refuse(self, send: Send, size: int | None) -> None:
        what = f"{format_size(size)}" if size is not None else f"more than {format_size(self.max_bytes)}"
        error = ApiError(413, f"the request body is {what}; this server takes at most {format_size(self.max_bytes)} "
                         f"(--max-body)", "invalid_request_error", None, "request_too_large")  # fmt: skip
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})
