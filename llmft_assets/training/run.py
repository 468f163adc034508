"""One LoRA training step, end to end: reuse a finished run of the same inputs, or train (in this process
or under `accelerate launch`), then package the adapter with its bill of materials and model card and
register it in MLflow as the `candidate`.

The run key (base model version, splits version, training config, process count) names the training:
its checkpoints live under `checkpoints/lora_adapter/<run key>/` (a retried step resumes from them)
and a `FINISHED.json` there answers the same inputs later by reuse. No Dagster import: the asset passes
storage, a tracker (the MLflow resource) and a log function in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmft_assets.manifests import AdapterManifest
from llmft_assets.storage import StorageBackend
from llmft_assets.storage.publish import FileEntry, content_version, describe_directory
from llmft_assets.training.config import TrainingConfig
from llmft_assets.training.registration import Tracker, register_candidate
from llmft_assets.training.training_data import DATASET_SPLITS, TrainingData

Log = Callable[[str], None]
# Runs a launch command with its environment; returns the structured reports the run sent back (Dagster
# Pipes' custom messages when the asset launches through Pipes, none from a plain subprocess).
Launcher = Callable[[list[str], dict[str, str]], list[Any]]

ADAPTER_SUBDIR = "adapter"
BOM_FILE = "bill_of_materials.json"
RESULT_FILE = "train_result.json"
FINISHED_RECORD = "FINISHED.json"
# What a person compares runs by; repeated when a finished run's adapter is reused.
REUSED_FIELDS = (
    "mlflow_run_id",
    "registered_model",
    "registered_version",
    "train_loss",
    "eval_loss",
    "global_step",
    "dataset_version",
    "base_model_version",
    "checkpoints_uri",
    "training_data",
)


@dataclass(frozen=True)
class TrainingInputs:
    base_model_dir: Path
    base_model_version: str
    base_model_uri: str
    base_model_info: dict[str, Any]
    data: TrainingData
    """What it trains on: dataset_splits, or a drift-targeted retraining_dataset (same layout)."""
    dataset: dict[str, Any] | None
    """Source and licence as raw_dataset recorded them (from the splits), for the bill of materials."""


@dataclass
class AdapterRun:
    """What the step produced: a staged adapter folder and either a fresh training or a reused one."""

    run_key: str
    staging: Path
    manifest: AdapterManifest
    entries: list[FileEntry]
    summary: dict[str, Any]
    """The REUSED_FIELDS of this run (for a reused adapter: those of the run that trained it)."""
    reused: bool = False
    reuse_reason: str | None = None
    result: Any = None  # TrainResult of a fresh training
    bom: dict[str, Any] = field(default_factory=dict)
    loss_png: bytes | None = None
    mlflow_run_url: str | None = None
    launch_reports: list[Any] = field(default_factory=list)
    """What the launched ranks reported back (per-step losses), multi-process runs only."""


def run_key(inputs: TrainingInputs, config: TrainingConfig, num_processes: int) -> str:
    parts = [inputs.base_model_version, inputs.data.version, config.model_dump_json()]
    parts += [f"num_processes={num_processes}"] if num_processes > 1 else []
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def checkpoint_prefix(key: str) -> str:
    return f"checkpoints/lora_adapter/{key}"


def finished_training(backend: StorageBackend, key: str, adapter_prefix: str) -> dict[str, Any] | None:
    """The record a completed training of `key` left, if its adapter is still in storage."""
    from llmft_assets.storage.backend import ObjectNotFound

    try:
        record = json.loads(backend.get_bytes(f"{checkpoint_prefix(key)}/{FINISHED_RECORD}"))
    except ObjectNotFound:
        return None
    return record if backend.exists(f"{adapter_prefix}/{record['adapter_version']}/_MANIFEST.json") else None


def reuse_adapter(
    backend: StorageBackend,
    finished: dict[str, Any],
    key: str,
    *,
    adapter_prefix: str,
    cache_dir: Path,
    staging: Path,
) -> AdapterRun:
    """The finished run's adapter, copied into `staging` (same files, same content version: no upload)."""
    from llmft_assets.storage import fetch_artifact

    version, previous = finished["adapter_version"], finished["metadata"]
    reason = (
        f"same base model, splits and config as Dagster run {finished['dagster_run_id']} (run key {key}): "
        f"adapter {version} (MLflow version {previous.get('registered_version')}) reused; nothing trained "
        "or registered"
    )
    published, path = fetch_artifact(backend, adapter_prefix, cache_dir, version=version)
    for entry in published.files:
        (staging / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path / entry.path, staging / entry.path)
    return AdapterRun(
        run_key=key,
        staging=staging,
        manifest=AdapterManifest.from_dict(dict(published.metadata)),
        entries=describe_directory(staging),
        summary=dict(previous),
        reused=True,
        reuse_reason=reason,
    )


