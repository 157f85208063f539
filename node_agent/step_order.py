"""The order of a home's decode steps: one step at a time, and a request's steps in the order of
their positions, not of their arrival.

    async with order.turn(spans):   # once every span's request has its K/V up to the span
        ...the step...
    order.moved()                   # a request was released: the steps waiting look again

Two calls in flight on one channel may reach the handlers in either order (fuzzing the API, a
chat request failed with its span at position 589 and its K/V at 588), and the scheduler sends
a request's next step before the reply of the one it follows (`batching.HOME_DEPTH`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

from node_agent.kv_cache import KVCache
from protos.messages import DecodeSpan

# How long a step whose span starts past its request's K/V waits for the step before it to
# arrive, when no other step of that request is here: pipelined steps leave the scheduler
# together, so the one before comes within a round trip unless it was never sent.
ARRIVAL_GRACE_S = 2.0


class StepOrder:
    def __init__(self, caches: Mapping[str, KVCache], peer_timeout_s: float) -> None:
        self.caches = caches  # the requests homed here (HomeCaches.caches)
        self.peer_timeout_s = peer_timeout_s  # how long a step waits while another of its requests is here
        self._one_step = asyncio.Lock()  # steps run one at a time, in the order they became ready
        self._waiting: list[asyncio.Future[None]] = []  # steps waiting for their turn (see _in_order)
        self._arrived: dict[str, int] = {}  # request id -> its steps here, running or waiting

    @contextlib.asynccontextmanager
    async def turn(self, spans: Sequence[DecodeSpan]) -> AsyncIterator[None]:
        """The step of `spans` runs inside: alone, and after the steps its spans follow."""
        for span in spans:
            self._arrived[span.request_id] = self._arrived.get(span.request_id, 0) + 1
        try:
            await self._in_order(spans)
            async with self._one_step:
                yield
        finally:
            for span in spans:
                if (left := self._arrived[span.request_id] - 1) > 0:
                    self._arrived[span.request_id] = left
                else:
                    del self._arrived[span.request_id]
            self.moved()

    async def _in_order(self, spans: Sequence[DecodeSpan]) -> None:
        """Until every span's request has its K/V up to where the span starts. It waits while
        another step of its requests is here (running or waiting), else ARRIVAL_GRACE_S for one
        to arrive; a span that skips positions, or whose request was released meanwhile, is then
        let through for the step's checks (`decode_batch`) to refuse."""
        def behind() -> list[DecodeSpan]:
            return [s for s in spans if (c := self.caches.get(s.request_id)) is not None and s.position > c.next]

        loop = asyncio.get_running_loop()
        start = loop.time()
        while waiting := behind():
            coming = any(self._arrived.get(s.request_id, 0) > 1 for s in waiting)  # a step of it besides this one
            left = start + (self.peer_timeout_s if coming else ARRIVAL_GRACE_S) - loop.time()
            if left <= 0:
                return
            turn = loop.create_future()
            self._waiting.append(turn)
            try:
                await asyncio.wait_for(turn, left)
            except TimeoutError:
                pass  # look again: a step may have come meanwhile

    def moved(self) -> None:
        """A step ended or a request was released: the steps waiting for their turn look again."""
        waiting, self._waiting = self._waiting, []
        for turn in waiting:
            if not turn.done():
                turn.set_result(None)
