"""End to end (`bentoml serve` + the openai client): admission control, rate limits, timeouts,
cancellation of abandoned requests, huge prompts off the event loop, reasoning_content and the
default max_tokens. One server start for all of them (an R1-style chat template)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from llmft_assets_tests.servers import LOOPBACK, free_port, start_bentoml_serve
from llmft_assets_tests.test_serving_service import (
    REPO_ROOT,
    RunningServer,
    server_env,
    wait_for_logged,
)

pytestmark = pytest.mark.slow

KEYS = {f"k{i}": f"key-{i}-{uuid.uuid4().hex}" for i in range(1, 9)} | {"limited": f"lim-{uuid.uuid4().hex}"}
CONTEXT = 8192  # the tiny model's max_position_embeddings
MAX_BATCH, MAX_QUEUED = 2, 3
RATE_BURST = 8
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 1.0, 1.5


@pytest.fixture(scope="module")
def r1_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with an R1-style template: the generation prompt opens `<think>`."""
    from llmft_assets.modeling.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("r1") / "model", pretrain_steps=0)
    template = model / "chat_template.jinja"
    text = template.read_text()
    assert "{{- '<|im_start|>assistant\\n' }}" in text
    template.write_text(
        text.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    )
    return model


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory, r1_model_dir: Path) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("limited")
    key_file = tmp / "keys.json"
    key_file.write_text(json.dumps(KEYS))
    port = free_port()
    env = server_env(tmp, r1_model_dir, LLMFT_API_KEY_FILE=str(key_file))
    for name in ("LLMFT_MAX_TOKENS", "LLMFT_DEFAULT_MAX_TOKENS"):
        env.pop(name, None)  # the defaults are under test
    env.update(
        {
            "LLMFT_MAX_PROMPT_TOKENS": str(CONTEXT - 12),
            "LLMFT_MAX_REQUEST_BYTES": str(1_200_000),
            "LLMFT_MAX_BATCH_SIZE": str(MAX_BATCH),
            "LLMFT_MAX_QUEUED_REQUESTS": str(MAX_QUEUED),
            "LLMFT_RATE_LIMIT_RPS": "0.05",
            "LLMFT_RATE_LIMIT_BURST": str(RATE_BURST),
            "LLMFT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "LLMFT_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        }
    )
    process = start_bentoml_serve(
        port,
        env=env,
        cwd=REPO_ROOT,
        log_path=tmp / "server.log",
        timeout=180,
    )
    try:
        yield RunningServer(f"http://{LOOPBACK}:{port}", tmp / "storage", process.log_path, tmp / "spool")
    finally:
        process.stop()


def api(server: RunningServer, key: str, timeout: float = 120):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS[key], max_retries=0, timeout=timeout)


def post(server: RunningServer, key: str, payload: dict, timeout: float = 120) -> httpx.Response:
    body = {"model": "llmft-chat", "messages": [{"role": "user", "content": "hi"}]} | payload
    return httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEYS[key]}"},
        timeout=timeout,
    )


