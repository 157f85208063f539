"""Request validation and the one error mapping: every refusal is a 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from scheduler.errors import AgentFailed, NoAgentsAvailable, PromptTooLong, QueueFull
from server.errors import ApiError, AuthenticationFailed, InvalidRequest, ModelNotFound, describe
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.serving import sampling_params

USER = [{"role": "user", "content": "hi"}]


def refusal(model: type[BaseModel], body: dict[str, Any]) -> ApiError:
    """The HTTP error FastAPI's validation of `body` would produce."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    return describe(RequestValidationError(errors))


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"n": 2}, "n", "only n=1"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "does not support tools"),
        ({"tool_choice": "auto"}, "tool_choice", "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions", "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format", "'json_object'"),
        ({"logit_bias": {"42": 5}}, "logit_bias", "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty", "non-zero presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs", "requires logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'tool' role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content", "'image_url'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ],
)
def test_chat_refusals_name_the_field(extra: dict[str, Any], param: str, words: str) -> None:
    error = refusal(ChatCompletionRequest, {"model": "m", "messages": USER, **extra})
    assert (error.status, error.type, error.param) == (400, "invalid_request_error", param)
    assert words in error.message


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"prompt": ["one", "two"]}, "prompt", "several prompts"),
        ({"prompt": []}, "prompt", "non-empty"),
        ({"prompt": [1, "a"]}, "prompt", "token ids"),
        ({"prompt": "x", "echo": True}, "echo", "echo=true"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "suffix": "tail"}, "suffix", "suffix"),
        ({}, "prompt", "missing"),
    ],
)
def test_completion_refusals_name_the_field(extra: dict[str, Any], param: str, words: str) -> None:
    error = refusal(CompletionRequest, {"model": "m", **extra})
    assert (error.status, error.param) == (400, param)
    assert words in error.message


def test_accepted_shapes() -> None:
    chat = ChatCompletionRequest.model_validate({
        "model": "m", "user": "u-1", "seed": 3, "stop": "END", "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 5, "max_completion_tokens": 7,
        "some_future_field": {"ignored": True}, "response_format": {"type": "text"}, "tools": [],
        "messages": [{"role": "developer", "content": "sys"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    })  # fmt: skip
    assert chat.stop == ("END",) and chat.include_usage and chat.completion_limit == 7
    assert [(m.role, m.content) for m in chat.messages] == [("system", "sys"), ("user", "a\nb")]
    assert CompletionRequest.model_validate({"prompt": [[1, 2, 3]]}).prompt == (1, 2, 3)
    assert CompletionRequest.model_validate({"prompt": ["text"]}).prompt == "text"


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_ignore_eos_leaves_the_end_of_sequence_ids_out_of_the_stop_ids(model: type[SamplingFields]) -> None:
    base: dict[str, Any] = {"messages": USER} if model is ChatCompletionRequest else {"prompt": "hi"}
    eos = frozenset({7, 9})
    default = model.model_validate(base)
    assert not default.ignore_eos and sampling_params(default, 16, False, 0, eos).stop_token_ids == eos
    ignoring = model.model_validate({**base, "ignore_eos": True})
    params = sampling_params(ignoring, 16, False, 0, eos)
    assert params.stop_token_ids == frozenset() and params.max_tokens == 16
    error = refusal(model, {**base, "ignore_eos": "sometimes"})
    assert (error.status, error.param) == (400, "ignore_eos")


def test_malformed_json_is_a_400_not_a_422() -> None:
    error = describe(RequestValidationError([{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error",
                                              "ctx": {"error": "Expecting value"}}]))  # fmt: skip
    assert error.status == 400 and "not valid JSON" in error.message and error.param is None


def test_engine_and_server_errors_map_to_openai_statuses() -> None:
    too_long = describe(PromptTooLong(3000, 100, 2048), "/v1/chat/completions")
    assert (too_long.status, too_long.code, too_long.param) == (400, "context_length_exceeded", "messages")
    assert describe(PromptTooLong(3000, 100, 2048), "/v1/completions").param == "prompt"
    full = describe(QueueFull(64, 2.2))
    assert (full.status, full.headers) == (429, {"Retry-After": "3"})
    assert describe(NoAgentsAvailable("none")).status == 503
    assert describe(AgentFailed("agent1 gone")).code == "agent_failed"
    assert describe(AuthenticationFailed()).status == 401
    missing = describe(ModelNotFound("gpt-4"))
    assert (missing.status, missing.code) == (404, "model_not_found")
    assert describe(InvalidRequest("bad", "prompt")).body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "prompt", "code": None}
    }
    assert describe(RuntimeError("boom")).status == 500
