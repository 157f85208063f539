"""One request's generation: engine TokenEvents in, text Deltas out, with timings.

    gen = Generation(engine, request, assembler, metrics)
    await gen.start()                  # submits; QueueFull / NoAgentsAvailable / PromptTooLong here
    async for delta in gen.deltas():   # Delta(text, tokens); AgentFailed may come mid-way
        ...
    gen.assembler.finish_reason        # "stop" | "length"

`OutputAssembler` is the pure part (detokenizer + stop strings + which logprobs go with which
text); `Generation` adds the engine, the clock, metrics and the one log line per request. Leaving
`deltas()` early (the client went away, a stop string matched) closes the engine's iterator,
which cancels the request on every agent.
"""

from __future__ import annotations

import logging
import dataclasses
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import anyio

from scheduler.api import Engine
from scheduler.types import GenerationRequest, TokenEvent
from server.detokenize import Detokenizer, StopBuffer
from server.metrics import ServerMetrics

log = logging.getLogger("potluck.server")


@dataclass(frozen=True)
class TokenInfo:
    """One generated token as logprobs report it."""

    token_id: int
    logprob: float  # natural log
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first
    text_offset: int  # characters into the completion text where this token's text starts


@dataclass(frozen=True)
class Delta:
    """Text that may be sent now, and the logprobs of the tokens it completes."""

    text: str
    tokens: tuple[TokenInfo, ...] = ()


class OutputAssembler:
    """Turns TokenEvents into releasable text; decides the finish reason.

    A token's logprob entry is released with the delta that completes its text, so in a stream
    the logprobs always describe the text sent with them. After a stop string, entries of tokens
    whose text starts inside it are dropped, like the text.
    """

    def __init__(self, detokenizer: Detokenizer, stops: StopBuffer, max_tokens: int, logprobs: bool) -> None:
        self._detok, self._stops = detokenizer, stops
        self._max_tokens = max_tokens  # new tokens at most, counting an end-of-sequence token
        self._logprobs = logprobs
        self._decoded = 0  # characters the detokenizer produced so far
        self._released = 0  # characters released to the client so far (<= _decoded)
        # (entry, end offset of its text, whether it has text of its own), not yet released
        self._pending: deque[tuple[TokenInfo, int, bool]] = deque()
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # set once generation must end

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, event: TokenEvent) -> Delta:
        self.completion_tokens += 1
        if event.is_stop:
            # An end-of-sequence token ends the text; it is counted but never shown.
            self.finish_reason = "stop"
            return Delta("")
        piece = self._detok.push(event.token_id)
        if self._logprobs:
            info = TokenInfo(event.token_id, event.logprob or 0.0, event.top_logprobs, self._decoded)
            self._pending.append((info, self._decoded + len(piece), bool(piece)))
        self._decoded += len(piece)
        delta = self._release(self._stops.push(piece))
        if self._stops.matched is None and self.completion_tokens >= self._max_tokens:
            self.finish_reason = "length"
        return delta

    def finish(self) -> Delta:
        """The end: release what was held back; the reason is "length" unless something stopped it."""
        text = ""
        if self._stops.matched is None:
            text = self._stops.push(self._detok.flush())
            text += self._stops.flush()
        delta = self._release(text, final=True)
        if self.finish_reason is None:
            self.finish_reason = "length"  # the engine ended the stream: max_tokens or context full
        return delta

    def _release(self, text: str, final: bool = False) -> Delta:
        self._released += len(text)
        if self._stops.matched is not None:
            self.finish_reason = "stop"
            tokens = tuple(info for info, _, _ in self._pending if info.text_offset < self._released)
            self._pending.clear()
            return Delta(text, tokens)
        # Tokens holding only part of a character (no text of their own yet) wait for the token
        # that completes it, so every entry is released with text it contributed to.
        count = len(self._pending) if final else 0
        for index, (_, end, has_text) in enumerate(self._pending):
            if final or end > self._released:
                break
            if has_text:
                count = index + 1
        released = [self._pending.popleft()[0] for _ in range(count)]
        return Delta(text, tuple(released))


class Generation:
    """Drives one request through the engine; observes metrics and logs one line at the end."""

    def __init__(
        self,
        engine: Engine,
        request: GenerationRequest,
        assembler: OutputAssembler,
        metrics: ServerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request, self.assembler = dataclasses.replace(request, on_admitted=self._on_admitted), assembler
        self._engine, self._metrics, self._clock = engine, metrics, clock
        self._events: AsyncIterator[TokenEvent] | None = None
        self._submitted = 0.0  # clock() at submission, seconds
        self._admitted: float | None = None  # clock() when it left the queue
        self._first_token: float | None = None
        self._last_token: float | None = None
        self._outcome = "cancelled"  # the log's finish_reason unless generation completes
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    async def start(self) -> None:
        """Submit to the engine; its refusals (queue full, no agents, prompt too long) raise here."""
        self._submitted = self._clock()
        self._events = await self._engine.submit(self.request)
        self._metrics.prompt_tokens.inc(self.prompt_tokens)

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        """Text as it becomes releasable; the last delta comes after finish_reason is set."""
        assert self._events is not None, "start() first"
        try:
            async for event in self._events:
                self._on_token()
                delta = self.assembler.push(event)
                if delta.text or delta.tokens:
                    yield delta
                if self.assembler.done:
                    break
            final = self.assembler.finish()
            self._outcome = str(self.assembler.finish_reason)
            yield final
        except Exception as exc:
            self._outcome = f"error ({type(exc).__name__}: {exc})"
            raise
        finally:
            await self.close()

    async def close(self) -> None:
        """End the request (idempotent): close the engine's iterator, record metrics and the log.

        Whoever holds a started Generation calls this on every path, including the ones where
        `deltas()` never started (a client gone before its first token), since closing an
        unstarted async generator would not run its `finally`.
        """
        if self._closed or self._events is None:
            return
        self._closed = True
        close = getattr(self._events, "aclose", None)
        if close is not None:
            # Shielded: when the client's task is being cancelled, closing the engine iterator
            # must still complete, or the request would keep running on the agents.
            with anyio.CancelScope(shield=True):
                await close()
        self._record(self._outcome)

    def _on_token(self) -> None:
        now = self._clock()
        if self._first_token is None:
            self._first_token = now
            self._metrics.time_to_first_token.observe(now - self._submitted)
        elif self._last_token is not None:
            self._metrics.inter_token_latency.observe(now - self._last_token)
        self._last_token = now

    def _on_admitted(self) -> None:
        self._admitted = self._clock()
        self._metrics.queue_time.observe(self._admitted - self._submitted)

    def _record(self, outcome: str) -> None:
        total = self._clock() - self._submitted
        self._metrics.e2e_request_latency.observe(total)
        self._metrics.generation_tokens.inc(self.assembler.completion_tokens)
        if self._admitted is not None and self._first_token is not None:
            self._metrics.prefill_time.observe(self._first_token - self._admitted)
        if self._first_token is not None and self._last_token is not None:
            self._metrics.decode_time.observe(self._last_token - self._first_token)
        self._metrics.finished(outcome if outcome in ("stop", "length") else "abort")
        ttft = f"{self._first_token - self._submitted:.3f}s" if self._first_token is not None else "-"
        log.info(
            "request %s finished: prompt_tokens=%d output_tokens=%d ttft=%s total=%.3fs finish_reason=%s",
            self.request_id, self.prompt_tokens, self.assembler.completion_tokens, ttft, total, outcome,
        )  # fmt: skip
