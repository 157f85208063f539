"""What the two generation endpoints do between parsing and replying.

    request body -> prompt token ids -> SamplingParams -> Generation.start()   (errors: HTTP status)
                 -> stream: EventStreamResponse of SSE chunks, then [DONE]
                 -> else:   collect the text while watching for a disconnect -> one JSON object

Errors before the first byte (bad input, queue full, no agents) become ordinary HTTP errors via
`errors.describe`; an engine failure mid-stream becomes an SSE error event followed by [DONE].
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from scheduler.types import GenerationRequest, RequestId, SamplingParams
from server import responses as objects
from server.state import ServerState
from server.detokenize import Detokenizer, StopBuffer
from server.errors import ClientDisconnected, InvalidRequest, describe
from server.generation import Generation, OutputAssembler, TokenInfo
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.streaming import DONE, EventStreamResponse, sse
from server.text import ChatMessage

log = logging.getLogger("potluck.server")
T = TypeVar("T")

DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions' max_tokens default, as OpenAI's
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest positive normal float32


@dataclass(frozen=True)
class Collected:
    text: str
    tokens: tuple[TokenInfo, ...]  # logprob entries; empty unless asked for


async def chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    model = state.check_model(body.model)
    # Off the event loop: a long conversation takes the tokenizer a while, and other streams go on.
    prompt = await asyncio.to_thread(state.text.chat_prompt, [ChatMessage(m.role, m.content) for m in body.messages])
    # By default the answer may use whatever context the prompt leaves.
    max_tokens = body.completion_limit or max(1, state.engine.context_length - len(prompt))
    top = body.top_logprobs or 0
    gen = _generation(state, "chatcmpl", prompt, body, max_tokens, bool(body.logprobs), top)
    env = objects.Envelope(gen.request_id, int(time.time()), model, state.text.fingerprint)
    await gen.start()
    # From here on `gen` holds engine work: every path must end in gen.close().
    if body.stream:
        frames = _chat_frames(state, gen, env, bool(body.logprobs), body.include_usage)
        return EventStreamResponse(frames, on_close=gen.close)
    out = await _collect_or_cancel(request, gen)
    logprobs = objects.chat_logprobs(out.tokens, state.text) if body.logprobs else None
    use = objects.usage(gen.prompt_tokens, gen.assembler.completion_tokens)
    return JSONResponse(objects.chat_completion(env, out.text, str(gen.assembler.finish_reason), logprobs, use))


async def text_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    model = state.check_model(body.model)
    prompt = await asyncio.to_thread(_completion_prompt, state, body.prompt)  # off the loop, as for chat
    max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
    want = body.logprobs is not None
    gen = _generation(state, "cmpl", prompt, body, max_tokens, want, body.logprobs or 0)
    env = objects.Envelope(gen.request_id, int(time.time()), model, state.text.fingerprint)
    await gen.start()
    if body.stream:
        return EventStreamResponse(_completion_frames(state, gen, env, want, body.include_usage), on_close=gen.close)
    out = await _collect_or_cancel(request, gen)
    logprobs = objects.completion_logprobs(out.tokens, state.text) if want else None
    use = objects.usage(gen.prompt_tokens, gen.assembler.completion_tokens)
    return JSONResponse(objects.text_completion(env, out.text, str(gen.assembler.finish_reason), logprobs, use))


def _completion_prompt(state: ServerState, prompt: str | tuple[int, ...]) -> list[int]:
    if isinstance(prompt, str):
        ids = state.text.encode(prompt)
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        return ids
    for token_id in prompt:
        if not 0 <= token_id < state.text.vocab_size:
            raise InvalidRequest(
                f"token id {token_id} is out of range: the vocabulary has {state.text.vocab_size} tokens "
                f"(ids 0..{state.text.vocab_size - 1})",
                param="prompt",
            )
    return list(prompt)


def sampling_params(
    body: SamplingFields, max_tokens: int, logprobs: bool, top: int, stop_token_ids: frozenset[int]
) -> SamplingParams:
    """The engine's sampling settings for a request; `stop_token_ids` are the model's end-of-sequence ids."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        # The wire carries float32, where a positive top_p below its smallest normal (5e-324, found
        # by fuzzing) would become 0 and be refused by the home; it means "the top token" either way.
        top_p=1.0 if body.top_p is None else max(body.top_p, FLOAT32_TINY),
        seed=body.seed,
        # ignore_eos: an end-of-sequence token is then an ordinary token, its text whatever
        # detokenizing it gives (as in vLLM), and only max_tokens (or the context) ends the request.
        stop_token_ids=frozenset() if body.ignore_eos else stop_token_ids,
        logprobs=logprobs,
        top_logprobs=top,
    )


