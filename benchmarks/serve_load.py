"""Serving load benchmark: the BentoML service under concurrency vs sequential `generate` calls,
our batching engine vs transformers' own continuous batching (`generate_batch`), an overload run,
and (--registry) 1,000 requests with a champion -> candidate -> champion alias flip in the middle.

    .venv/bin/python benchmarks/serve_load.py                      # starts its own server on the tiny model
    .venv/bin/python benchmarks/serve_load.py --url http://127.0.0.1:3000 --api-key $LLMFT_API_KEY \
        --model-dir <the served model dir> --storage <its LLMFT_STORAGE>

Prints one JSON line per measurement; the last line is one JSON object with every result and the
top-level `speedup` = service requests/s at concurrency 32 / baseline requests/s. The baseline is a
loop of `model.generate` calls, one request at a time, on the same model, prompts, max_tokens and
greedy decoding, in this same run. After the load the request log is read back from storage and its
row count is compared with the number of answered requests.

- `engine_vs_library`: the same prompts through our TransformersEngine and through
  `model.generate_batch` (transformers' continuous batching), same model, greedy, same max tokens,
  in this process: completion tokens/s of each and `ratio` = ours / library.
- `overload`: 256 concurrent requests against the default admission limits (32 running + 32
  waiting): how many were refused (503 + Retry-After), the 5xx count, and p50/p99 of the admitted.
- `registry_flip` (--registry): a real `mlflow server`, two registered adapters, the server in
  registry mode; N requests at concurrency 32 while the champion alias moves to the candidate and
  back. Each logged row's version is checked against the alias in force when it arrived
  (arrival = logged timestamp - latency; rows that arrived while a move was propagating accept
  either version).
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
    base_url: str,
    api_key: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    *,
    model: str = MODEL_NAME,
    answered_ids: list[str] | None = None,
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
                    "model": model,
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
                statuses.append(response.status_code)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)  # of answered requests only
                    answer = response.json()
                    completion_tokens += answer["usage"]["completion_tokens"]
                    if answered_ids is not None:
                        answered_ids.append(answer["id"])

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
        "refused_503": sum(1 for s in statuses if s == 503),
        "refused_429": sum(1 for s in statuses if s == 429),
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


def run_engine_vs_library(model_dir: Path, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Our continuous-batching engine vs transformers' `generate_batch`, same prompts, in-process."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llmft_assets.serving.engine import SamplingParams, TransformersEngine, cpu_threads_for

    engine = TransformersEngine(model_dir, max_batch_size=32, device="cpu")
    encoded = [engine.render_prompt([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def ours() -> int:
        async def one(i: int) -> int:
            last = 0
            async for delta in engine.stream(encoded[i], params, f"b{i}", wants_stream=False):
                last = delta.completion_tokens
            return last

        return sum(await asyncio.gather(*(one(i) for i in range(len(encoded)))))

    asyncio.run(ours())  # warm-up
    started = time.perf_counter()
    our_tokens = asyncio.run(ours())
    our_seconds = time.perf_counter() - started
    engine.close()

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    torch.set_num_threads(cpu_threads_for(model, None))
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=sorted(engine.eos_ids),
        pad_token_id=engine.pad_id,
    )
    library: dict[str, Any] = {"library": "transformers generate_batch (continuous batching)"}
    try:
        with torch.inference_mode():
            model.generate_batch(inputs=encoded[:2], generation_config=config)  # warm-up
            started = time.perf_counter()
            outputs = model.generate_batch(inputs=encoded, generation_config=config)
            library_seconds = time.perf_counter() - started
        library_tokens = sum(len(out.generated_tokens) for out in outputs.values())
        library.update(
            {
                "seconds": round(library_seconds, 3),
                "completion_tokens": library_tokens,
                "completion_tokens_per_s": round(library_tokens / library_seconds, 1),
            }
        )
    except Exception as error:  # recorded, not hidden: the comparison then has no ratio
        library["error"] = f"{type(error).__name__}: {error}"[:400]
    result: dict[str, Any] = {
        "prompts": len(encoded),
        "max_tokens": max_tokens,
        "ours": {
            "seconds": round(our_seconds, 3),
            "completion_tokens": our_tokens,
            "completion_tokens_per_s": round(our_tokens / our_seconds, 1),
        },
        "library": library,
    }
    if "completion_tokens_per_s" in library:
        result["ratio"] = round(
            result["ours"]["completion_tokens_per_s"] / library["completion_tokens_per_s"], 2
        )
    return result


def run_overload(base_url: str, api_key: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    level = asyncio.run(run_level(base_url, api_key, make_prompts(concurrency), concurrency, max_tokens))
    level["bound"] = (
        "an admitted request waits behind at most 32 others (LLMFT_MAX_QUEUED_REQUESTS) and runs in a "
        "batch of at most 32 (LLMFT_MAX_BATCH_SIZE): about 2 generation times"
    )
    return level


def _register_adapters(uri: str, model_dir: Path, workdir: Path) -> tuple[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmft_assets.training import tracking

    client = tracking.make_client(uri)
    experiment_id = client.create_experiment("serve-load")
    versions = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(model_dir)),
            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        )
        adapter_dir = workdir / f"adapter{seed}"
        model.save_pretrained(str(adapter_dir))
        run = client.create_run(experiment_id)
        client.log_artifacts(run.info.run_id, str(adapter_dir), artifact_path="adapter")
        versions.append(tracking.register_adapter_version(uri, "llmft-adapter", run.info.run_id, "adapter"))
    tracking.set_alias("llmft-adapter", "champion", versions[0], tracking_uri=uri)
    tracking.set_alias("llmft-adapter", "candidate", versions[1], tracking_uri=uri)
    return versions[0], versions[1]


def run_registry_flip(model_dir: Path, workdir: Path, requests: int, max_tokens: int) -> dict[str, Any]:
    import threading

    import httpx

    from llmft_assets.serving.registry import promote
    from llmft_assets.serving.request_log import read_request_logs
    from llmft_assets.storage import open_storage
    from llmft_assets_tests.servers import mlflow_server

    flip_dir = workdir / "registry"
    with mlflow_server(flip_dir / "mlflow") as uri:
        v1, v2 = _register_adapters(uri, model_dir, flip_dir)
        api_key = secrets.token_urlsafe(24)
        server, base_url = start_server(
            model_dir,
            flip_dir,
            api_key,
            {
                "LLMFT_REGISTRY_MODEL": "llmft-adapter",
                "LLMFT_REGISTRY_POLL_S": "0.5",
                "LLMFT_ADAPTER_CACHE": str(flip_dir / "adapters"),
                "MLFLOW_TRACKING_URI": uri,
            },
        )
        moves: list[dict[str, Any]] = []

        def served_champion() -> str:
            models = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}).json()
            return next(m["version"] for m in models["data"] if m["id"] == MODEL_NAME)

        def flip(after_s: float, version: str) -> None:
            time.sleep(after_s)
            moved = time.time()
            promote("llmft-adapter", version, tracking_uri=uri)
            while served_champion() != version:
                time.sleep(0.05)
            moves.append({"version": version, "moved": moved, "applied": time.time()})

        answered_ids: list[str] = []
        try:
            started = time.time()
            level: dict[str, Any] = {}

            def load() -> None:
                level.update(
                    asyncio.run(
                        run_level(
                            base_url,
                            api_key,
                            make_prompts(requests),
                            32,
                            max_tokens,
                            answered_ids=answered_ids,
                        )
                    )
                )

            loader = threading.Thread(target=load)
            loader.start()
            # Flip while the load runs: to the candidate at ~1/3 of the expected time, back at ~2/3.
            expected = max(6.0, requests / 20)
            flip(expected / 3, v2)
            flip(max(1.0, expected / 3 - (time.time() - started - expected / 3)), v1)
            loader.join()
        finally:
            server.stop(grace_seconds=30)
    table = read_request_logs(open_storage(str(flip_dir / "storage"))).to_pylist()
    rows = {r["request_id"]: r for r in table}
    mismatched = 0
    ambiguous = 0
    for request_id in answered_ids:
        row = rows.get(request_id)
        if row is None:
            continue
        arrived = row["timestamp"].timestamp() - row["latency_ms"] / 1000.0
        expected_version = v1
        either = False
        for move in moves:
            if arrived >= move["applied"]:
                expected_version = move["version"]
            elif arrived >= move["moved"]:
                either = True
        if either:
            ambiguous += 1
        elif row["model_version"] != expected_version:
            mismatched += 1
    return {
        **level,
        "versions": [v1, v2],
        "moves": [{**m, "propagation_s": round(m["applied"] - m["moved"], 3)} for m in moves],
        "logged": sum(1 for i in answered_ids if i in rows),
        "logged_equals_answered": all(i in rows for i in answered_ids),
        "rows_per_version": {
            v: sum(1 for i in answered_ids if rows.get(i, {}).get("model_version") == v) for v in (v1, v2)
        },
        "version_mismatches": mismatched,
        "rows_arrived_during_a_move": ambiguous,
    }


def count_logged_requests(storage_root: str, since: datetime) -> int:
    from llmft_assets.serving.request_log import read_request_logs
    from llmft_assets.storage import open_storage

    table = read_request_logs(open_storage(storage_root))
    return sum(1 for ts in table.column("timestamp").to_pylist() if ts >= since)


def start_server(
    model_dir: Path, workdir: Path, api_key: str, extra_env: dict[str, str] | None = None
) -> tuple[Any, str]:
    from llmft_assets_tests.servers import LOOPBACK, free_port, start_bentoml_serve

    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "LLMFT_MODEL_DIR": str(model_dir),
            "LLMFT_STORAGE": str(workdir / "storage"),
            "LLMFT_API_KEY": api_key,
            "LLMFT_REQUEST_LOG_FLUSH_S": "1",
            "LLMFT_REQUEST_LOG_SPOOL": str(workdir / "spool"),
            "BENTOML_HOME": str(workdir / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.update(extra_env or {})
    server = start_bentoml_serve(
        port,
        env=env,
        cwd=REPO_ROOT,
        log_path=workdir / f"server-{port}.log",
        timeout=300,
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
    parser.add_argument(
        "--library-prompts", type=int, default=32, help="prompts for engine vs generate_batch"
    )
    parser.add_argument(
        "--overload", type=int, default=256, help="concurrent requests of the overload run (0: skip)"
    )
    parser.add_argument("--registry", action="store_true", help="also run the alias-flip run (starts mlflow)")
    parser.add_argument("--registry-requests", type=int, default=1000)
    parser.add_argument("--registry-max-tokens", type=int, default=8)
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
        if args.overload:
            overload = run_overload(base_url, api_key, args.overload, args.max_tokens)
            answered_total += overload["answered"]
            results["overload"] = overload
            print(json.dumps({"overload": overload}), flush=True)
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
    comparison = run_engine_vs_library(model_dir, make_prompts(args.library_prompts), args.max_tokens)
    results["engine_vs_library"] = comparison
    print(json.dumps({"engine_vs_library": comparison}), flush=True)
    if args.registry:
        flip = run_registry_flip(model_dir, workdir, args.registry_requests, args.registry_max_tokens)
        results["registry_flip"] = flip
        print(json.dumps({"registry_flip": flip}), flush=True)
    top = max(levels)
    results["errors_5xx"] = sum(results[f"concurrency_{c}"]["errors_5xx"] for c in levels) + (
        results["overload"]["errors_5xx"] - results["overload"]["refused_503"] if "overload" in results else 0
    )
    results["speedup_concurrency"] = top
    results["speedup"] = round(
        results[f"concurrency_{top}"]["requests_per_s"] / results["baseline"]["requests_per_s"], 2
    )
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
