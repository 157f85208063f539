"""One request's tokens as its consumer reads them (`Batcher.submit`).

    stream = batcher.submit(request)      # queued now
    async for event in stream: ...        # TokenEvent per sampled token; the request's error raises
    await stream.aclose()                 # out of the queue, or released on every agent
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from scheduler.types import TokenEvent


class TokenStream:
    """AsyncIterator[TokenEvent] over the queue the scheduler loop fills (a token, the request's
    error, or None at its end). `aclose()` ends it on every path, also before the first token was
    asked for (an async generator's close would then run nothing and leave the request queued with
    no one to read it); `leave` takes the request out and returns once that is done."""

    def __init__(self, out: asyncio.Queue[TokenEvent | BaseException | None], leave: Callable[[], Awaitable[None]],
                 on_close: Callable[[], None] | None = None) -> None:
        self._out, self._leave, self._on_close = out, leave, on_close
        self._closed = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._closed:
            raise StopAsyncIteration
        item = await self._out.get()
        if item is None:
            await self.aclose()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._leave()
        finally:
            if self._on_close is not None:
                self._on_close()