def _generation(
    state: ServerState, prefix: str, prompt: list[int], body: SamplingFields, max_tokens: int, logprobs: bool, top: int
) -> Generation:
    sampling = sampling_params(body, max_tokens, logprobs, top, state.text.stop_token_ids)
    request = GenerationRequest(RequestId(f"{prefix}-{uuid.uuid4().hex}"), tuple(prompt), sampling, body.user)
    assembler = OutputAssembler(Detokenizer(state.text.decode, prompt), StopBuffer(body.stop), max_tokens, logprobs)
    return Generation(state.engine, request, assembler, state.metrics)


async def _collect_or_cancel(request: Request, gen: Generation) -> Collected:
    try:
        return await until_disconnected(request, _collect(gen))
    finally:
        await gen.close()


async def _collect(gen: Generation) -> Collected:
    texts: list[str] = []
    tokens: list[TokenInfo] = []
    async for delta in gen.deltas():
        texts.append(delta.text)
        tokens.extend(delta.tokens)
    return Collected("".join(texts), tuple(tokens))


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # closes the engine's iterator: the request is cancelled on the agents
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect (or never comes).
    while (await request.receive())["type"] != "http.disconnect":
        pass


Frames = AsyncGenerator[bytes, None]


async def _chat_frames(state: ServerState, gen: Generation, env: objects.Envelope, logprobs: bool, usage: bool) -> Frames:
    yield sse(objects.chat_chunk(env, {"role": "assistant", "content": ""}, with_usage=usage))

    def chunk(text: str, tokens: tuple[TokenInfo, ...]) -> bytes:
        lp = objects.chat_logprobs(tokens, state.text) if logprobs else None
        return sse(objects.chat_chunk(env, {"content": text}, logprobs=lp, with_usage=usage))

    async for frame in _frames(gen, env, "chat.completion.chunk", chunk, usage):
        yield frame


async def _completion_frames(
    state: ServerState, gen: Generation, env: objects.Envelope, logprobs: bool, usage: bool
) -> Frames:
    def chunk(text: str, tokens: tuple[TokenInfo, ...]) -> bytes:
        lp = objects.completion_logprobs(tokens, state.text) if logprobs else None
        return sse(objects.completion_chunk(env, text, logprobs=lp, with_usage=usage))

    async for frame in _frames(gen, env, "text_completion", chunk, usage):
        yield frame


async def _frames(
    gen: Generation, env: objects.Envelope, obj: str, chunk: Callable[[str, tuple[TokenInfo, ...]], bytes], usage: bool
) -> Frames:
    """Content chunks, the finish chunk, the usage chunk (if asked), [DONE]; or an error event."""
    deltas = gen.deltas()
    try:
        async for delta in deltas:
            if delta.text or delta.tokens:
                yield chunk(delta.text, delta.tokens)
        reason = gen.assembler.finish_reason
        if obj == "chat.completion.chunk":
            yield sse(objects.chat_chunk(env, {}, finish_reason=reason, with_usage=usage))
        else:
            yield sse(objects.completion_chunk(env, "", finish_reason=reason, with_usage=usage))
        if usage:
            yield sse(objects.usage_chunk(env, obj, objects.usage(gen.prompt_tokens, gen.assembler.completion_tokens)))
    except Exception as exc:  # noqa: BLE001 - the stream's boundary: every failure becomes an error event
        error = describe(exc)
        if error.status == 500:  # unexpected: with its traceback; the others are in the request's last log line
            log.error("request %s failed mid-stream: %s", gen.request_id, exc, exc_info=True)
        yield sse(error.body())
    finally:
        await deltas.aclose()
    yield DONE