def train_adapter(
    inputs: TrainingInputs,
    config: TrainingConfig,
    *,
    num_processes: int,
    backend: StorageBackend,
    storage_root: str,
    cache_dir: Path,
    adapter_prefix: str,
    new_staging_dir: Callable[[str], Path],
    tracker: Tracker,
    dagster_run_id: str,
    log: Log,
    launcher: Launcher | None = None,
) -> AdapterRun:
    """Reuse the adapter of a finished run with the same key, or train, package and register a new one.

    `launcher` runs the `accelerate launch` command of a multi-process run (default: a subprocess whose
    output goes to `log` line by line)."""
    from llmft_assets.evaluation.model_card import MODEL_CARD_FILE, model_card_from_bom
    from llmft_assets.training.bom import bill_of_materials, make_adapter_config_portable

    key = run_key(inputs, config, num_processes)
    finished = finished_training(backend, key, adapter_prefix)
    if finished is not None:
        staging = new_staging_dir("lora_adapter")
        reused = reuse_adapter(
            backend, finished, key, adapter_prefix=adapter_prefix, cache_dir=cache_dir, staging=staging
        )
        log(f"lora_adapter: {reused.reuse_reason}")
        return reused
    bom = bill_of_materials(
        base_model_info={
            **inputs.base_model_info,
            "artifact_version": inputs.base_model_version,
            "artifact_uri": inputs.base_model_uri,
        },
        dataset_version=inputs.data.version,
        dataset_asset=inputs.data.asset,
        # Source and licence as raw_dataset recorded them (per-source table or config), carried down the chain.
        dataset=inputs.dataset,
        config=config,
        seed=config.seed,
    )
    run_id = tracker.start_training_run(
        run_name=f"lora-{key[:8]}",
        params={**config.model_dump(), "num_processes": num_processes},
        tags={
            "llmft.dagster_run_id": dagster_run_id,
            "llmft.base_model": str(inputs.base_model_info.get("model_id", "")),
            "llmft.dataset_version": inputs.data.version,
            "llmft.run_key": key,
        },
    )
    run_url = tracker.run_url(run_id)
    log(f"MLflow run {run_id} ({run_url or tracker.resolved_tracking_uri()})")
    work = new_staging_dir("lora_adapter-work")
    try:
        result, reports = _launch(
            inputs,
            config,
            num_processes,
            key,
            work,
            backend,
            storage_root,
            cache_dir,
            tracker,
            run_id,
            log,
            launcher,
        )
    except BaseException:
        tracker.finish_run(run_id, status="FAILED")
        raise
    staging = new_staging_dir("lora_adapter")
    shutil.copytree(Path(result.adapter_dir), staging / ADAPTER_SUBDIR)
    make_adapter_config_portable(staging / ADAPTER_SUBDIR, bom["base_model"]["model_id"])
    (staging / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    # The bill of materials travels inside the adapter folder: to MLflow, the bento and any copy of it.
    (staging / ADAPTER_SUBDIR / BOM_FILE).write_text(json.dumps(bom, indent=2, default=str))
    (staging / ADAPTER_SUBDIR / MODEL_CARD_FILE).write_text(
        model_card_from_bom(bom, title="llmft LoRA adapter")
    )
    registered = register_candidate(
        tracker, run_id, staging / ADAPTER_SUBDIR, bom=bom, result=result, run_key=key,
        dataset_version=inputs.data.version,
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    log(
        f"trained {result.global_step} steps, loss {result.train_loss:.4f}, "
        f"{result.tokens_per_second:.0f} tokens/s; registered version {registered.version} as candidate"
    )
    summary = {
        "mlflow_run_id": run_id,
        "registered_model": tracker.registered_model_name,
        "registered_version": registered.version,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss if result.eval_loss is not None else float("nan"),
        "global_step": result.global_step,
        "dataset_version": inputs.data.version,
        "base_model_version": inputs.base_model_version,
        "checkpoints_uri": backend.uri(checkpoint_prefix(key)),
        "training_data": inputs.data.asset,
    }
    adapter_run = AdapterRun(
        run_key=key,
        staging=staging,
        manifest=AdapterManifest(
            run_key=key,
            mlflow_run_id=run_id,
            registered_version=registered.version,
            base_model_version=inputs.base_model_version,
            dataset_version=inputs.data.version,
            train_loss=result.train_loss,
            # Only a retraining says so: the default adapter's manifest stays as it was.
            training_data=inputs.data.asset if inputs.data.asset != DATASET_SPLITS else None,
        ),
        entries=describe_directory(staging),
        summary=summary,
        result=result,
        bom=bom,
        loss_png=registered.loss_png,
        mlflow_run_url=run_url,
        launch_reports=reports,
    )
    _record_finished(backend, adapter_run, dagster_run_id)
    return adapter_run


def _record_finished(backend: StorageBackend, run: AdapterRun, dagster_run_id: str) -> None:
    """Written after registration: from now on this run key is answered by reuse, never retrained."""
    record = {
        "adapter_version": content_version(run.entries),
        "dagster_run_id": dagster_run_id,
        "metadata": {key: run.summary[key] for key in REUSED_FIELDS if key in run.summary},
    }
    backend.put_bytes(
        f"{checkpoint_prefix(run.run_key)}/{FINISHED_RECORD}", json.dumps(record, default=str).encode()
    )


def _launch(
    inputs: TrainingInputs,
    config: TrainingConfig,
    num_processes: int,
    key: str,
    work: Path,
    backend: StorageBackend,
    storage_root: str,
    cache_dir: Path,
    tracker: Tracker,
    run_id: str,
    log: Log,
    launcher: Launcher | None,
) -> tuple[Any, list[Any]]:
    """Train in this process, or the same entry point under `accelerate launch` for >1 processes;
    returns the TrainResult and what the launched ranks reported back."""
    from llmft_assets.training.storage_checkpoints import StorageCheckpointStore
    from llmft_assets.training.trainer import TrainResult, train_lora

    train_path, eval_path = inputs.data.split("train"), inputs.data.split("validation")
    if num_processes <= 1:
        result = train_lora(
            base_model_dir=inputs.base_model_dir,
            train_path=train_path,
            eval_path=eval_path,
            output_dir=work,
            config=config,
            callbacks=[tracker.training_callback(run_id)],
            checkpoints=StorageCheckpointStore(backend, checkpoint_prefix(key), cache_dir),
            log=log,
        )
        return result, []
    config_file = work / "training_config.json"
    config_file.write_text(config.model_dump_json())
    args = [
        "--base-model", str(inputs.base_model_dir),
        "--train", str(train_path),
        "--eval", str(eval_path),
        "--output", str(work),
        "--config", str(config_file),
        # Checkpoints go to storage as in one process: rank 0 publishes, resume fetches from there.
        "--checkpoint-storage", storage_root,
        "--checkpoint-prefix", checkpoint_prefix(key),
        "--cache-dir", str(cache_dir),
        "--mlflow-run-id", run_id,
    ]  # fmt: skip
    reports = _run_accelerate(config, num_processes, args, tracker.resolved_tracking_uri(), log, launcher)
    return TrainResult.from_dict(json.loads((work / RESULT_FILE).read_text())), reports


class LaunchConfigError(ValueError):
    """The multi-process launch cannot be built from this config (no retry can fix it)."""


def _run_accelerate(
    config: TrainingConfig,
    num_processes: int,
    cli_args: list[str],
    tracking_uri: str,
    log: Log,
    launcher: Launcher | None,
) -> list[Any]:
    """The training CLI under `accelerate launch` with the strategy's accelerate config
    (deploy/accelerate/{ddp,fsdp}.yaml; CPU: gloo, CUDA: NCCL), run by `launcher`."""
    import os
    import sys

    import torch

    from llmft_assets.training.launch import accelerate_launch_command

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        command = accelerate_launch_command(
            strategy=config.strategy,
            num_processes=num_processes,
            precision=config.resolve_precision(device_type),
            cli_args=cli_args,
            python=sys.executable,
        )
    except (ValueError, FileNotFoundError) as error:
        raise LaunchConfigError(f"lora_adapter launch: {error}") from error
    log("launching: " + " ".join(command[2:]))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    if launcher is not None:
        return launcher(command, env)
    run_logged(command, env, log)
    return []


def run_logged(command: list[str], env: dict[str, str], log: Log) -> None:
    """A subprocess whose output goes to `log` line by line (the children write into our pipe: when this
    process dies they fail on their next write and end too)."""
    import subprocess

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        log(line.rstrip())
    if process.wait() != 0:
        raise RuntimeError(f"accelerate launch exited with {process.returncode}")
