"""OpenAI-compatible chat-completions schema: request validation, response shapes, error bodies.

Pure pydantic: the BentoML service (bentos/service.py) parses the raw body with
`parse_chat_request` and turns every `OpenAIError` into the JSON body OpenAI's own API
returns, so any OpenAI client surfaces a proper `openai.BadRequestError` & co.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Roles the chat template understands; "developer" is OpenAI's newer name for "system".
ALLOWED_ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4


class OpenAIError(Exception):
    """An error that is reported to the client as OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, error_type=self.error_type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def invalid_api_key_error() -> OpenAIError:
    return OpenAIError(
        401,
        "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
    )


def internal_error() -> OpenAIError:
    # Never the exception text: it may hold prompt fragments or paths.
    return OpenAIError(
        500, "The server had an error while processing your request.", error_type="server_error"
    )


# ---------------------------------------------------------------------------------------------
# Request models. strict=True: "temperature": "hot" or "max_tokens": "10" are rejected instead of
# coerced; extra="forbid": an unknown argument is a 400, as on OpenAI's API.
# ---------------------------------------------------------------------------------------------


class TextContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    messages: list[ChatMessage]
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # Accepted because clients send them, but only their neutral value is supported.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


@dataclass(frozen=True)
class ServingLimits:
    """Limits the server enforces on every request (named in the error when exceeded)."""

    max_prompt_tokens: int
    max_completion_tokens: int
    max_request_bytes: int = 1 << 20
    default_completion_tokens: int = 256


@dataclass(frozen=True)
class ValidatedChatRequest:
    """A request that passed validation, normalised for the engine."""

    model: str
    messages: list[dict[str, str]]
    temperature: float
    top_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    presence_penalty: float
    frequency_penalty: float
    max_tokens_explicit: bool = True  # False: the server's default, cut to what fits the context

    @property
    def last_user_message(self) -> str:
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return ""


def _param_of(error: dict[str, Any]) -> str:
    parts: list[str] = []
    for item in error.get("loc", ()):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _validation_error_to_openai(exc: ValidationError) -> OpenAIError:
    first = exc.errors(include_url=False, include_input=False)[0]
    param = _param_of(first)
    if first["type"] == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return OpenAIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    return OpenAIError(
        400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value"
    )


def _reject_constant(name: str) -> Any:
    raise _BodyValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BodyValueError(f"the number {text[:40]} is out of range")
    return value


class _BodyValueError(ValueError):
    """A JSON value Python's parser accepts but a request may not hold (NaN, 1e400)."""


def parse_json_body(raw_body: bytes) -> Any:
    """json.loads for untrusted bodies: every way it can fail is a 400, never a 500.

    Python's parser accepts NaN/Infinity and turns 1e400 into inf; it raises RecursionError on
    deep nesting and ValueError on integers over 4300 digits; lone surrogates ("\\ud800")
    decode to strings the tokenizer cannot encode. All of these are refused here.
    """
    try:
        text = raw_body.decode("utf-8")
    except UnicodeDecodeError:
        raise OpenAIError(400, "We could not parse the JSON body of your request (invalid UTF-8).") from None
    try:
        payload = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise OpenAIError(400, f"We could not parse the JSON body of your request ({exc.msg}).") from None
    except RecursionError:
        raise OpenAIError(
            400, "We could not parse the JSON body of your request (nested too deeply)."
        ) from None
    except ValueError as exc:  # _BodyValueError, or an integer over Python's digit limit
        reason = str(exc) if isinstance(exc, _BodyValueError) else "a number is too large"
        raise OpenAIError(400, f"We could not parse the JSON body of your request ({reason}).") from None
    try:
        # Re-encoding finds lone surrogates wherever they are (keys, values, nested).
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(
            400, "We could not parse the JSON body of your request (a string holds a lone surrogate)."
        ) from None
    except (RecursionError, ValueError):
        raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
    return payload


