"""The data chain partitioned by source shard: each file of a source is a partition of `source_shards`,
cleaned, validated and tokenized in its own run (parallel runs: a backfill launches one run per
partition), and `sharded_dataset_splits` assembles every partition into train/validation/test.

Registering a source (`register_source_shards`, or `register_shards_job` from the UI) lists its files
(`llmft_assets.data.shards`), records each under `<storage root>/source_shards/<key>.json` and adds the
keys as dynamic partitions. A partition's artifacts live at `assets/<asset>/<shard key>/<version>/` with
their own `LATEST.json`. `shard_job` runs one shard's steps on the multiprocess executor, or with
LLMFT_SHARD_EXECUTOR=k8s each step as a pod (`k8s_job_executor`). Cross-shard exact duplicates and repeated
ids are removed where the shards meet (`llmft_assets.data.shards.assemble_shards`).
"""

from typing import TYPE_CHECKING

import dagster as dg

from llmft_assets import settings
from llmft_assets.data.stage import DATA_FILE
from llmft_assets.defs import metadata
from llmft_assets.defs.data.assets import (
    CleanConfig,
    SplitConfig,
    TokenizeConfig,
    ValidationConfig,
    cleaned_output,
    tokenized_output,
    validated_output,
)
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
)
from llmft_assets.manifests import StageManifest

if TYPE_CHECKING:
    from llmft_assets.data.shards import ShardInput

SOURCE_SHARDS = dg.DynamicPartitionsDefinition(name="source_shards")
SHARD_GROUP = "data_shards"
SHARD_ASSETS = (
    "shard_raw_dataset",
    "shard_cleaned_dataset",
    "shard_validated_dataset",
    "shard_tokenized_dataset",
)


class ShardRawConfig(dg.Config):
    """raw_dataset's reading options; the source itself is the shard's registration."""

    max_rows: int | None = None
    batch_size: int = 2048
    columns: dict[str, str] | None = None
    """Your column names mapped onto a known format's, e.g. {prompt: question, response: answer}."""
    license: str | None = None


class RegisterShardsConfig(dg.Config):
    source: str = "sample"
    """`sample`, a local file/glob/folder, or s3://bucket/prefix: each of its files becomes a shard."""
    config: str | None = "all"
    """R1-Distill-SFT config of the bundled sample (v0, v1, all): one shard per config."""


def register_source_shards(
    instance: dg.DagsterInstance, storage: StorageResource, source: str, config: str | None = None
) -> list[str]:
    """List `source`'s files as shards, record them in storage and add them as `source_shards` partitions;
    returns the shard keys in order (registering again is a no-op)."""
    from llmft_assets.data.shards import list_source_shards, register_shards

    s3_client = storage.s3.get_client() if source.startswith("s3://") else None
    keys = register_shards(storage.backend(), list_source_shards(source, config, s3_client))
    known = set(instance.get_dynamic_partitions(SOURCE_SHARDS.name))
    instance.add_dynamic_partitions(SOURCE_SHARDS.name, [key for key in keys if key not in known])
    return keys


def shard_run_requests(
    storage: StorageResource, source: str, *, run_key: str, tags: dict[str, str]
) -> tuple[list[str], list[dg.RunRequest]]:
    """Record `source`'s files as shards (an incoming drop: its files) and one shard_job run per shard;
    the caller adds the returned keys as partitions (a sensor: `dynamic_partitions_requests`)."""
    from llmft_assets.data.shards import list_source_shards, register_shards

    s3_client = storage.s3.get_client() if source.startswith("s3://") else None
    keys = register_shards(storage.backend(), list_source_shards(source, None, s3_client))
    requests = [
        dg.RunRequest(run_key=f"{run_key}-{key}", job_name="shard_job", partition_key=key, tags=tags)
        for key in keys
    ]
    return keys, requests


@dg.op(description="List a source's files and add each as a partition of source_shards.")
def register_source_shards_op(
    context: dg.OpExecutionContext, config: RegisterShardsConfig, storage: StorageResource
) -> None:
    # No output: the partitions are the result (nothing for the artifact IO manager to publish).
    from llmft_assets.data.raw_sources import DataSourceError

    try:
        keys = register_source_shards(context.instance, storage, config.source, config.config)
    except (DataSourceError, ValueError) as exc:
        raise dg.Failure(description=f"register_shards_job: {exc}", allow_retries=False) from exc
    context.log.info(f"{config.source}: {len(keys)} shard(s) registered: {', '.join(keys)}")


@dg.job(
    description="Register a source's files as source_shards partitions (then backfill shard_job over them)."
)
def register_shards_job() -> None:
    register_source_shards_op()


def _shard_input(key: str, tokenized: ArtifactHandle) -> "ShardInput":
    from llmft_assets.data.shards import ShardInput

    manifest = tokenized.manifest(StageManifest)
    return ShardInput(
        key=key,
        data_file=tokenized.file(DATA_FILE),
        version=tokenized.version,
        dataset=manifest.dataset,
        max_seq_len=manifest.max_seq_len,
        base_model_version=manifest.base_model_version,
    )


