"""Serving load benchmark: the BentoML service under concurrency vs sequential `generate` calls.

    .venv/bin/python benchmarks/serve_load.py                      # starts its own server on the tiny model
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:3000 --api-key $LLMFT_API_KEY \
        --model-dir <the served model dir> --storage <its LLMFT_STORAGE>

Prints one JSON line per measurement; the last line is one JSON object with every result and the
top-level `speedup` = service requests/s at concurrency 32 / baseline requests/s. The baseline is a
loop of `model.generate` calls, one request at a time, on the same model, prompts, max_tokens and
greedy decoding, in this same run. After the load the request log is read back from storage and its
row count is compared with the number of answered requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llmft_assets import settings  # noqa: E402  (after the path set-up above)
from llmft_assets.serving.auth import load_api_key  # noqa: E402

MODEL_NAME = "llmft-chat"


def make_prompts(count: int) -> list[str]:
    subjects = ["apples", "trains", "triangles", "coins", "books", "marbles", "rectangles", "minutes"]
    return [
        f"A box holds {i + 3} {subjects[i % len(subjects)]}. If we add {2 * i + 1} more and remove {i % 5}, "
        f"how many {subjects[i % len(subjects)]} are there? Think step by step."
        for i in range(count)
    ]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def run_level(
    base_url: str, api_key: str, prompts: list[str], concurrency: int, max_tokens: int
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    completion_tokens = 0
    errors = 0
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600) as http:

        async def worker() -> None:
            nonlocal completion_tokens, errors
            while True:
                try:
                    prompt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                started = time.perf_counter()
                try:
                    response = await http.post(
                        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}
                    )
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    completion_tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    answered = sum(1 for s in statuses if s == 200)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "answered": answered,
        "errors_5xx": sum(1 for s in statuses if s >= 500),
        "errors_4xx": sum(1 for s in statuses if 400 <= s < 500),
        "connection_errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(answered / elapsed, 3),
        "completion_tokens_per_s": round(completion_tokens / elapsed, 1),
        "p50_latency_s": round(percentile(latencies, 50), 4),
        "p99_latency_s": round(percentile(latencies, 99), 4),
        "mean_latency_s": round(statistics.fmean(latencies), 4) if latencies else None,
    }


def run_baseline(model_dir: Path, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Sequential `generate` on the same model and prompts, one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    from llmft_assets.serving.engine import cpu_threads_for

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # The same intra-op thread rule as the service's engine, so both sides run the model alike.
    torch.set_num_threads(cpu_threads_for(model, settings.get().torch_threads or None))
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    latencies: list[float] = []
    completion_tokens = 0
    with torch.inference_mode():
        ids = torch.tensor([encoded[0]])
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)  # warm-up
        started = time.perf_counter()
        for prompt_ids in encoded:
            ids = torch.tensor([list(prompt_ids)])
            request_started = time.perf_counter()
            output = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
            latencies.append(time.perf_counter() - request_started)
            completion_tokens += int(output.shape[1] - ids.shape[1])
            del text
        elapsed = time.perf_counter() - started
    return {
        "baseline": "sequential model.generate",
        "torch_threads": torch.get_num_threads(),
        "requests": len(encoded),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(encoded) / elapsed, 3),
        "completion_tokens_per_s": round(completion_tokens / elapsed, 1),
        "p50_latency_s": round(percentile(latencies, 50), 4),
        "p99_latency_s": round(percentile(latencies, 99), 4),
    }


def count_logged_requests(storage_root: str, since: datetime) -> int:
    from llmft_assets.serving.request_log import read_request_logs
    from llmft_assets.storage import open_storage

    table = read_request_logs(open_storage(storage_root))
    return sum(1 for ts in table.column("timestamp").to_pylist() if ts >= since)


def start_server(model_dir: Path, workdir: Path, api_key: str) -> tuple[Any, str]:
    from llmft_assets_tests.servers import LOOPBACK, free_port, start_process

    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "LLMFT_MODEL_DIR": str(model_dir),
            "LLMFT_STORAGE": str(workdir / "storage"),
            "LLMFT_API_KEY": api_key,
            "LLMFT_REQUEST_LOG_FLUSH_S": "1",
            "BENTOML_HOME": str(workdir / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    server = start_process(
        [
            str(Path(sys.executable).parent / "bentoml"),
            "serve",
            "bentos.service:LLMChatService",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
        ],
        f"http://{LOOPBACK}:{port}/readyz",
        timeout=300,
        env=env,
        cwd=REPO_ROOT,
        log_path=workdir / "server.log",
    )
    return server, f"http://{LOOPBACK}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an already running service (default: start one on the tiny model)")
    parser.add_argument("--api-key", default=load_api_key() or "")
    parser.add_argument("--model-dir", type=Path, help="model served (default: the tiny offline model)")
    parser.add_argument("--storage", help="the running service's LLMFT_STORAGE, to count its request log")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per concurrency level (default: 2 x concurrency, at least 16)",
    )
    parser.add_argument("--baseline-requests", type=int, default=16)
    # Each request also pays a fixed ~10 ms HTTP/validation cost; 64 tokens is a short chat answer.
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="tiny model pretraining (default: builder's)"
    )
    args = parser.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="llmft-serve-load-"))
    model_dir = args.model_dir
    if model_dir is None:
        from llmft_assets.modeling.tiny_model import build_tiny_model

        kwargs = {} if args.pretrain_steps is None else {"pretrain_steps": args.pretrain_steps}
        model_dir = build_tiny_model(workdir / "model", **kwargs)

    server = None
    api_key = args.api_key
    storage_root = args.storage
    if args.url:
        base_url = args.url.rstrip("/")
    else:
        api_key = secrets.token_urlsafe(24)
        server, base_url = start_server(model_dir, workdir, api_key)
        storage_root = str(workdir / "storage")

    results: dict[str, Any] = {
        "benchmark": "serve_load",
        "model_dir": str(model_dir),
        "max_tokens": args.max_tokens,
    }
    since = datetime.now(UTC)
    answered_total = 0
    try:
        warmup = asyncio.run(run_level(base_url, api_key, make_prompts(4), 4, args.max_tokens))
        answered_total += warmup["answered"]
        for concurrency in levels:
            count = args.requests or max(16, 2 * concurrency)
            level = asyncio.run(
                run_level(base_url, api_key, make_prompts(count), concurrency, args.max_tokens)
            )
            answered_total += level["answered"]
            results[f"concurrency_{concurrency}"] = level
            print(json.dumps({"service": level}), flush=True)
        baseline = run_baseline(model_dir, make_prompts(args.baseline_requests), args.max_tokens)
        results["baseline"] = baseline
        print(json.dumps({"baseline": baseline}), flush=True)
    finally:
        if server is not None:
            server.stop(grace_seconds=30)  # SIGTERM: the service flushes its request log on shutdown

    if storage_root:
        if server is None:
            time.sleep(
                6
            )  # a running service flushes on its interval (LLMFT_REQUEST_LOG_FLUSH_S, 5 s default)
        logged = count_logged_requests(storage_root, since)
        results["request_log"] = {
            "logged": logged,
            "answered": answered_total,
            "equal": logged == answered_total,
        }
    top = max(levels)
    results["errors_5xx"] = sum(results[f"concurrency_{c}"]["errors_5xx"] for c in levels)
    results["speedup_concurrency"] = top
    results["speedup"] = round(
        results[f"concurrency_{top}"]["requests_per_s"] / results["baseline"]["requests_per_s"], 2
    )
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
