"""`lora_adapter`: its own job (`train_job`), the `gpu` pool, GPU pod tags on k8s.

The training step (reuse, launch, packaging, MLflow registration) is `llmft_assets.training.run`; this
asset wires config, storage and MLflow to it and turns the result into metadata.
"""

from dataclasses import replace
from typing import Any

import dagster as dg
from pydantic import Field

from llmft_assets.defs import metadata
from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.k8s_tags import gpu_op_tags
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    MAY_BE_UNMATERIALIZED,
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    asset_prefix,
    published_version,
    recorded_version,
)
from llmft_assets.manifests import BaseModelManifest, SplitsManifest, StageManifest
from llmft_assets.training.config import TrainingConfig
from llmft_assets.training.run import Launcher
from llmft_assets.training.training_data import (
    DATASET_SPLITS,
    RETRAINING_DATASET,
    SHARDED_DATASET_SPLITS,
    TrainingData,
    TrainingDataSource,
)

TRAINING_GROUP = "training"
GPU_POOL = "gpu"

LoraAdapterConfig = dagster_config(
    TrainingConfig,
    "LoraAdapterConfig",
    doc="Hyper-parameters of the LoRA / QLoRA run: the fields of llmft_assets.training.config.TrainingConfig "
    "(validated there; errors name the field), plus how many processes run it.",
    extra_fields={
        "num_processes": (
            int,
            Field(default=1, description=">1 runs the same entry point under `accelerate launch` (DDP/FSDP)"),
        ),
        "training_data": (
            TrainingDataSource,
            Field(
                default=DATASET_SPLITS,
                description="dataset_splits (the input), the latest retraining_dataset (drift-targeted) or "
                "the latest sharded_dataset_splits (a source processed as shards)",
            ),
        ),
    },
)


def _tokenized_max_seq_len(storage: StorageResource, data: TrainingData) -> int:
    """The max_seq_len the training rows were tokenized with: recorded with sharded splits, else in the
    manifest of the tokenized_dataset version the rows came from."""
    from llmft_assets.storage.publish import read_manifest

    if data.max_seq_len is not None:
        return data.max_seq_len
    if data.asset == SHARDED_DATASET_SPLITS:
        raise ValueError(f"{data.asset} {data.version} records no max_seq_len; materialize it again")
    published = read_manifest(
        storage.backend(), asset_prefix(dg.AssetKey("tokenized_dataset")), str(data.tokenized_version)
    )
    return int(StageManifest.from_dict(published.metadata).max_seq_len or 0)


def _training_config(
    config: LoraAdapterConfig, storage: StorageResource, data: TrainingData
) -> TrainingConfig:
    try:
        domain = config.to_domain(asset="lora_adapter")
        tokenized = "shard_tokenized_dataset" if data.asset == SHARDED_DATASET_SPLITS else "tokenized_dataset"
        return domain.with_max_seq_len(_tokenized_max_seq_len(storage, data), source=tokenized)
    except ValueError as exc:
        raise dg.Failure(description=f"lora_adapter config is invalid: {exc}", allow_retries=False) from exc


def _training_data(
    context: dg.AssetExecutionContext,
    source: str,
    dataset_splits: ArtifactHandle | None,
    storage: StorageResource,
) -> TrainingData:
    """The splits input (the version Dagster pinned), or the latest retraining_dataset or
    sharded_dataset_splits Dagster recorded (fetched by version), with the source and licence it records
    (a retraining dataset: those of the splits)."""
    from llmft_assets.training.training_data import TrainingDataMissing, resolve_training_data

    if source == DATASET_SPLITS:
        version = None if dataset_splits is None else dataset_splits.version
    else:
        version = recorded_version(context.instance, dg.AssetKey(source))
    try:
        data = resolve_training_data(source, version, lambda asset, v: published_version(storage, asset, v))
    except TrainingDataMissing as exc:
        raise dg.Failure(description=f"lora_adapter: {exc}", allow_retries=False) from exc
    if data.dataset is None and dataset_splits is not None:  # a retraining dataset: its splits' source
        return replace(data, dataset=dataset_splits.manifest(SplitsManifest).dataset)
    return data


def _pipes_launcher(context: dg.AssetExecutionContext) -> Launcher:
    """Runs the `accelerate launch` of a multi-process training in a Dagster Pipes session: rank 0's log
    lines arrive as Dagster log events and its per-step losses as structured messages (returned).

    Not `PipesSubprocessClient`: its children write straight to this process's stdout, so ranks outlive a
    killed run worker; here every rank's output goes through a pipe this process reads (into the step's
    captured output), and the ranks end with it, as a plain launch does."""
    from llmft_assets.training.run import run_logged

    def launch(command: list[str], env: dict[str, str]) -> list[Any]:
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesTempFileContextInjector(),
            message_reader=dg.PipesTempFileMessageReader(),
        ) as session:
            run_logged(
                command, {**env, **session.get_bootstrap_env_vars()}, log=lambda line: print(line, flush=True)
            )
        return list(session.get_custom_messages())

    return launch


@dg.asset(
    group_name=TRAINING_GROUP,
    owners=OWNERS,
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL,
    code_version="2",
    retry_policy=dg.RetryPolicy(max_retries=2, delay=15),
    # Read by k8s_job_executor for this step's pod (dagster issue 22865); ignored in-process.
    op_tags=gpu_op_tags(),
    # Lineage: training_data=retraining_dataset (a drift retraining) or sharded_dataset_splits trains on
    # them; read by the version Dagster recorded, not loaded. dataset_splits loads as None when it was
    # never materialized (a sharded-only install); only training_data=dataset_splits then fails.
    deps=[RETRAINING_DATASET, SHARDED_DATASET_SPLITS],
    ins={"dataset_splits": dg.AssetIn(metadata={MAY_BE_UNMATERIALIZED: True})},
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraAdapterConfig,  # type: ignore[valid-type]
    base_model: ArtifactHandle,
    dataset_splits: ArtifactHandle | None,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[StagedArtifact]:
    """A LoRA (or QLoRA) adapter fine-tuned on the train split with assistant-only loss; checkpoints go to
    storage every `save_steps`, and a retried or re-launched run resumes from the latest one."""
    from llmft_assets.training.run import LaunchConfigError, TrainingInputs, train_adapter

    data = _training_data(context, config.training_data, dataset_splits, storage)
    inputs = TrainingInputs(
        base_model_dir=base_model.path,
        base_model_version=base_model.version,
        base_model_uri=base_model.uri,
        base_model_info=base_model.manifest(BaseModelManifest).model_info,
        data=data,
        dataset=data.dataset,
    )
    try:
        run = train_adapter(
            inputs,
            _training_config(config, storage, inputs.data),
            num_processes=config.num_processes,
            backend=storage.backend(),
            storage_root=storage.root_uri(),
            cache_dir=storage.cache_dir(),
            adapter_prefix=asset_prefix(context.asset_key),
            new_staging_dir=storage.staging_dir,
            tracker=mlflow,
            dagster_run_id=context.run.run_id,
            log=context.log.info,
            launcher=_pipes_launcher(context),
        )
    except LaunchConfigError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from error
    artifact = StagedArtifact(run.staging, metadata=run.manifest.to_dict(), entries=run.entries)
    return artifact_output(artifact, metadata=metadata.adapter_metadata(run))