def test_overload_is_refused_with_503_and_retry_after(limited_server: RunningServer) -> None:
    def ask(index: int) -> httpx.Response:
        return post(limited_server, f"k{index % 4 + 1}", {"max_tokens": 60, "temperature": 0})

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(ask, range(16)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= MAX_BATCH + MAX_QUEUED and statuses.count(503) >= 1, statuses
    for refused in (r for r in responses if r.status_code == 503):
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "server_overloaded"


def test_rate_limit_per_key_is_429_with_retry_after(limited_server: RunningServer) -> None:
    import openai

    client = api(limited_server, "limited")
    for _ in range(RATE_BURST):
        client.chat.completions.create(
            model="llmft-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="llmft-chat", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert caught.value.code == "rate_limit_exceeded" and "limited" in caught.value.message
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    # Another key is not affected.
    assert api(limited_server, "k8").models.list().data


def test_abandoned_requests_are_cancelled_and_logged(limited_server: RunningServer) -> None:
    started = time.monotonic()
    for _attempt in range(20):
        # The untrained model may reach its end token early (greedy: a given prompt always does or never
        # does); a prompt whose answer runs past 1 s is needed, each attempt costs at most 1 s.
        marker = f"abandon-{uuid.uuid4().hex}"
        try:
            post(
                limited_server,
                "k6",
                {"messages": [{"role": "user", "content": marker}], "max_tokens": 4000, "temperature": 0},
                1.0,
            )
        except httpx.ReadTimeout:
            break
    else:
        pytest.fail("no request ran long enough to be abandoned")
    chunks = []
    stream = api(limited_server, "k6").chat.completions.create(
        model="llmft-chat",
        # The same greedy prompt: known to run past 1 s, so the stream is still going when the client leaves.
        messages=[{"role": "user", "content": marker}],
        max_tokens=4000,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            break
    stream.response.close()
    deadline = time.monotonic() + 20
    rows: list[dict] = []
    while time.monotonic() < deadline:
        from llmft_assets.serving.request_log import read_request_logs
        from llmft_assets.storage import open_storage

        table = read_request_logs(open_storage(str(limited_server.storage_root))).to_pylist()
        rows = [r for r in table if r["prompt"] == marker]
        if len(rows) == 2:
            break
        time.sleep(0.3)
    assert sorted(r["finish_reason"] for r in rows) == ["cancelled", "cancelled"]
    plain = next(r for r in rows if r["request_id"] != chunks[0].id)
    # Cancelled when the client left (~1 s), not after generating 4000 tokens.
    assert plain["latency_ms"] < 5000 and time.monotonic() - started < 45
    streamed = next(r for r in rows if r["request_id"] == chunks[0].id)
    assert streamed["stream"] is True and streamed["completion_tokens"] < 4000
    assert streamed["api_key_name"] == "k6"


def test_slow_heads_and_bodies_time_out(limited_server: RunningServer) -> None:
    host, port = limited_server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow_head:
        slow_head.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes
        started = time.monotonic()
        answer = slow_head.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < HEADER_TIMEOUT_S + 3
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['k8']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=10) as slow_body:
        slow_body.sendall(head + b'{"model": ')
        started = time.monotonic()
        answer = b""
        while b"request_timeout" not in answer:
            data = slow_body.recv(4096)
            if not data:
                break
            answer += data
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
        assert time.monotonic() - started < BODY_TIMEOUT_S + 3


def test_huge_prompts_do_not_stall_a_running_stream(limited_server: RunningServer) -> None:
    """Three ~1 MB prompts are tokenized (seconds each) while another client streams."""
    huge = "hello world, this is a long prompt. " * 29_000
    gaps: list[float] = []
    big_times: list[float] = []
    first_chunk = threading.Event()

    def big(_: int) -> int:
        first_chunk.wait(30)
        started = time.monotonic()
        response = post(
            limited_server, "k7", {"messages": [{"role": "user", "content": huge}], "max_tokens": 1}
        )
        big_times.append(time.monotonic() - started)
        return response.status_code

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(big, i) for i in range(3)]
        stream = api(limited_server, "k7").chat.completions.create(
            model="llmft-chat",
            messages=[{"role": "user", "content": "a long story"}],
            max_tokens=1500,
            temperature=0,
            stream=True,
        )
        last = None
        for _chunk in stream:
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            first_chunk.set()
        statuses = [f.result() for f in futures]
    assert statuses == [400, 400, 400]  # over the prompt limit, found by tokenizing
    assert min(big_times) > 1.0, big_times  # each held a CPU for over a second...
    assert max(gaps) < 0.75, max(gaps)  # ...and the stream never waited for one


def test_reasoning_content_plain_and_streamed(limited_server: RunningServer) -> None:
    client = api(limited_server, "k5")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    plain = client.chat.completions.create(
        model="llmft-chat", messages=messages, max_tokens=24, temperature=0
    )
    message = plain.choices[0].message
    (row,) = wait_for_logged(limited_server, {plain.id})
    raw = row["response"]  # the log keeps the model's own text
    if "</think>" in raw:
        assert raw == message.reasoning_content + "</think>" + message.content
    else:  # the template opened <think>; the model never closed it
        assert (message.reasoning_content, message.content) == (raw, "")
    assert message.reasoning_content
    chunks = list(
        client.chat.completions.create(
            model="llmft-chat", messages=messages, max_tokens=24, temperature=0, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == message.content


def test_default_max_tokens_is_what_fits_the_context(
    limited_server: RunningServer, r1_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    from llmft_assets.serving.engine import render_chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(r1_model_dir))

    def prompt_tokens(words: int) -> int:
        return len(render_chat_prompt(tokenizer, [{"role": "user", "content": "a " * words}]))

    room = 20
    per_word = (prompt_tokens(2000) - prompt_tokens(1000)) / 1000
    words = int(1000 + (CONTEXT - room - prompt_tokens(1000)) / per_word)
    while prompt_tokens(words) > CONTEXT - room:
        words -= 1
    answer = api(limited_server, "k7").chat.completions.create(
        model="llmft-chat", messages=[{"role": "user", "content": "a " * words}], temperature=0
    )
    left = CONTEXT - answer.usage.prompt_tokens
    assert answer.usage.prompt_tokens == prompt_tokens(words) and room <= left < 256
    if answer.choices[0].finish_reason == "length":
        assert answer.usage.completion_tokens == left
    else:
        assert answer.usage.completion_tokens < left
