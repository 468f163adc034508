"""`make demo`: materialize the whole asset graph on the embedded default and say what was made.

data_job -> train_job -> release_job (eval gate, bento) -> served traffic through `bentoml serve` and the
official openai client -> drift_job (today's partition of drift_report). Runs go through the Dagster
instance under $DAGSTER_HOME, so `make ui` shows them afterwards with their lineage, metadata and logs.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN_STEPS = 300
DEMO_LEARNING_RATE = 2e-3

# Small enough for a 2-core CPU machine in a few minutes; every key is a normal run-config field.
DEMO_RUN_CONFIG: dict[str, dict[str, Any]] = {
    # max_seq_len has one home, tokenized_dataset (training reads it from the tokenized manifest).
    "data_job": {"ops": {"tokenized_dataset": {"config": {"max_seq_len": 256}}}},
    # The bundled sample's rows are about 160 tokens: about 13 rows a step, two epochs over the ~2,160
    # training rows. A LoRA on the tiny model needs a higher learning rate than on a 7B model.
    "train_job": {
        "ops": {
            "lora_adapter": {
                "config": {
                    "max_steps": DEMO_TRAIN_STEPS,
                    "learning_rate": DEMO_LEARNING_RATE,
                    "max_tokens_per_batch": 2048,
                    "save_steps": 100,
                }
            }
        }
    },
    # The demo's answers are about 60 tokens: a 256-token budget leaves room and keeps a base model that
    # never stops from dominating the eval's time (the default budget is sized for real R1 traces).
    "release_job": {
        "ops": {"eval_report": {"config": {"max_rows": 64, "max_new_tokens": 256, "batch_size": 32}}}
    },
}

OFF_TOPIC_PROMPTS = [
    "Write a haiku about autumn leaves falling on a quiet lake.",
    "Translate 'good morning, how are you?' into French and German.",
    "Summarize the plot of a detective story in two sentences.",
    "What are three tips for a job interview?",
    "Explain what a database index is to a new programmer.",
    "Give me a recipe for a simple tomato soup.",
]


def _run_job(defs: Any, instance: Any, job_name: str, partition_key: str | None = None) -> dict[str, dict]:
    job = defs.get_job_def(job_name)
    started = time.monotonic()
    # INFO on the console (progress, loss, tokens/s); every DEBUG event is still in the run's log in the UI.
    run_config = {
        **DEMO_RUN_CONFIG.get(job_name, {}),
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
    }
    result = job.execute_in_process(
        instance=instance, run_config=run_config, partition_key=partition_key, raise_on_error=False
    )
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed]
    for evaluation in failed_checks:
        print(f"  check {evaluation.check_name} on {evaluation.asset_key.to_user_string()} did not pass")
    if not result.success:
        failures = [event.event_specific_data.error.message for event in result.get_step_failure_events()]
        if not failed_checks:
            raise SystemExit(f"{job_name} failed (run {result.run_id}):\n" + "\n".join(failures))
        # A blocking check (the promotion gate) stopped the job: a decision, not a crash; the summary shows it.
        print(f"  {job_name}: stopped by a blocking check; nothing downstream of it was made")
    print(
        f"  {job_name}: {'ok' if result.success else 'done'} in {time.monotonic() - started:.0f}s (run {result.run_id[:8]}, "
        f"load average {_load_average()})"
    )
    materialized = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        materialized[materialization.asset_key.to_user_string()] = {
            key: getattr(value, "value", value) for key, value in materialization.metadata.items()
        }
    return materialized


def _load_average() -> str:
    """The 1-minute load average: the machine may be shared, so phase times are read against it."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


# (label, metric, style): every criterion the gate looks at, base -> adapter.
_SUMMARY_METRICS = (
    ("verified accuracy", "accuracy", "pct"),
    ("format compliance", "format_compliance", "pct"),
    ("finish rate (stopped at the end token)", "finished_rate", "pct"),
    ("perplexity (assistant tokens)", "perplexity", "float"),
    ("mean response length (tokens)", "mean_response_tokens", "float"),
)


def _shown(value: Any, style: str) -> str:
    if not isinstance(value, int | float) or value != value:  # None or NaN
        return "n/a"
    return f"{100 * value:.1f}%" if style == "pct" else f"{value:.1f}"


