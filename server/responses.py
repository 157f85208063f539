"""Response objects and stream chunks, shaped exactly as OpenAI's API reference defines them.

    chat.completion        {id: "chatcmpl-..", object, created, model, system_fingerprint,
                            choices: [{index, message: {role, content}, logprobs, finish_reason}],
                            usage: {prompt_tokens, completion_tokens, total_tokens}}
    chat.completion.chunk  same envelope, choices: [{index, delta, logprobs, finish_reason}]
    text_completion        id "cmpl-..", choices: [{text, index, logprobs, finish_reason}]

Chat logprobs are {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]};
completion logprobs are {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.generation import TokenInfo
from server.text import TextModel

JSON = dict[str, Any]


@dataclass(frozen=True)
class Envelope:
    """What every object and chunk of one response repeats."""

    id: str  # "chatcmpl-<hex>" or "cmpl-<hex>"; also the engine's request id
    created: int  # Unix seconds
    model: str  # the served model name
    system_fingerprint: str  # changes when the checkpoint does

    def header(self, obj: str) -> JSON:
        return {
            "id": self.id, "object": obj, "created": self.created, "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }  # fmt: skip


def chat_logprobs(tokens: Sequence[TokenInfo], text: TextModel) -> JSON:
    def entry(token_id: int, logprob: float) -> JSON:
        return {"token": text.token_text(token_id), "logprob": logprob, "bytes": text.token_bytes(token_id)}

    return {
        "content": [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: Sequence[TokenInfo], text: TextModel) -> JSON:
    return {
        "tokens": [text.token_text(t.token_id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text.token_text(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": [t.text_offset for t in tokens],
    }


def chat_completion(env: Envelope, content: str, finish_reason: str, logprobs: JSON | None, use: JSON) -> JSON:
    choice = {
        "index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
        "logprobs": logprobs, "finish_reason": finish_reason,
    }  # fmt: skip
    return {**env.header("chat.completion"), "choices": [choice], "usage": use}


def chat_chunk(
    env: Envelope, delta: JSON, finish_reason: str | None = None, logprobs: JSON | None = None, with_usage: bool = False
) -> JSON:
    """One chunk with one choice; `with_usage` adds `"usage": null` (stream_options.include_usage)."""
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**env.header("chat.completion.chunk"), "choices": [choice], **({"usage": None} if with_usage else {})}


def text_completion(env: Envelope, text: str, finish_reason: str, logprobs: JSON | None, use: JSON) -> JSON:
    choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**env.header("text_completion"), "choices": [choice], "usage": use}


def completion_chunk(
    env: Envelope, text: str, finish_reason: str | None = None, logprobs: JSON | None = None, with_usage: bool = False
) -> JSON:
    choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**env.header("text_completion"), "choices": [choice], **({"usage": None} if with_usage else {})}


def usage_chunk(env: Envelope, obj: str, use: JSON) -> JSON:
    """The last chunk before [DONE] with stream_options.include_usage: no choices, the usage."""
    return {**env.header(obj), "choices": [], "usage": use}


def model_card(model_id: str, created: int) -> JSON:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "potluck"}
