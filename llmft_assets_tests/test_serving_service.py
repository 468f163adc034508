"""End to end: `bentoml serve` on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmft_assets.serving.request_log import read_request_logs
from llmft_assets.storage import open_storage
from llmft_assets_tests.servers import LOOPBACK, bentoml_serve_command, free_port, start_bentoml_serve

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-" + uuid.uuid4().hex
BOB_KEY = "bob-key-" + uuid.uuid4().hex
MAX_PROMPT_TOKENS = 300
MAX_TOKENS = 48
MAX_REQUEST_BYTES = 50_000
MODEL_VERSION = "v-test-7"


@dataclass
class RunningServer:
    base_url: str
    storage_root: Path
    log_path: Path
    spool: Path


def server_env(tmp: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "LLMFT_MODEL_DIR": str(model_dir),
            "LLMFT_STORAGE": str(tmp / "storage"),
            "LLMFT_MODEL_VERSION": MODEL_VERSION,
            "LLMFT_MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS),
            "LLMFT_MAX_TOKENS": str(MAX_TOKENS),
            "LLMFT_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
            "LLMFT_REQUEST_LOG_FLUSH_S": "0.3",
            "LLMFT_REQUEST_LOG_SPOOL": str(tmp / "spool"),
            "LLMFT_HOME": str(tmp / "home"),
            "BENTOML_HOME": str(tmp / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.pop("LLMFT_API_KEY", None)
    env.pop("LLMFT_API_KEY_FILE", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmft_assets.modeling.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("served") / "model", pretrain_steps=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("server")
    key_file = tmp / "api_keys"
    key_file.write_text(f"alice: {API_KEY}\nbob: {BOB_KEY}\n")  # LLMFT_API_KEY_FILE with named keys
    port = free_port()
    process = start_bentoml_serve(
        port,
        env=server_env(tmp, model_dir, LLMFT_API_KEY_FILE=str(key_file)),
        cwd=REPO_ROOT,
        log_path=tmp / "server.log",
        timeout=180,
    )
    try:
        yield RunningServer(f"http://{LOOPBACK}:{port}", tmp / "storage", process.log_path, tmp / "spool")
    finally:
        process.stop()


def client(server: RunningServer, api_key: str = API_KEY):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def post_raw(server: RunningServer, content: bytes | str, *, api_key: str | None = API_KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.post(f"{server.base_url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def chat_json(**fields: object) -> str:
    payload: dict[str, object] = {
        "model": "llmft-chat",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
    }
    payload.update(fields)
    return json.dumps(payload)


def wait_for_logged(server: RunningServer, request_ids: set[str], timeout: float = 20.0):
    storage = open_storage(str(server.storage_root))
    deadline = time.monotonic() + timeout
    while True:
        table = read_request_logs(storage)
        rows = [r for r in table.to_pylist() if r["request_id"] in request_ids]
        if len(rows) == len(request_ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_models_and_health_endpoints(server: RunningServer) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["llmft-chat"]
    assert httpx.get(f"{server.base_url}/readyz").status_code == 200
    assert httpx.get(f"{server.base_url}/livez").status_code == 200


def test_chat_completion_plain_and_streaming_agree(server: RunningServer) -> None:
    api = client(server)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 3 + 4?"},
    ]
    plain = api.chat.completions.create(model="llmft-chat", messages=messages, temperature=0, max_tokens=12)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert plain.usage.prompt_tokens > 0 and 0 < plain.usage.completion_tokens <= 12

    chunks = list(
        api.chat.completions.create(
            model="llmft-chat",
            messages=messages,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_sampling_parameters(server: RunningServer) -> None:
    api = client(server)
    messages = [{"role": "user", "content": "Tell me a story."}]
    seeded = [
        api.chat.completions.create(
            model="llmft-chat", messages=messages, temperature=1.0, top_p=0.9, seed=42, max_tokens=10
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    full = api.chat.completions.create(model="llmft-chat", messages=messages, temperature=0, max_tokens=10)
    text = full.choices[0].message.content
    stop = text.strip()[:2] or text[:1]
    stopped = api.chat.completions.create(
        model="llmft-chat", messages=messages, temperature=0, max_tokens=10, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.find(stop)]


def test_auth_is_required(server: RunningServer) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError) as wrong:
        client(server, api_key="not-the-key").chat.completions.create(
            model="llmft-chat", messages=[{"role": "user", "content": "hi"}]
        )
    assert wrong.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="not-the-key").models.list()
    missing = post_raw(server, chat_json(), api_key=None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        ("{not json", 400, "parse"),
        (chat_json(temperature="warm"), 400, "temperature"),
        (chat_json(max_tokens="many"), 400, "max_tokens"),
        (chat_json(messages=[]), 400, "messages"),
        (chat_json(messages=[{"role": "robot", "content": "hi"}]), 400, "role"),
        (chat_json(max_tokens=MAX_TOKENS + 1), 400, str(MAX_TOKENS)),
        (chat_json(messages=[{"role": "user", "content": "word " * 2000}]), 400, str(MAX_PROMPT_TOKENS)),
        (
            chat_json(messages=[{"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 10)}]),
            413,
            str(MAX_REQUEST_BYTES),
        ),
        (chat_json(model="gpt-4o"), 404, "gpt-4o"),
    ],
)
def test_bad_input_gets_openai_shaped_4xx(
    server: RunningServer, content: str, status: int, needle: str
) -> None:
    response = post_raw(server, content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text


def test_unknown_url_gets_openai_404(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/v1/engines", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"


def test_openai_client_raises_bad_request(server: RunningServer) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(
            model="llmft-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000
        )
    assert str(MAX_TOKENS) in caught.value.message


def test_concurrent_requests_are_all_answered_and_logged(server: RunningServer) -> None:
    api = client(server)
    marker = f"concurrency-marker-{uuid.uuid4().hex}"

    def ask(index: int) -> str:
        return api.chat.completions.create(
            model="llmft-chat",
            messages=[{"role": "user", "content": f"{marker} question {index}"}],
            temperature=0,
            max_tokens=6,
        ).id

    with ThreadPoolExecutor(max_workers=8) as pool:
        request_ids = set(pool.map(ask, range(8)))
    rows = wait_for_logged(server, request_ids)
    assert len(rows) == 8
    row = rows[0]
    assert row["model"] == "llmft-chat" and row["model_version"] == MODEL_VERSION
    assert row["prompt"].startswith(marker) and json.loads(row["messages_json"])[0]["role"] == "user"
    assert row["prompt_tokens"] > 0 and 0 < row["completion_tokens"] <= 6 and row["latency_ms"] > 0
    assert row["stream"] is False and row["finish_reason"] in ("stop", "length")
    # Prompt text stays out of the server's own log unless LLMFT_LOG_PROMPTS is set.
    assert marker not in server.log_path.read_text(errors="replace")


def test_streamed_requests_are_logged_with_the_streamed_text(server: RunningServer) -> None:
    chunks = list(
        client(server).chat.completions.create(
            model="llmft-chat",
            messages=[{"role": "user", "content": "stream me"}],
            temperature=0,
            max_tokens=5,
            stream=True,
        )
    )
    (row,) = wait_for_logged(server, {chunks[0].id})
    assert row["stream"] is True
    assert row["response"] == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_prometheus_metrics(server: RunningServer) -> None:
    client(server).chat.completions.create(
        model="llmft-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert "llmft_completion_tokens_total" in metrics and "llmft_time_to_first_token_seconds" in metrics


def test_refuses_public_bind_without_key(tmp_path: Path, model_dir: Path) -> None:
    result = subprocess.run(
        bentoml_serve_command(free_port(), host="0.0.0.0"),
        cwd=REPO_ROOT,
        env=server_env(tmp_path, model_dir),
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert result.returncode != 0
    assert "without an API key" in result.stderr + result.stdout


def test_extreme_sampler_values_fail_nobody(server: RunningServer) -> None:
    """seed 2**64, temperature/top_p 1e-300 next to 16 ordinary requests: all 19 are answered."""
    api = client(server)
    extreme = [
        {"seed": 2**64, "temperature": 1.0},
        {"temperature": 1e-300},
        {"top_p": 1e-300, "temperature": 1.0},
    ]
    cases = extreme + [{"temperature": 0}] * 16

    def ask(index: int) -> tuple[str, int]:
        answer = api.chat.completions.create(
            model="llmft-chat",
            messages=[{"role": "user", "content": f"question {index}"}],
            max_tokens=8,
            **cases[index],
        )
        return answer.choices[0].finish_reason, answer.usage.completion_tokens

    with ThreadPoolExecutor(max_workers=19) as pool:
        results = list(pool.map(ask, range(len(cases))))
    assert all(finish in ("stop", "length") and tokens > 0 for finish, tokens in results)


MALFORMED_BODIES = [
    b'{"model": "llmft-chat", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b"[" * 10_000 + b"]" * 10_000,
    b'{"model": "llmft-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "llmft-chat", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}',
    b'{"model": "llmft-chat", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"7" * 6000 + b"}",
]


def test_malformed_bodies_get_400_and_the_connection_stays_usable(server: RunningServer) -> None:
    import http.client

    host, port = server.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    try:
        for body in MALFORMED_BODIES:
            connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
            response = connection.getresponse()
            payload = json.loads(response.read())
            assert response.status == 400, payload
            assert set(payload["error"]) == {"message", "type", "param", "code"}
            # The same connection serves the next request (no reset after the error).
            connection.request("POST", "/v1/chat/completions", body=chat_json().encode(), headers=headers)
            follow_up = connection.getresponse()
            assert follow_up.status == 200 and json.loads(follow_up.read())["object"] == "chat.completion"
    finally:
        connection.close()
    assert "Traceback" not in server.log_path.read_text(errors="replace")


def test_key_names_not_keys_are_logged(server: RunningServer) -> None:
    ids = {
        client(server, api_key=key)
        .chat.completions.create(
            model="llmft-chat", messages=[{"role": "user", "content": "who"}], max_tokens=2
        )
        .id: name
        for key, name in ((API_KEY, "alice"), (BOB_KEY, "bob"))
    }
    rows = wait_for_logged(server, set(ids))
    assert {row["request_id"]: row["api_key_name"] for row in rows} == ids
    stored = [p for root in (server.storage_root, server.spool) for p in root.rglob("*") if p.is_file()]
    assert stored and not any(
        API_KEY.encode() in p.read_bytes() or BOB_KEY.encode() in p.read_bytes() for p in stored
    )