def eval_summary_lines(report: dict[str, Any]) -> list[str]:
    """Base -> adapter for every criterion, then the gate's decision and its reasons (from eval_report.json)."""
    models = report["models"]
    lines = [f"  eval on {report['num_rows']} held-out test rows (base -> adapter):"]
    for label, metric, style in _SUMMARY_METRICS:
        before, after = models["base"].get(metric), models["adapter"].get(metric)
        lines.append(f"    {label:<40} {_shown(before, style):>8} -> {_shown(after, style)}")
    gate = report.get("gate") or {}
    decision = "PROMOTED to champion" if gate.get("passed") else "REFUSED (not promoted)"
    lines.append(f"  gate: {decision}")
    lines += [f"    - {reason}" for reason in gate.get("reasons", ["no gate decision in the report"])]
    return lines


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bentoml serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"bentoml serve was not ready at {url} after {timeout:.0f}s")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_and_ask(model_tag: str, prompts: list[str], storage_root: str, log_path: Path) -> dict[str, int]:
    """Serve the packaged model with `bentoml serve` on loopback and ask it `prompts` through the official
    openai client, 8 at a time; the server logs every answer into the request log."""
    import openai

    port = _free_port()
    api_key = secrets.token_urlsafe(24)  # a throwaway key for this demo server only
    env = {
        **os.environ,
        "LLMFT_BENTO_MODEL": model_tag,
        "LLMFT_API_KEY": api_key,
        "LLMFT_STORAGE": storage_root,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        str(Path(sys.executable).parent / "bentoml"),
        "serve",
        "bentos.service:LLMChatService",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    counts = {"sent": 0, "answered": 0, "errors": 0}
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0)
        model = client.models.list().data[0].id

        def ask(prompt: str) -> bool:
            try:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=96, temperature=0
                )
                return True
            except openai.OpenAIError:
                return False

        with ThreadPoolExecutor(max_workers=8) as pool:
            for ok in pool.map(ask, prompts):
                counts["sent"] += 1
                counts["answered" if ok else "errors"] += 1
    finally:
        # SIGTERM lets the server flush its last request-log batch; then the group is gone.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    return counts


def _traffic_prompts(splits_uri: str, count: int = 64) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(Path(splits_uri) / "test.parquet", columns=["messages"])
    in_distribution = [
        next(m["content"] for m in messages if m["role"] == "user")
        for messages in table.column("messages").to_pylist()
    ]
    rng = random.Random(0)
    prompts = [rng.choice(in_distribution) for _ in range(count - count // 4)]
    prompts += [rng.choice(OFF_TOPIC_PROMPTS) for _ in range(count // 4)]
    rng.shuffle(prompts)
    return prompts


def main() -> int:
    import dagster as dg

    from llmft_assets import settings
    from llmft_assets.definitions import defs

    home = settings.llmft_home()
    os.environ.setdefault("DAGSTER_HOME", str(home / "dagster_home"))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    instance = dg.DagsterInstance.get()
    storage_root = settings.storage_root()
    demo_started = time.monotonic()
    print(
        f"llmft demo: storage {storage_root}, Dagster home {os.environ['DAGSTER_HOME']}, "
        f"{os.cpu_count()} CPUs, load average {_load_average()}"
    )
    made: dict[str, dict] = {}
    for job_name in ("data_job", "train_job", "release_job"):
        made.update(_run_job(defs, instance, job_name))
    traffic: dict[str, int] = {}
    if "model_bento" in made and not storage_root.startswith("s3://"):
        prompts = _traffic_prompts(str(made["dataset_splits"]["uri"]))
        log_path = home / "logs" / "demo-serve.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"  serving {made['model_bento']['model_tag']} and sending {len(prompts)} requests ...")
        serve_started = time.monotonic()
        traffic = serve_and_ask(str(made["model_bento"]["model_tag"]), prompts, storage_root, log_path)
        print(
            f"  traffic: {traffic} in {time.monotonic() - serve_started:.0f}s (load average {_load_average()})"
        )
    if "drift_job" in {job.name for job in defs.resolve_all_job_defs()}:
        # drift_report is daily-partitioned: today's partition holds the traffic just sent.
        made.update(
            _run_job(defs, instance, "drift_job", partition_key=datetime.now(UTC).strftime("%Y-%m-%d"))
        )

    print()
    print("What was made:")
    for asset, metadata in made.items():
        print(f"  {asset:<18} version {metadata.get('version')}  {metadata.get('uri')}")
    splits = made["dataset_splits"]
    print(
        f"  splits: train {splits['train_rows']}, validation {splits['validation_rows']}, test {splits['test_rows']}"
    )
    if "lora_adapter" in made:
        adapter = made["lora_adapter"]
        print(
            f"  adapter: {adapter['global_step']} steps, loss {adapter['train_loss']:.3f}, "
            f"{adapter['tokens_per_second']:.0f} tokens/s, MLflow run {adapter['mlflow_run_id']}"
        )
    if "eval_report" in made:
        report_uri = str(made["eval_report"]["uri"])
        report_json = Path(report_uri) / "eval_report.json"
        if report_json.is_file():
            print("\n".join(eval_summary_lines(json.loads(report_json.read_text()))))
        print(f"  eval report: {report_uri}/eval_report.html")
    if "drift_report" in made:
        drift = made["drift_report"]
        print(f"  drift: {drift.get('status')} (share {drift.get('drift_share')}); report {drift['uri']}")
    print(f"  demo wall time: {time.monotonic() - demo_started:.0f}s (load average {_load_average()})")
    print()
    print("Open it:")
    print("  make ui     -> http://127.0.0.1:3001 (asset lineage, metadata, run logs)")
    print("  make serve  -> http://127.0.0.1:3000/v1 (OpenAI-compatible; needs LLMFT_API_KEY off loopback)")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {settings_tracking_uri()}")
    return 0


def settings_tracking_uri() -> str:
    from llmft_assets.training.tracking import default_tracking_uri

    return default_tracking_uri()


if __name__ == "__main__":
    sys.exit(main())
