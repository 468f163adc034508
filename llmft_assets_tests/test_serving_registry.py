"""Several adapters from a real MLflow registry on one `bentoml serve`: routing by alias and
version, a promotion and a rollback with the README's commands while a request is running, and a
canary share. The openai client throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from llmft_assets.serving.request_log import read_request_logs
from llmft_assets.storage import open_storage
from llmft_assets_tests.servers import LOOPBACK, free_port, mlflow_server, start_bentoml_serve
from llmft_assets_tests.test_serving_engine import make_random_adapter
from llmft_assets_tests.test_serving_service import REPO_ROOT, server_env

pytestmark = pytest.mark.slow

API_KEY = "reg-" + uuid.uuid4().hex
REGISTERED = "llmft-adapter"


def register(uri: str, adapter_dir: Path) -> str:
    from llmft_assets.training import tracking

    client = tracking.make_client(uri)
    experiment = client.get_experiment_by_name("serving-test") or client.get_experiment(
        client.create_experiment("serving-test")
    )
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter_dir), artifact_path="adapter")
    client.set_terminated(run.info.run_id)
    return tracking.register_adapter_version(uri, REGISTERED, run.info.run_id, "adapter")


def release(uri: str, *args: str, subprocess_run: bool = False) -> dict:
    """The README's release commands: `python -m llmft_assets.serving.registry ...`.

    In-process through the same `main()` (an interpreter start costs seconds here), and once as a
    real subprocess to cover the module entry point.
    """
    if not subprocess_run:
        import contextlib
        import io

        from llmft_assets.serving.registry import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["--tracking-uri", uri, *args])
        return json.loads(out.getvalue().strip().splitlines()[-1])
    result = subprocess.run(
        [sys.executable, "-m", "llmft_assets.serving.registry", *args],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_adapters_by_alias_canary_promotion_and_rollback(tmp_path: Path) -> None:
    import openai

    from llmft_assets.modeling.tiny_model import build_tiny_model
    from llmft_assets.training import tracking

    model_dir = build_tiny_model(tmp_path / "model", pretrain_steps=0)
    with mlflow_server(tmp_path / "mlflow") as uri:
        v1 = register(uri, make_random_adapter(model_dir, tmp_path / "a1", seed=1))
        v2 = register(uri, make_random_adapter(model_dir, tmp_path / "a2", seed=2))
        tracking.set_alias(REGISTERED, "champion", v1, tracking_uri=uri)
        tracking.set_alias(REGISTERED, "candidate", v2, tracking_uri=uri)
        port = free_port()
        env = server_env(
            tmp_path,
            model_dir,
            LLMFT_API_KEY=API_KEY,
            LLMFT_REGISTRY_MODEL=REGISTERED,
            LLMFT_REGISTRY_POLL_S="0.5",
            LLMFT_ADAPTER_CACHE=str(tmp_path / "adapters"),
            MLFLOW_TRACKING_URI=uri,
            LLMFT_MAX_TOKENS="1000",
        )
        server = start_bentoml_serve(
            port,
            env=env,
            cwd=REPO_ROOT,
            log_path=tmp_path / "server.log",
            timeout=180,
        )
        try:
            api = openai.OpenAI(
                base_url=f"http://{LOOPBACK}:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120
            )
            listed = {m.id: m.model_extra["version"] for m in api.models.list().data}
            assert listed == {
                "llmft-chat": v1,
                "llmft-chat@champion": v1,
                "llmft-chat@candidate": v2,
                f"llmft-chat@{v1}": v1,
                f"llmft-chat@{v2}": v2,
            }

            def ask(model: str, content: str = "Name a colour.", **extra) -> openai.types.chat.ChatCompletion:
                return api.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": content}],
                    max_tokens=8,
                    temperature=0,
                    **extra,
                )

            answers = {
                model: ask(model) for model in ("llmft-chat", "llmft-chat@candidate", f"llmft-chat@{v2}")
            }
            assert answers["llmft-chat"].model == "llmft-chat"
            text = {model: answer.choices[0].message.content for model, answer in answers.items()}
            assert text["llmft-chat@candidate"] == text[f"llmft-chat@{v2}"] != text["llmft-chat"]
            with pytest.raises(openai.NotFoundError) as unknown:
                ask("llmft-chat@99")
            assert unknown.value.code == "model_not_found" and "llmft-chat@candidate" in unknown.value.message

            # Promote the candidate while a request to llmft-chat is running: it finishes on v1.
            chunks: list = []
            last_chunk_at = [0.0]
            first_chunk = threading.Event()

            def long_stream() -> None:
                stream = api.chat.completions.create(
                    model="llmft-chat",
                    messages=[{"role": "user", "content": "A long story."}],
                    max_tokens=1000,
                    temperature=0,
                    stream=True,
                )
                for chunk in stream:
                    chunks.append(chunk)
                    last_chunk_at[0] = time.monotonic()
                    first_chunk.set()

            streaming = threading.Thread(target=long_stream)
            streaming.start()
            assert first_chunk.wait(60)
            promoted_at = time.monotonic()
            assert release(uri, "promote", v2, subprocess_run=True)["champion"] == v2
            moved_at = time.monotonic()  # the alias has moved in the registry
            switched = wait_for_version(ask, v2, env_storage(tmp_path))
            switch_seconds = time.monotonic() - moved_at
            streaming.join(120)
            assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason in ("stop", "length")
            assert last_chunk_at[0] > promoted_at + 1, (
                "the stream ended before the promotion: nothing was in flight"
            )
            assert switched and switch_seconds < 5, switch_seconds
            print(f"promotion took effect {switch_seconds:.1f} s after the alias moved")

            # Roll back: llmft-chat is v1 again within seconds, no restart.
            assert release(uri, "rollback")["champion"] == v1
            assert wait_for_version(ask, v1, env_storage(tmp_path))

            # Canary: half of llmft-chat goes to the candidate (v2).
            assert release(uri, "canary", "0.5")["canary_share"] == "0.5"
            time.sleep(1.5)  # two polls
            canary_ids = [ask("llmft-chat", content=f"canary {i}").id for i in range(24)]
            rows = logged_rows(env_storage(tmp_path), set(canary_ids) | {chunks[0].id})
            assert rows[chunks[0].id]["model_version"] == v1  # the stream kept the version it started on
            assert {rows[i]["model_version"] for i in canary_ids} == {v1, v2}
            assert all(rows[i]["model"] == "llmft-chat" for i in canary_ids)
            status = release(uri, "status")
            assert (status["champion"], status["candidate"], status["previous"]) == (v1, v2, v2)
        finally:
            server.stop()
    assert "Traceback" not in (tmp_path / "server.log").read_text(errors="replace")


def env_storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


def logged_rows(storage_root: Path, ids: set[str], timeout: float = 20.0) -> dict[str, dict]:
    storage = open_storage(str(storage_root))
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["request_id"]: r for r in read_request_logs(storage).to_pylist() if r["request_id"] in ids}
        if len(rows) == len(ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def wait_for_version(ask, version: str, storage_root: Path, timeout: float = 10.0) -> bool:
    """Ask llmft-chat until a logged answer names `version`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = ask("llmft-chat")
        row = logged_rows(storage_root, {answer.id}).get(answer.id)
        if row is not None and row["model_version"] == version:
            return True
        time.sleep(0.2)
    return False