@dg.asset(
    partitions_def=SOURCE_SHARDS, group_name=SHARD_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1"
)
def shard_raw_dataset(
    context: dg.AssetExecutionContext, config: ShardRawConfig, storage: StorageResource
) -> dg.Output[StagedArtifact]:
    """One shard of the source (a file), read as raw_dataset reads a source; unparseable rows quarantined."""
    from llmft_assets.data.raw_sources import DataSourceError
    from llmft_assets.data.shards import UnknownShardError, read_shard
    from llmft_assets.data.stage import stage_raw

    staging = storage.staging_dir("shard_raw_dataset")
    try:
        shard = read_shard(storage.backend(), context.partition_key)
        result = stage_raw(
            shard.source,
            config=shard.config,
            max_rows=config.max_rows,
            batch_size=config.batch_size,
            columns=config.columns,
            license_override=config.license,
            staging=staging,
            s3_client=storage.s3.get_client() if shard.source.startswith("s3://") else None,
            log=context.log.info,
            described_as=(shard.listed_from, shard.listed_config),
        )
    except (DataSourceError, UnknownShardError, ValueError) as exc:
        raise dg.Failure(
            description=f"shard_raw_dataset[{context.partition_key}]: {exc}", allow_retries=False
        ) from exc
    return artifact_output(
        StagedArtifact.of(staging, result.manifest),
        metadata={**metadata.stage_metadata(result, staging), "shard_source": shard.source},
    )


@dg.asset(
    partitions_def=SOURCE_SHARDS, group_name=SHARD_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1"
)
def shard_cleaned_dataset(
    context: dg.AssetExecutionContext,
    config: CleanConfig,
    shard_raw_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """cleaned_dataset of one shard: exact duplicates removed within the shard (across shards: at assembly)."""
    return cleaned_output(context, config, shard_raw_dataset, storage, "shard_cleaned_dataset")


@dg.asset(
    partitions_def=SOURCE_SHARDS, group_name=SHARD_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1"
)
def shard_validated_dataset(
    context: dg.AssetExecutionContext,
    config: ValidationConfig,
    shard_cleaned_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """validated_dataset of one shard: the same rules; ids unique within the shard (across shards: at assembly)."""
    return validated_output(context, config, shard_cleaned_dataset, storage, "shard_validated_dataset")


@dg.asset(
    partitions_def=SOURCE_SHARDS, group_name=SHARD_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1"
)
def shard_tokenized_dataset(
    context: dg.AssetExecutionContext,
    config: TokenizeConfig,
    shard_validated_dataset: ArtifactHandle,
    base_model: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """tokenized_dataset of one shard, with the base model's chat template and assistant-only labels."""
    return tokenized_output(
        context, config, shard_validated_dataset, base_model, storage, "shard_tokenized_dataset"
    )


# sharded_dataset_splits assembles itself once a shard was (re)tokenized and no shard is missing or still
# running: after a backfill over every shard, or after an incoming drop's shard runs, one assembly. Not
# `eager()`: that would also request it while no shard is registered at all (a run bound to fail).
ASSEMBLE_WHEN_SHARDS_DONE = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_missing()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
)


@dg.asset(
    group_name=SHARD_GROUP,
    owners=OWNERS,
    kinds={"parquet"},
    code_version="1",
    ins={"shard_tokenized_dataset": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
    automation_condition=ASSEMBLE_WHEN_SHARDS_DONE,
)
def sharded_dataset_splits(
    context: dg.AssetExecutionContext,
    config: SplitConfig,
    shard_tokenized_dataset: dict[str, ArtifactHandle],
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Every tokenized shard assembled: exact duplicates (content hash) and repeated ids removed across
    shards, then split as dataset_splits splits (stable hash of the normalized problem, near duplicates
    kept together), so the same rows give the same splits however they were sharded. Records the shards'
    common max_seq_len and base_model version (a disagreement fails, naming the shards)."""
    from llmft_assets.data.shards import assemble_shards

    rule = config.to_domain(asset="sharded_dataset_splits")
    staging = storage.staging_dir("sharded_dataset_splits")
    shards = [_shard_input(key, handle) for key, handle in shard_tokenized_dataset.items()]
    try:
        result = assemble_shards(shards, rule=rule, staging=staging, log=context.log.info)
    except ValueError as exc:
        raise dg.Failure(description=f"sharded_dataset_splits: {exc}", allow_retries=False) from exc
    return artifact_output(
        StagedArtifact.of(staging, result.manifest),
        metadata=metadata.sharded_splits_metadata(result, staging, rule),
    )


def _shard_executor() -> dg.ExecutorDefinition:
    # LLMFT_SHARD_EXECUTOR=k8s: each step of a shard run in its own pod; by default the run's steps share
    # its worker through the multiprocess executor. Shards run in parallel as separate runs either way.
    if settings.get().shard_executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return dg.multiprocess_executor


shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets(*SHARD_ASSETS),
    partitions_def=SOURCE_SHARDS,
    executor_def=_shard_executor(),
    description="One source shard from raw to tokenized; a backfill over source_shards runs the shards in "
    "parallel runs (then materialize sharded_dataset_splits).",
    tags={"dagster/max_runtime": str(settings.get().data_max_runtime_s)},
)
