"""Every refusal, as OpenAI's SDK sees it and as it is on the wire: {"error": {message, type, param, code}}."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.conftest import API_KEY, PotluckUp

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def error_of(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ],
)
def test_bad_chat_parameters_are_400_naming_the_field(client: OpenAI, model_id: str, extra: dict[str, Any],
                                                      param: str) -> None:  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=2, **extra)
    assert info.value.status_code == 400 and info.value.param == param
    assert info.value.type == "invalid_request_error"


def test_context_overflow_is_context_length_exceeded(client: OpenAI, model_id: str, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=100_000)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    reply = httpx.post(f"{base_url}/v1/completions", json={"model": model_id, "prompt": [7] * 5000, "max_tokens": 1})
    assert error_of(reply, 400)["code"] == "context_length_exceeded"


def test_token_id_out_of_range(client: OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt=[5, 10_000_000], max_tokens=2)
    assert info.value.param == "prompt" and "10000000" in info.value.message


def test_batches_and_echo_are_refused(client: OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt=["one", "two"], max_tokens=2)
    assert info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt="one", max_tokens=2, echo=True)
    assert info.value.param == "echo"


def test_malformed_bodies_are_400_not_422(base_url: str, model_id: str) -> None:
    url = f"{base_url}/v1/chat/completions"
    broken = httpx.post(url, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert error_of(broken, 400)["type"] == "invalid_request_error"
    missing = httpx.post(url, json={"model": model_id})
    assert error_of(missing, 400)["param"] == "messages"
    wrong_type = httpx.post(url, json={"model": model_id, "messages": HELLO, "max_tokens": "many"})
    assert error_of(wrong_type, 400)["param"] == "max_tokens"
    content = httpx.post(url, json={"model": model_id, "messages": [{"role": "user", "content": 5}]})
    assert error_of(content, 400)["param"] == "messages[0].content"


def test_unknown_model_is_404(client: OpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert error_of(httpx.get(f"{base_url}/v1/models/gpt-4o"), 404)["code"] == "model_not_found"


def test_api_key_is_required_on_v1_only(guarded: PotluckUp) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        guarded.client("wrong-key").models.list()
    assert info.value.status_code == 401
    assert error_of(httpx.get(f"{guarded.url}/v1/models"), 401)["code"] == "invalid_api_key"
    wrong = httpx.post(f"{guarded.url}/v1/chat/completions", json={"messages": HELLO},
                       headers={"Authorization": "Bearer nope"})  # fmt: skip
    error_of(wrong, 401)
    assert [m.id for m in guarded.client(API_KEY).models.list().data] == ["tiny-guarded"]
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200


def test_full_queue_is_429_with_retry_after(guarded: PotluckUp) -> None:
    """--max-waiting 0: while one request runs, the next is refused at once."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long = {"model": "tiny-guarded", "messages": HELLO, "max_tokens": 400, "stream": True, "temperature": 0}  # no chance EOS
    with httpx.stream("POST", f"{guarded.url}/v1/chat/completions", json=long, headers=headers, timeout=60) as running:
        lines = running.iter_lines()
        # Past the role chunk, a content chunk proves the first request is being computed.
        next(line for line in lines if '"content":"' in line and '"role"' not in line)
        refused = httpx.post(f"{guarded.url}/v1/chat/completions", headers=headers,
                             json={"model": "tiny-guarded", "messages": HELLO, "max_tokens": 2})  # fmt: skip
        error = error_of(refused, 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert error["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            guarded.client(API_KEY).completions.create(model="tiny-guarded", prompt="x", max_tokens=2)
    # Closing the stream cancelled the first request: the queue drains and the next one runs.
    deadline = time.monotonic() + 10
    while httpx.get(f"{guarded.url}/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    reply = guarded.client(API_KEY).completions.create(model="tiny-guarded", prompt="x", max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")
