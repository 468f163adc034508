"""Request validation, error shapes, API-key rules and settings of the model server (no model needed)."""

from __future__ import annotations

import json

import pytest

from llmft_assets.serving.auth import (
    ApiKeyConfigError,
    bearer_token_matches,
    ensure_key_for_bind_host,
    is_loopback_host,
    load_api_key,
)
from llmft_assets.serving.config import ServerSettings
from llmft_assets.serving.engine import find_stop, safe_emit_length
from llmft_assets.serving.openai_schema import (
    OpenAIError,
    ServingLimits,
    chat_chunk_body,
    check_prompt_tokens,
    parse_chat_request,
)
from llmft_assets.settings import storage_root as default_storage_root

LIMITS = ServingLimits(
    max_prompt_tokens=100, max_completion_tokens=64, max_request_bytes=2000, default_completion_tokens=16
)
MODEL = "llmft-chat"


def body(**fields: object) -> bytes:
    payload: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    payload.update(fields)
    return json.dumps(payload).encode()


def parse(raw: bytes):
    return parse_chat_request(raw, served_model=MODEL, limits=LIMITS)


def expect_error(raw: bytes, status: int, param: str | None = None) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse(raw)
    error = caught.value
    assert error.status_code == status, error.message
    if param is not None:
        assert error.param == param
    shape = error.to_body()["error"]
    assert set(shape) == {"message", "type", "param", "code"}
    assert "Traceback" not in shape["message"]
    return error


def test_valid_request_is_normalised() -> None:
    chat = parse(
        body(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}],
                },
            ],
            temperature=0,
            top_p=0.5,
            max_tokens=10,
            stop="\n\n",
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert (chat.temperature, chat.top_p, chat.max_tokens, chat.stop, chat.seed) == (
        0.0,
        0.5,
        10,
        ("\n\n",),
        7,
    )
    assert chat.stream and chat.include_usage
    assert chat.last_user_message == "What is 2+2?"


def test_defaults_and_max_completion_tokens() -> None:
    assert parse(body()).max_tokens == LIMITS.default_completion_tokens
    assert parse(body(max_completion_tokens=5)).max_tokens == 5


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"\xff\xfe", 400, None),
        (body(messages=[]), 400, "messages"),
        (body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
        (body(messages=[{"role": "user"}]), 400, "messages[0].content"),
        (body(messages=[{"role": "system", "content": "only a system prompt"}]), 400, "messages"),
        (body(temperature="hot"), 400, "temperature"),
        (body(temperature=3), 400, "temperature"),
        (body(top_p=0), 400, "top_p"),
        (body(max_tokens="10"), 400, "max_tokens"),
        (body(max_tokens=0), 400, "max_tokens"),
        (body(max_tokens=65), 400, "max_tokens"),
        (body(max_completion_tokens=1000), 400, "max_completion_tokens"),
        (body(stream="yes"), 400, "stream"),
        (body(seed=1.5), 400, "seed"),
        (body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (body(stop=[""]), 400, "stop"),
        (body(n=2), 400, "n"),
        (body(logprobs=True), 400, "logprobs"),
        (body(tools=[{"type": "function"}]), 400, "tools"),
        (body(stream_options={"include_usage": True}), 400, "stream_options"),
        (body(frobnicate=1), 400, "frobnicate"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "model"),
        (body(model="gpt-4o"), 404, "model"),
        (body(messages=[{"role": "user", "content": "x" * 3000}]), 413, None),
    ],
)
def test_bad_requests_get_openai_errors(raw: bytes, status: int, param: str | None) -> None:
    error = expect_error(raw, status, param)
    if status == 413:
        assert str(LIMITS.max_request_bytes) in error.message
    if param in ("max_tokens", "max_completion_tokens") and "limit" in error.message:
        assert str(LIMITS.max_completion_tokens) in error.message


def test_prompt_token_limits_name_the_limit() -> None:
    check_prompt_tokens(100, 10, limits=LIMITS, context_length=200)
    with pytest.raises(OpenAIError) as too_long:
        check_prompt_tokens(101, 10, limits=LIMITS, context_length=1000)
    assert too_long.value.code == "context_length_exceeded" and "100" in too_long.value.message
    with pytest.raises(OpenAIError) as no_room:
        check_prompt_tokens(90, 20, limits=LIMITS, context_length=100)
    assert "100" in no_room.value.message


def test_chunk_shape_matches_openai() -> None:
    chunk = chat_chunk_body(
        completion_id="chatcmpl-1", created=1, model=MODEL, delta={"content": "a"}, finish_reason=None
    )
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0] == {
        "index": 0,
        "delta": {"content": "a"},
        "finish_reason": None,
        "logprobs": None,
    }


def test_api_key_sources(tmp_path) -> None:
    assert load_api_key({}) is None
    assert load_api_key({"LLMFT_API_KEY": " k1 "}) == "k1"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert load_api_key({"LLMFT_API_KEY_FILE": str(key_file)}) == "from-file"
    key_file.write_text("  \n")
    with pytest.raises(ApiKeyConfigError, match="empty"):
        load_api_key({"LLMFT_API_KEY_FILE": str(key_file)})
    with pytest.raises(ApiKeyConfigError, match="cannot be read"):
        load_api_key({"LLMFT_API_KEY_FILE": str(tmp_path / "missing")})


def test_bearer_check_and_bind_rules() -> None:
    assert bearer_token_matches(None, None)
    assert bearer_token_matches("Bearer s3cret", "s3cret")
    assert bearer_token_matches("bearer s3cret", "s3cret")
    assert not bearer_token_matches("Bearer wrong", "s3cret")
    assert not bearer_token_matches("Basic s3cret", "s3cret")
    assert not bearer_token_matches(None, "s3cret")
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("10.1.2.3")
    ensure_key_for_bind_host("127.0.0.1", None)
    ensure_key_for_bind_host("0.0.0.0", "key")
    with pytest.raises(ApiKeyConfigError, match="non-loopback"):
        ensure_key_for_bind_host("0.0.0.0", None)


def test_settings_from_env_validate() -> None:
    settings = ServerSettings.from_env({"LLMFT_MAX_TOKENS": "32", "LLMFT_LOG_PROMPTS": "1"})
    assert settings.limits.max_completion_tokens == 32 and settings.log_prompts
    assert settings.bento_model == "llmft-chat:latest" and settings.storage_root == default_storage_root()
    with pytest.raises(ValueError, match="LLMFT_MAX_TOKENS"):
        ServerSettings.from_env({"LLMFT_MAX_TOKENS": "lots"})
    with pytest.raises(ValueError, match="LLMFT_REQUEST_LOG_FLUSH_S"):
        ServerSettings.from_env({"LLMFT_REQUEST_LOG_FLUSH_S": "0"})


def test_stop_sequence_helpers() -> None:
    assert find_stop("abc STOP def", ["STOP"]) == 4
    assert find_stop("abc", ["x"]) == -1
    assert find_stop("a<e>b<s>", ["<s>", "<e>"]) == 1
    # Hold back a suffix that may still grow into a stop sequence, and a split UTF-8 character.
    assert safe_emit_length("hello wor", ["world!"]) == len("hello ")
    assert safe_emit_length("hello", ["xyz"]) == 5
    assert safe_emit_length("caf\ufffd", []) == 3
