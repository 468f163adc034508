"""Pure parts of the hardened server: body parsing, admission, named keys, reasoning split, spool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmft_assets.serving.admission import AdmissionController, Overloaded, RateLimiter, TokenBucket
from llmft_assets.serving.auth import ApiKeyConfigError, key_name_for, load_api_keys, parse_key_file
from llmft_assets.serving.openai_schema import (
    OpenAIError,
    ServingLimits,
    default_max_tokens,
    parse_chat_request,
)
from llmft_assets.serving.reasoning import ReasoningSplitter, prompt_opens_reasoning, split_reasoning
from llmft_assets.serving.request_log import (
    RequestLogRecord,
    SpooledRequestLogWriter,
    read_request_logs,
    read_segment,
)
from llmft_assets.serving.supervision import same_group_ancestors
from llmft_assets.storage import open_storage

LIMITS = ServingLimits(max_prompt_tokens=100, max_completion_tokens=64, max_request_bytes=200_000)
REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(raw: bytes):
    return parse_chat_request(raw, served_model="llmft-chat", limits=LIMITS)


def request_json(extra: str) -> bytes:
    return ('{"model": "llmft-chat", "messages": [{"role": "user", "content": "hi"}]' + extra + "}").encode()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (request_json(', "user": "\\ud800"'), "surrogate"),
        (request_json(', "metadata": {"\\udfff": "x"}'), "surrogate"),
        (b"[" * 10_000 + b"]" * 10_000, "nested"),
        (request_json(', "metadata": ' + '{"a": ' * 5000 + "1" + "}" * 5000), "nested"),
        (request_json(', "temperature": NaN'), "NaN"),
        (request_json(', "temperature": -Infinity'), "Infinity"),
        (request_json(', "temperature": 1e400'), "out of range"),
        (request_json(', "seed": ' + "9" * 5000), "too large"),
        (b"\xff\xfe{}", "UTF-8"),
    ],
)
def test_malformed_bodies_are_400s(raw: bytes, needle: str) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse(raw)
    assert caught.value.status_code == 400 and needle in caught.value.message


def test_huge_but_valid_numbers_are_accepted_or_named() -> None:
    assert parse(request_json(', "seed": 18446744073709551616')).seed == 2**64  # the engine folds it
    with pytest.raises(OpenAIError) as caught:
        parse(request_json(', "max_tokens": 100000000000000000000000'))
    assert caught.value.status_code == 400 and caught.value.param == "max_tokens"


def test_default_max_tokens_fits_the_context() -> None:
    limits = ServingLimits(max_prompt_tokens=100, max_completion_tokens=8192, default_completion_tokens=8192)
    chat = parse_chat_request(request_json(""), served_model="llmft-chat", limits=limits)
    assert chat.max_tokens == 8192 and not chat.max_tokens_explicit
    assert default_max_tokens(chat, prompt_tokens=1000, context_length=4096) == 3096
    assert default_max_tokens(chat, prompt_tokens=10, context_length=32768) == 8192
    explicit = parse_chat_request(
        request_json(', "max_tokens": 50'), served_model="llmft-chat", limits=limits
    )
    assert default_max_tokens(explicit, prompt_tokens=4090, context_length=4096) == 50  # refused later


def test_admission_bounds_requests_and_tokens() -> None:
    admission = AdmissionController(max_running=2, max_waiting=1, max_waiting_tokens=100)
    for _ in range(3):
        admission.reserve()
    with pytest.raises(Overloaded) as full:
        admission.reserve()
    assert full.value.retry_after_s >= 1 and "3 requests" in full.value.reason
    admission.add_tokens(60)
    with pytest.raises(Overloaded, match="prompt tokens"):
        admission.add_tokens(50)
    admission.add_tokens(40)
    admission.release(60)
    admission.release(40)
    admission.release(0)
    assert (admission.in_flight, admission.in_flight_tokens, admission.refused) == (0, 0, 2)
    admission.reserve()
    admission.add_tokens(1000)  # alone, a prompt over the token budget is still admitted


def test_token_bucket_rate_limit_per_key() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("a") == pytest.approx(0.5)
    assert limiter.check("b") == 0.0  # another key has its own bucket
    now[0] += 0.5
    assert limiter.check("a") == 0.0
    assert RateLimiter(rate=0, burst=1).check("a") == 0.0
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)


def test_named_key_files(tmp_path: Path) -> None:
    assert parse_key_file("just-a-key\n") == {"default": "just-a-key"}
    assert parse_key_file("# team keys\nalice: k-a\n\nbob:k-b\n") == {"alice": "k-a", "bob": "k-b"}
    assert parse_key_file('{"alice": "k-a", "ci": "k-c"}') == {"alice": "k-a", "ci": "k-c"}
    with pytest.raises(ApiKeyConfigError, match="entry 2") as bad:
        parse_key_file("alice: k-a\nnot a pair line\n")
    assert "not a pair" not in str(bad.value)  # never quote a line that may be a key
    with pytest.raises(ApiKeyConfigError, match="same key"):
        parse_key_file("alice: k\nbob: k\n")
    with pytest.raises(ApiKeyConfigError, match="JSON"):
        parse_key_file('{"alice": 1}')
    key_file = tmp_path / "keys"
    key_file.write_text("alice: k-a\nbob: k-b\n")
    keys = load_api_keys({"LLMFT_API_KEY_FILE": str(key_file)})
    assert keys == {"alice": "k-a", "bob": "k-b"}
    assert load_api_keys({"LLMFT_API_KEY": "k", "LLMFT_API_KEY_FILE": str(key_file)}) == {"default": "k"}
    assert key_name_for("Bearer k-b", keys) == "bob"
    assert key_name_for("Bearer k-x", keys) is None and key_name_for(None, keys) is None
    assert key_name_for("Basic k-a", keys) is None
    assert key_name_for(None, None) == "anonymous"


def test_reasoning_split_plain_and_incremental() -> None:
    assert split_reasoning("<think>a b</think>\n\n42") == ("a b", "\n\n42")
    assert split_reasoning("just an answer") == (None, "just an answer")
    assert split_reasoning("still thinking", starts_in_reasoning=True) == ("still thinking", "")
    assert split_reasoning("x</think>y", starts_in_reasoning=True) == ("x", "y")
    assert split_reasoning("  <think>r</think>c") == ("r", "c")
    text = "<think>step one, step two</think>The answer is 4."
    for size in (1, 2, 3, 7):
        splitter = ReasoningSplitter()
        reasoning, content = "", ""
        for start in range(0, len(text), size):
            r, c = splitter.feed(text[start : start + size])
            reasoning, content = reasoning + r, content + c
        r, c = splitter.finish()
        assert (reasoning + r, content + c) == ("step one, step two", "The answer is 4.")
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_same_group_ancestors_sees_a_launcher_in_our_group() -> None:
    # A child started in a new session has no same-group ancestors; one in ours sees us.
    script = "from llmft_assets.serving.supervision import same_group_ancestors as a; print(a())"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    own = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert os.getpid() in json.loads(own.stdout)
    alone = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        start_new_session=True,
    )
    assert json.loads(alone.stdout) == []
    assert os.getpid() not in same_group_ancestors()


def record(index: int) -> RequestLogRecord:
    return RequestLogRecord(
        request_id=f"req-{index}",
        timestamp=datetime.now(UTC),
        model="llmft-chat",
        model_version="3",
        prompt=f"prompt {index}",
        messages_json="[]",
        response="answer",
        prompt_tokens=1,
        completion_tokens=1,
        latency_ms=1.0,
        finish_reason="stop",
        stream=False,
        api_key_name="alice",
    )


def test_spool_survives_sigkill_and_is_shipped_once(tmp_path: Path) -> None:
    storage_root, spool = tmp_path / "storage", tmp_path / "spool"
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from llmft_assets_tests.test_serving_hardening import record
        from llmft_assets.serving.request_log import SpooledRequestLogWriter
        from llmft_assets.storage import open_storage
        writer = SpooledRequestLogWriter(open_storage({str(storage_root)!r}), {str(spool)!r},
                                         max_batch_rows=1000, flush_interval_s=3600)
        for i in range(50):
            writer.log(record(i))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_request_logs(open_storage(str(storage_root))).num_rows == 0  # nothing shipped yet
    (leftover,) = spool.glob("*.jsonl")
    leftover_name = leftover.name
    (spool / "torn.jsonl").write_bytes(leftover.read_bytes() + b'{"request_id": "half')
    writer = SpooledRequestLogWriter(open_storage(str(storage_root)), spool, flush_interval_s=3600)
    try:
        assert writer.recovered_rows == 100 and writer.unreadable_lines == 1
        writer.log(record(99))
    finally:
        writer.close()
    table = read_request_logs(open_storage(str(storage_root)))
    ids = table.column("request_id").to_pylist()
    assert sorted(set(ids)) == sorted({f"req-{i}" for i in range(50)} | {"req-99"})
    assert ids.count("req-99") == 1 and set(table.column("api_key_name").to_pylist()) == {"alice"}
    assert not list(spool.glob("*.jsonl")), "shipped segments are removed"
    assert leftover_name  # the killed writer's segment was found by its suffix


def test_spool_leaves_a_live_writers_segment_alone(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "storage"))
    first = SpooledRequestLogWriter(storage, tmp_path / "spool", flush_interval_s=3600)
    first.log(record(1))
    second = SpooledRequestLogWriter(storage, tmp_path / "spool", flush_interval_s=3600)
    try:
        assert second.recovered_rows == 0  # first still holds its segment's lock
        assert first.flush() == 1
    finally:
        second.close()
        first.close()
    assert read_request_logs(storage).column("request_id").to_pylist() == ["req-1"]


def test_segment_lines_round_trip() -> None:
    lines = b"".join(
        json.dumps({**record(i).__dict__, "timestamp": record(i).timestamp.isoformat()}).encode() + b"\n"
        for i in range(3)
    )
    records, bad = read_segment(lines + b"not json\n")
    assert [r.request_id for r in records] == ["req-0", "req-1", "req-2"] and bad == 1


def test_request_log_window_per_model_version(tmp_path: Path) -> None:
    from dataclasses import replace

    from llmft_assets.monitoring.request_logs import read_request_log_window
    from llmft_assets.serving.request_log import records_to_parquet_bytes, request_log_key

    storage = open_storage(str(tmp_path))
    rows = [replace(record(i), model_version="1" if i % 3 else "2") for i in range(9)]
    day = rows[0].timestamp.strftime("%Y-%m-%d")
    storage.put_bytes(request_log_key(day, "batch"), records_to_parquet_bytes(rows))
    everything = read_request_log_window(storage, window_days=1)
    only_two = read_request_log_window(storage, window_days=1, model_version="2")
    assert everything.rows == 9 and only_two.rows == 3
    assert only_two.table.column_names == everything.table.column_names == ["timestamp", "prompt", "response"]
    assert only_two.table.column("prompt").to_pylist() == ["prompt 0", "prompt 3", "prompt 6"]
    assert read_request_log_window(storage, window_days=1, model_version="7").rows == 0


def test_model_router_aliases_versions_and_canary() -> None:
    import random

    from llmft_assets.serving.registry import ModelRouter, UnknownModel

    router = ModelRouter("llmft-chat", rng=random.Random(7))
    with pytest.raises(UnknownModel):
        router.resolve("llmft-chat")  # no champion yet
    router.update({"champion": "3", "candidate": "4"})
    router.mark_loaded("3")
    router.mark_loaded("4")
    assert router.resolve("llmft-chat").version == "3"
    assert router.resolve("llmft-chat@candidate").version == "4"
    assert router.resolve("llmft-chat@champion").adapter == "v3"
    assert router.resolve("llmft-chat@12").version == "12"  # pinned: loaded on first use
    for bad in ("gpt-4o", "llmft-chat@", "llmft-chat@latest", "llmft-chat@1.5", "other@3"):
        with pytest.raises(UnknownModel):
            router.resolve(bad)
    router.update({"champion": "3", "candidate": "4"}, canary_share=0.25)
    picks = [router.resolve("llmft-chat").version for _ in range(4000)]
    assert 0.21 < picks.count("4") / len(picks) < 0.29
    router.update({"champion": "3"}, canary_share=1.0)  # no candidate: all to the champion
    assert {router.resolve("llmft-chat").version for _ in range(50)} == {"3"}
    assert [e["id"] for e in router.model_ids()] == [
        "llmft-chat",
        "llmft-chat@champion",
        "llmft-chat@3",
        "llmft-chat@4",
    ]
