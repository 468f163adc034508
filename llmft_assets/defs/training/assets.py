"""Training and evaluation assets: `lora_adapter` (own job, `gpu` pool), `eval_report` and the `eval_gate`.

The training loop, tracking and metrics live in `llmft_assets.training` / `llmft_assets.evaluation`;
this layer wires storage, MLflow and config, and turns the results into metadata a person reads.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.data.assets import OWNERS, split_file
from llmft_assets.defs.k8s_tags import gpu_op_tags
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    asset_prefix,
)
from llmft_assets.evaluation.answer_check import DEFAULT_TIMEOUT_S as DEFAULT_ANSWER_TIMEOUT_S
from llmft_assets.evaluation.gate import Criterion, GateThresholds, criteria_table
from llmft_assets.evaluation.generate import DEFAULT_MAX_NEW_TOKENS
from llmft_assets.training.config import TrainingConfig

TRAINING_GROUP = "training"
EVALUATION_GROUP = "evaluation"
GPU_POOL = "gpu"
ADAPTER_SUBDIR = "adapter"
BOM_FILE = "bill_of_materials.json"
RESULT_FILE = "train_result.json"
LOSS_PNG = "loss_curve.png"


LoraAdapterConfig = dagster_config(
    TrainingConfig,
    "LoraAdapterConfig",
    doc="Hyper-parameters of the LoRA / QLoRA run: the fields of llmft_assets.training.config.TrainingConfig "
    "(validated there; errors name the field), plus how many processes run it.",
    extra_fields={
        "num_processes": (
            int,
            Field(default=1, description=">1 runs the same entry point under `accelerate launch` (DDP/FSDP)"),
        )
    },
)


def _tokenized_max_seq_len(storage: StorageResource, dataset_splits: ArtifactHandle) -> int:
    """The max_seq_len the splits' rows were tokenized with, from the tokenized_dataset manifest."""
    from llmft_assets.storage.publish import read_manifest

    tokenized_version = dataset_splits.metadata.get("upstream")
    manifest = read_manifest(
        storage.backend(), asset_prefix(dg.AssetKey("tokenized_dataset")), str(tokenized_version)
    )
    return int(manifest.metadata["max_seq_len"])


def _run_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


FINISHED_RECORD = "FINISHED.json"
# Metadata of the finished run repeated when its adapter is reused (what a person compares runs by).
_REUSED_METADATA = (
    "mlflow_run_id",
    "registered_model",
    "registered_version",
    "train_loss",
    "eval_loss",
    "global_step",
    "dataset_version",
    "base_model_version",
    "checkpoints_uri",
)


def _finished_key(run_key: str) -> str:
    return f"checkpoints/lora_adapter/{run_key}/{FINISHED_RECORD}"


def _finished_training(backend: Any, run_key: str) -> dict[str, Any] | None:
    """The record a completed training of `run_key` left, if its adapter is still in storage."""
    from llmft_assets.storage.backend import ObjectNotFound

    try:
        record = json.loads(backend.get_bytes(_finished_key(run_key)))
    except ObjectNotFound:
        return None
    manifest = f"{asset_prefix(dg.AssetKey('lora_adapter'))}/{record['adapter_version']}/_MANIFEST.json"
    return record if backend.exists(manifest) else None


def _record_finished_training(
    backend: Any, run_key: str, artifact: StagedArtifact, metadata: dict[str, Any], dagster_run_id: str
) -> None:
    """Written after registration: from now on this run key is answered by reuse, never retrained."""
    record = {
        "adapter_version": artifact.content_version(),
        "dagster_run_id": dagster_run_id,
        "metadata": {key: metadata[key] for key in _REUSED_METADATA if key in metadata},
    }
    backend.put_bytes(_finished_key(run_key), json.dumps(record, default=str).encode())