def parse_chat_request(
    raw_body: bytes, *, served_model: str | None, limits: ServingLimits
) -> ValidatedChatRequest:
    """Parse and validate a raw /v1/chat/completions body; raise OpenAIError on anything wrong.

    Prompt-length limits need the tokenizer and are checked by the caller (`check_prompt_tokens`).
    `served_model=None` leaves the `model` field to the caller (several adapters by alias).
    """
    if len(raw_body) > limits.max_request_bytes:
        raise OpenAIError(
            413,
            f"Request body is {len(raw_body)} bytes; the limit is {limits.max_request_bytes} bytes.",
            code="request_too_large",
        )
    payload = parse_json_body(raw_body)
    if not isinstance(payload, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    try:
        request = ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise _validation_error_to_openai(exc) from None

    if served_model is not None and request.model != served_model:  # None: the caller routes
        raise OpenAIError(
            404,
            f"The model '{request.model}' does not exist. This server serves '{served_model}'.",
            param="model",
            code="model_not_found",
        )
    if not request.messages:
        raise OpenAIError(
            400, "'messages' must contain at least one message.", param="messages", code="empty_array"
        )
    messages: list[dict[str, str]] = []
    for index, message in enumerate(request.messages):
        if message.role not in ALLOWED_ROLES:
            raise OpenAIError(
                400,
                f"Invalid value for 'messages[{index}].role': '{message.role}'. Supported roles: {', '.join(ALLOWED_ROLES)}.",
                param=f"messages[{index}].role",
                code="invalid_value",
            )
        if message.content is None and message.role != "assistant":
            raise OpenAIError(
                400,
                f"'messages[{index}].content' is required for role '{message.role}'.",
                param=f"messages[{index}].content",
                code="invalid_value",
            )
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text()})
    if not any(m["role"] == "user" for m in messages):
        raise OpenAIError(400, "'messages' must contain at least one user message.", param="messages")

    _reject_unsupported(request)

    requested = request.max_completion_tokens or request.max_tokens
    if requested is not None and requested > limits.max_completion_tokens:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise OpenAIError(
            400,
            f"'{param}' is {requested}; this server's limit is {limits.max_completion_tokens} tokens.",
            param=param,
            code="invalid_value",
        )
    max_tokens = requested or min(limits.default_completion_tokens, limits.max_completion_tokens)

    stops: tuple[str, ...]
    if request.stop is None:
        stops = ()
    elif isinstance(request.stop, str):
        stops = (request.stop,)
    else:
        stops = tuple(request.stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise OpenAIError(400, f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences.", param="stop")
    if any(not s for s in stops):
        raise OpenAIError(400, "'stop' sequences must be non-empty strings.", param="stop")

    return ValidatedChatRequest(
        model=request.model,
        messages=messages,
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=max_tokens,
        stop=stops,
        seed=request.seed,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        max_tokens_explicit=requested is not None,
    )


def default_max_tokens(chat: ValidatedChatRequest, prompt_tokens: int, context_length: int) -> int:
    """The request's max_tokens; a server default is cut to what the context leaves (at least 1)."""
    if chat.max_tokens_explicit:
        return chat.max_tokens
    return max(1, min(chat.max_tokens, context_length - prompt_tokens))


def _reject_unsupported(request: ChatCompletionRequest) -> None:
    def unsupported(param: str, what: str) -> OpenAIError:
        return OpenAIError(
            400, f"'{param}': {what} is not supported by this server.", param=param, code="unsupported_value"
        )

    if request.n != 1:
        raise unsupported("n", "n other than 1")
    if request.logprobs:
        raise unsupported("logprobs", "logprobs")
    if request.top_logprobs:
        raise unsupported("top_logprobs", "top_logprobs")
    if request.logit_bias:
        raise unsupported("logit_bias", "logit_bias")
    if request.tools:
        raise unsupported("tools", "tool calling")
    if request.tool_choice not in (None, "none", "auto"):
        raise unsupported("tool_choice", "tool_choice")
    if request.response_format and request.response_format.get("type") != "text":
        raise unsupported("response_format", "a response_format other than text")
    if not request.stream and request.stream_options is not None:
        raise OpenAIError(
            400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )


def check_prompt_tokens(
    prompt_tokens: int, max_tokens: int, *, limits: ServingLimits, context_length: int
) -> None:
    """Reject prompts over the server's prompt limit or that leave no room in the model's context."""
    if prompt_tokens > limits.max_prompt_tokens:
        raise OpenAIError(
            400,
            f"The prompt is {prompt_tokens} tokens; this server's limit is {limits.max_prompt_tokens} prompt tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    if prompt_tokens + max_tokens > context_length:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {context_length} tokens; the request asks for "
            f"{prompt_tokens} prompt + {max_tokens} completion tokens.",
            param="messages",
            code="context_length_exceeded",
        )


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    reasoning_content: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning_content is not None:
        # vLLM's and DeepSeek's name for the <think> part of a reasoning model's answer.
        message["reasoning_content"] = reasoning_content
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_body(prompt_tokens, completion_tokens),
    }


def chat_chunk_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, str],
    finish_reason: str | None,
    usage: dict[str, int] | None = None,
    include_choice: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": (
            [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
            if include_choice
            else []
        ),
    }
    if usage is not None:
        body["usage"] = usage
    return body


def sse_event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def models_list_body(model_id: str, *, created: int | None = None, owned_by: str = "llmft") -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": created or int(time.time()), "owned_by": owned_by}
        ],
    }


def overloaded_error(message: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        503,
        message,
        error_type="server_error",
        code="server_overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def rate_limited_error(key_name: str, retry_after_s: float) -> OpenAIError:
    return OpenAIError(
        429,
        f"Rate limit reached for API key '{key_name}'. Retry after {retry_after_s:.1f} s.",
        error_type="requests",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


def request_timeout_error(seconds: float) -> OpenAIError:
    return OpenAIError(408, f"The request body did not arrive within {seconds:g} s.", code="request_timeout")


def model_not_found_error(model: str, available: list[str]) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model '{model}' does not exist. This server serves: {', '.join(available) or 'nothing yet'}.",
        param="model",
        code="model_not_found",
    )
