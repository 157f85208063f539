"""Request bodies of the OpenAI-compatible API, validated field by field.

A bad field fails here with the field's name in the error's `loc`, which `errors.describe` turns
into OpenAI's `param`. Fields we cannot honour (tools, n > 1, penalties, echo, ...) are refused
by name rather than silently ignored; unknown extra fields are ignored, as OpenAI's SDKs add
new ones over time. Cross-field checks use `info.data`, so a field is declared after the fields
it depends on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt,
                      ValidationInfo, field_validator)
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _unicode(value: str) -> str:
    """Text that can be encoded: JSON's escapes can spell a lone UTF-16 surrogate ("\\ud800"),
    which is no character and which no tokenizer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise PydanticCustomError("unicode", "the text holds a lone surrogate (\\u{code}) at index {at}, which is "
                                  "not a character", {"code": f"{ord(bad):04x}", "at": exc.start}) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


def _unsupported(what: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", "this server does not support {what}", {"what": what})


def _text_content(value: Any) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") not in ("text", None):
                raise _unsupported(f"content parts of type {part.get('type')!r} (only 'text')")
            if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                raise PydanticCustomError("content", "each content part must be {'type': 'text', 'text': '...'}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise PydanticCustomError("content", "content must be a string or a non-empty list of text parts")


def _role(value: Any) -> str:
    if value == "developer":
        return "system"  # OpenAI's newer name for the system role
    if value in ("tool", "function"):
        raise _unsupported(f"the {value!r} role (no tools)")
    return str(value) if isinstance(value, str) else value


def _stop(value: Any) -> tuple[str, ...]:
    """`stop`: null, one string or a list of up to 4 non-empty strings."""
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise PydanticCustomError("stop", "stop must be a non-empty string or a list of non-empty strings")
    for stop in stops:
        _unicode(stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise PydanticCustomError("stop", "at most {n} stop strings are allowed", {"n": MAX_STOP_STRINGS})
    return tuple(dict.fromkeys(stops))  # duplicates dropped, order kept


def _prompt(value: Any) -> str | tuple[int, ...]:
    """`prompt`: a string or a list of token ids; a one-element list of either is unwrapped."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str | list) for v in value):
        raise _unsupported("a batch of several prompts")
    raise PydanticCustomError("prompt", "prompt must be a string or a non-empty list of token ids")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Annotated[Literal["system", "user", "assistant"], BeforeValidator(_role)]
    content: Annotated[str, BeforeValidator(_text_content), AfterValidator(_unicode)]
    name: Text | None = None  # accepted and ignored


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False  # send a last chunk with usage (and no choices) before [DONE]


class SamplingFields(BaseModel):
    """Fields chat and completions share."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None  # None: the served model
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0; 0 means greedy
    top_p: float | None = Field(None, gt=0, le=1)  # None: 1.0
    n: StrictInt | None = None
    stop: Annotated[tuple[str, ...], BeforeValidator(_stop)] = ()
    seed: StrictInt | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # picks the request's home agent (scheduler/decode_plan.user_home)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extension: end-of-sequence tokens do not stop generation, which runs to max_tokens
    # (benchmarks use it so that every request decodes the same number of tokens).
    ignore_eos: StrictBool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise PydanticCustomError("unsupported", "only n=1 is supported (one choice per request)")
        return n

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise PydanticCustomError("stream_options", "stream_options is only allowed when stream is true")
        return options

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value not in (None, 0):
            raise _unsupported(f"a non-zero {info.field_name}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise _unsupported("logit_bias")
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # wins over max_tokens when both are set
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None  # meaningless without tools; ignored

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise PydanticCustomError("top_logprobs", "top_logprobs requires logprobs to be true")
        return top

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        if fmt is not None and fmt.get("type", "text") != "text":
            raise _unsupported(f"response_format of type {fmt.get('type')!r} (only 'text')")
        return fmt

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if value:
            raise _unsupported(str(info.field_name))
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, "none"):
            raise _unsupported(str(info.field_name))
        return value

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    """POST /v1/completions (the legacy text API)."""

    prompt: Annotated[str | tuple[int, ...], BeforeValidator(_prompt)]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise _unsupported("echo=true")
        return echo

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise _unsupported("best_of other than 1")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise _unsupported("suffix")
        return suffix