def _reused_adapter(
    context: dg.AssetExecutionContext, storage: StorageResource, finished: dict[str, Any], run_key: str
) -> dg.Output:
    from llmft_assets.storage import fetch_artifact

    version = finished["adapter_version"]
    previous = finished["metadata"]
    reason = (
        f"same base model, splits and config as Dagster run {finished['dagster_run_id']} (run key {run_key}): "
        f"adapter {version} (MLflow version {previous.get('registered_version')}) reused; nothing trained "
        "or registered"
    )
    context.log.info(f"lora_adapter: {reason}")
    published, path = fetch_artifact(
        storage.backend(), asset_prefix(dg.AssetKey("lora_adapter")), storage.cache_dir(), version=version
    )
    staging = storage.staging_dir("lora_adapter")
    for entry in published.files:  # the same files give the same content version, so nothing is re-uploaded
        (staging / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path / entry.path, staging / entry.path)
    metadata = {**previous, "reused": True, "skip_reason": reason, "run_key": run_key}
    return artifact_output(StagedArtifact(staging, metadata=dict(published.metadata)), metadata=metadata)


def _loss_markdown(history: list[tuple[int, float]], points: int = 12) -> str:
    if not history:
        return "no loss logged"
    stride = max(1, len(history) // points)
    picked = history[::stride]
    if picked[-1] != history[-1]:
        picked.append(history[-1])
    top = max(loss for _, loss in picked) or 1.0
    lines = ["| step | loss | |", "|---|---|---|"]
    lines += [f"| {step} | {loss:.4f} | {'█' * max(1, round(24 * loss / top))} |" for step, loss in picked]
    return "\n".join(lines)


def _train_with_accelerate(
    context: dg.AssetExecutionContext,
    num_processes: int,
    training_config: Any,
    args: list[str],
    output_dir: Path,
    tracking_uri: str,
) -> dict[str, Any]:
    """Multi-process training: the same CLI under `accelerate launch` with the strategy's accelerate config
    (deploy/accelerate/{ddp,fsdp}.yaml; CPU: gloo, CUDA: NCCL)."""
    import torch

    from llmft_assets.training.launch import accelerate_launch_command

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        command = accelerate_launch_command(
            strategy=training_config.strategy,
            num_processes=num_processes,
            precision=training_config.resolve_precision(device_type),
            cli_args=args,
            python=sys.executable,
        )
    except (ValueError, FileNotFoundError) as error:
        raise dg.Failure(description=f"lora_adapter launch: {error}", allow_retries=False) from error
    context.log.info("launching: " + " ".join(command[2:]))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        context.log.info(line.rstrip())
    if process.wait() != 0:
        raise dg.Failure(description=f"accelerate launch exited with {process.returncode}")
    return json.loads((output_dir / RESULT_FILE).read_text())


@dg.asset(
    group_name=TRAINING_GROUP,
    owners=OWNERS,
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL,
    code_version="2",
    retry_policy=dg.RetryPolicy(max_retries=2, delay=15),
    # Read by k8s_job_executor for this step's pod (dagster issue 22865); ignored in-process.
    op_tags=gpu_op_tags(),
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraAdapterConfig,
    base_model: ArtifactHandle,
    dataset_splits: ArtifactHandle,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[StagedArtifact]:
    """A LoRA (or QLoRA) adapter fine-tuned on the train split with assistant-only loss; checkpoints go to
    storage every `save_steps`, and a retried or re-launched run resumes from the latest one."""
    from llmft_assets.evaluation.model_card import MODEL_CARD_FILE, model_card_from_bom
    from llmft_assets.training.bom import bill_of_materials
    from llmft_assets.training.storage_checkpoints import StorageCheckpointStore
    from llmft_assets.training.tracking import log_loss_curve
    from llmft_assets.training.trainer import TrainResult, train_lora

    try:
        training_config = config.to_domain(asset="lora_adapter").with_max_seq_len(
            _tokenized_max_seq_len(storage, dataset_splits)
        )
    except ValueError as exc:
        raise dg.Failure(description=f"lora_adapter config is invalid: {exc}", allow_retries=False) from exc
    backend = storage.backend()
    run_key = _run_key(
        base_model.version,
        dataset_splits.version,
        training_config.model_dump_json(),
        *([f"num_processes={config.num_processes}"] if config.num_processes > 1 else []),
    )
    finished = _finished_training(backend, run_key)
    if finished is not None:
        # Same inputs + same config = the same adapter: hand back the one already trained and registered.
        return _reused_adapter(context, storage, finished, run_key)
    checkpoints = StorageCheckpointStore(backend, f"checkpoints/lora_adapter/{run_key}", storage.cache_dir())
    base_info = base_model.metadata.get("model_info", {})
    bom = bill_of_materials(
        base_model_info={**base_info, "artifact_version": base_model.version, "artifact_uri": base_model.uri},
        dataset_version=dataset_splits.version,
        # Source and licence as raw_dataset recorded them (per-source table or config), carried down the chain.
        dataset=dataset_splits.metadata.get("dataset"),
        config=training_config,
        seed=training_config.seed,
    )
    run_id = mlflow.start_training_run(
        run_name=f"lora-{run_key[:8]}",
        params={**training_config.model_dump(), "num_processes": config.num_processes},
        tags={
            "llmft.dagster_run_id": context.run.run_id,
            "llmft.base_model": str(base_info.get("model_id", "")),
            "llmft.dataset_version": dataset_splits.version,
            "llmft.run_key": run_key,
        },
    )
    context.log.info(f"MLflow run {run_id} ({mlflow.run_url(run_id) or mlflow.resolved_tracking_uri()})")
    work = storage.staging_dir("lora_adapter-work")
    try:
        if config.num_processes > 1:
            config_file = work / "training_config.json"
            config_file.write_text(training_config.model_dump_json())
            args = [
                "--base-model", str(base_model.path),
                "--train", str(split_file(dataset_splits, "train")),
                "--eval", str(split_file(dataset_splits, "validation")),
                "--output", str(work),
                "--config", str(config_file),
                # Checkpoints go to storage as in one process: rank 0 publishes, resume fetches from there.
                "--checkpoint-storage", storage.root_uri(),
                "--checkpoint-prefix", f"checkpoints/lora_adapter/{run_key}",
                "--cache-dir", str(storage.cache_dir()),
                "--mlflow-run-id", run_id,
            ]  # fmt: skip
            result = TrainResult.from_dict(
                _train_with_accelerate(
                    context, config.num_processes, training_config, args, work, mlflow.resolved_tracking_uri()
                )
            )
        else:
            result = train_lora(
                base_model_dir=base_model.path,
                train_path=split_file(dataset_splits, "train"),
                eval_path=split_file(dataset_splits, "validation"),
                output_dir=work,
                config=training_config,
                callbacks=[mlflow.training_callback(run_id)],
                checkpoints=checkpoints,
                log=context.log.info,
            )
    except BaseException:
        mlflow.finish_run(run_id, status="FAILED")
        raise

    staging = storage.staging_dir("lora_adapter")
    shutil.copytree(Path(result.adapter_dir), staging / ADAPTER_SUBDIR)
    result_data = result.to_dict()
    (staging / RESULT_FILE).write_text(json.dumps(result_data, indent=2))
    # The bill of materials travels inside the adapter folder: to MLflow, the bento and any copy of it.
    (staging / ADAPTER_SUBDIR / BOM_FILE).write_text(json.dumps(bom, indent=2, default=str))
    (staging / ADAPTER_SUBDIR / MODEL_CARD_FILE).write_text(
        model_card_from_bom(bom, title="llmft LoRA adapter")
    )
    loss_png = log_loss_curve(run_id, result.loss_history, tracking_uri=mlflow.resolved_tracking_uri())
    mlflow.log_adapter(run_id, staging / ADAPTER_SUBDIR)
    mlflow.log_bill_of_materials(run_id, bom)
    if result.eval_loss is not None:
        mlflow.log_metrics(run_id, {"eval_loss": result.eval_loss}, step=result.global_step)
    version = mlflow.register_adapter_version(
        run_id,
        tags={"llmft.run_key": run_key, "llmft.dataset_version": dataset_splits.version},
    )
    mlflow.set_alias("candidate", version)
    mlflow.finish_run(run_id)
    shutil.rmtree(work, ignore_errors=True)
    context.log.info(
        f"trained {result.global_step} steps, loss {result.train_loss:.4f}, "
        f"{result.tokens_per_second:.0f} tokens/s; registered version {version} as candidate"
    )
    metadata = {
        "mlflow_run_id": run_id,
        "mlflow_run_url": dg.MetadataValue.url(mlflow.run_url(run_id)) if mlflow.run_url(run_id) else run_id,
        "registered_model": mlflow.registered_model_name,
        "registered_version": str(version),
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss if result.eval_loss is not None else float("nan"),
        "global_step": result.global_step,
        "tokens_per_second": result.tokens_per_second,
        "train_tokens": result.num_train_tokens,
        "train_runtime_s": result.train_runtime_s,
        "trainable_params": result.num_trainable_params,
        "total_params": result.num_total_params,
        "resumed_from_step": result.resumed_from_step if result.resumed_from_step is not None else -1,
        "world_size": result.world_size,
        "device": result.device,
        "precision": result.precision,
        "loss_curve": dg.MetadataValue.md(_loss_markdown(result.loss_history)),
        "loss_history": dg.MetadataValue.json(result_data["loss_history"]),
        "bill_of_materials": dg.MetadataValue.json(json.loads(json.dumps(bom, default=str))),
        "checkpoints_uri": backend.uri(f"checkpoints/lora_adapter/{run_key}"),
        # The train sensor compares these with the latest inputs so one input pair trains once.
        "dataset_version": dataset_splits.version,
        "base_model_version": base_model.version,
    }
    if loss_png:
        metadata["loss_curve_artifact"] = loss_png
    metadata["reused"] = False
    artifact = StagedArtifact(
        staging,
        metadata={
            "run_key": run_key,
            "mlflow_run_id": run_id,
            "registered_version": str(version),
            "base_model_version": base_model.version,
            "dataset_version": dataset_splits.version,
            "train_loss": result.train_loss,
        },
    )
    _record_finished_training(backend, run_key, artifact, metadata, context.run.run_id)
    return artifact_output(artifact, metadata=metadata)


# The gate's thresholds have one home, GateThresholds; this run config is derived from it.
GateConfig = dagster_config(
    GateThresholds, "GateConfig", doc="Thresholds of the promotion gate (GateThresholds)."
)


class EvalReportConfig(dg.Config):
    max_rows: int = Field(default=64, description="test rows scored (generation is the slow part)")
    max_new_tokens: int = Field(
        default=DEFAULT_MAX_NEW_TOKENS, description="generation budget per answer (reasoning traces are long)"
    )
    batch_size: int = Field(default=16, description="rows decoded together (continuous batching)")
    compare_champion: bool = Field(
        default=True, description="also score the current champion on the same rows"
    )
    answer_timeout_s: float = Field(
        default=DEFAULT_ANSWER_TIMEOUT_S, gt=0, description="deadline of one answer's math-verify check"
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="the promotion gate's thresholds")  # type: ignore[valid-type]


def _adapter_dir_of_version(storage: StorageResource, version: str) -> Path:
    from llmft_assets.storage import fetch_artifact

    _, path = fetch_artifact(
        storage.backend(), asset_prefix(dg.AssetKey("lora_adapter")), storage.cache_dir(), version=version
    )
    return path / ADAPTER_SUBDIR


def _gate_tags(gate: dict[str, Any]) -> dict[str, str]:
    """MLflow version tags: the decision and, per criterion, "verdict: value comparator threshold"."""
    tags = {
        "llmft.gate.passed": str(bool(gate["passed"])).lower(),
        "llmft.gate.champion": str(gate["champion"]),
    }
    for criterion in gate["criteria"]:
        value, threshold = criterion["value"], criterion["threshold"]
        shown = "n/a" if value is None else f"{value:.4g}"
        limit = "" if threshold is None else f" (needs {criterion['comparator']} {threshold:.4g})"
        tags[f"llmft.gate.{criterion['name']}"] = f"{criterion['verdict']}: {shown}{limit}"
    return tags


def _gate_markdown(gate: dict[str, Any]) -> str:
    lines = [
        f"**{'PROMOTE' if gate['passed'] else 'REFUSE'}** (champion: {gate['champion'] or 'none'})",
        "",
        "| criterion | value | threshold | verdict |",
        "|---|---|---|---|",
    ]
    for row in criteria_table([Criterion(**criterion) for criterion in gate["criteria"]]):
        value = "-" if row["value"] is None else f"{row['value']:.4g}"
        lines.append(f"| {row['criterion']} | {value} | {row['threshold'] or '-'} | {row['verdict']} |")
    return "\n".join(lines)


def _gate_metadata(gate: dict[str, Any]) -> dict[str, Any]:
    """Flat metadata: the decision and each criterion's value, threshold and verdict (+ a table)."""
    metadata: dict[str, Any] = {
        "gate_passed": bool(gate["passed"]),
        "gate": dg.MetadataValue.md(_gate_markdown(gate)),
    }
    for criterion in gate["criteria"]:
        name = criterion["name"]
        metadata[f"{name}_value"] = criterion["value"] if criterion["value"] is not None else float("nan")
        metadata[f"{name}_threshold"] = (
            criterion["threshold"] if criterion["threshold"] is not None else float("nan")
        )
        metadata[f"{name}_verdict"] = criterion["verdict"]
    return metadata


@dg.asset(group_name=EVALUATION_GROUP, owners=OWNERS, kinds={"mlflow", "html"})
def eval_report(
    context: dg.AssetExecutionContext,
    config: EvalReportConfig,
    lora_adapter: ArtifactHandle,
    base_model: ArtifactHandle,
    dataset_splits: ArtifactHandle,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[StagedArtifact]:
    """Base model vs adapter (vs the champion) on the same test rows: verified accuracy, format compliance,
    finish rate, perplexity and response length, and the gate's decision on every criterion (JSON + HTML)."""
    from llmft_assets.evaluation.gate import decide_gate_for_report
    from llmft_assets.evaluation.report import evaluate
    from llmft_assets.storage.tables import iter_parquet_rows

    rows = next(iter_parquet_rows(split_file(dataset_splits, "test"), batch_size=config.max_rows), [])
    if not rows:
        raise dg.Failure(description="the test split is empty: nothing to evaluate", allow_retries=False)
    champion = mlflow.get_version_by_alias("champion")
    champion_dir = None
    champion_name = f"llmft-adapter v{champion.version}" if champion is not None else None
    adapter_version = lora_adapter.version
    if config.compare_champion and champion is not None:
        champion_artifact = (champion.tags or {}).get("llmft.adapter_version")
        if champion_artifact and champion_artifact != adapter_version:
            champion_dir = _adapter_dir_of_version(storage, champion_artifact)
    context.log.info(f"evaluating on {len(rows)} test rows (champion: {champion_name or 'none'})")
    report = evaluate(
        base_model.path,
        lora_adapter.path / ADAPTER_SUBDIR,
        rows,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        answer_timeout_s=config.answer_timeout_s,
        champion_adapter_dir=champion_dir,
        base_model_name=str(base_model.metadata.get("model_info", {}).get("model_id", "base")),
        adapter_name=f"adapter {adapter_version}",
        champion_name=champion_name if champion_dir is not None else None,
    )
    # The champion not scored on these rows (same adapter, or compare_champion off): its registry metrics;
    # none recorded fails the champion criteria (nothing to compare with) rather than skipping them.
    registry_metrics = None
    if champion is not None and champion_dir is None:
        registry_metrics = json.loads((champion.tags or {}).get("llmft.eval", "{}"))
    decision = decide_gate_for_report(
        report,
        thresholds=GateThresholds(**config.gate.model_dump()),
        champion=registry_metrics,
        champion_name=champion_name,
    )
    report.gate = {**decision.as_dict(), "champion_version": str(champion.version) if champion else None}
    staging = storage.staging_dir("eval_report")
    report.write(staging)
    headline = report.headline()
    run_id = lora_adapter.metadata.get("mlflow_run_id")
    if run_id:
        mlflow.log_metrics(
            run_id, {f"eval.{k}": float(v) for k, v in headline.items() if isinstance(v, int | float)}, step=0
        )
        mlflow.log_artifacts(run_id, staging, "eval_report")
    version = lora_adapter.metadata.get("registered_version")
    if version:
        mlflow.set_version_tags(
            version,
            {
                "llmft.adapter_version": adapter_version,
                "llmft.eval": json.dumps(report.metrics_for("adapter")),
                **_gate_tags(report.gate),
            },
        )
    context.log.info(f"gate: {'PROMOTE' if decision.passed else 'REFUSE'}; " + "; ".join(decision.reasons))
    metadata: dict[str, Any] = {
        key: (value if value is not None else float("nan")) for key, value in headline.items()
    }
    metadata["adapter_version"] = adapter_version
    metadata["registered_version"] = str(version)
    metadata["report_preview"] = dg.MetadataValue.md(_report_markdown(report))
    metadata.update(_gate_metadata(report.gate))
    return artifact_output(
        StagedArtifact(
            staging,
            metadata={
                "headline": headline,
                "adapter_version": adapter_version,
                "registered_version": version,
                "gate_passed": decision.passed,
            },
        ),
        metadata=metadata,
    )


def _report_markdown(report: Any) -> str:
    metrics = ["accuracy", "format_compliance", "finished_rate", "perplexity", "mean_response_tokens"]
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name in report.models:
        scores = report.metrics_for(name)
        cells = [f"{scores.get(m):.4g}" if isinstance(scores.get(m), int | float) else "-" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dg.asset_check(
    asset=eval_report,
    blocking=True,
    description=(
        "Promotion gate (decided in eval_report on every criterion: verified accuracy with an exact McNemar "
        "test against the base model, format compliance, finish rate, perplexity, no regression against the "
        "champion); on pass the version becomes `champion`."
    ),
)
def eval_gate(eval_report: ArtifactHandle, mlflow: MlflowResource) -> dg.AssetCheckResult:
    from llmft_assets.evaluation.report import REPORT_JSON, EvalReport

    report = EvalReport.from_json((eval_report.path / REPORT_JSON).read_text())
    gate = report.gate or {"passed": False, "criteria": [], "reasons": ["the report has no gate decision"]}
    champion_version = mlflow.get_version_by_alias("champion")
    current = str(champion_version.version) if champion_version else None
    passed = bool(gate["passed"])
    reasons = list(gate["reasons"])
    if passed and current != gate.get("champion_version"):
        # Another version became champion after this report was made: its comparison is stale.
        passed = False
        reasons.append(
            f"champion changed from {gate.get('champion_version')} to {current} since the evaluation; re-evaluate"
        )
    candidate = eval_report.metadata.get("registered_version")
    promoted = False
    if passed and candidate:
        mlflow.set_alias("champion", candidate)
        promoted = True
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            **_gate_metadata(gate),
            "reasons": dg.MetadataValue.md("\n".join(f"- {reason}" for reason in reasons)),
            "candidate_version": str(candidate),
            "previous_champion": current or "none",
            "promoted": promoted,
        },
    )
