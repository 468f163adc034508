"""The data half of the graph: raw -> cleaned -> validated -> tokenized -> splits, plus the base model.

Each asset wires its config, storage and upstream artifact to one step of `llmft_assets.data.stage`,
which writes the stage's table(s) into a staging folder; the IO manager publishes it atomically.
Asset-to-asset information travels in typed manifests (`llmft_assets.manifests`).
"""

from pathlib import Path

import dagster as dg

from llmft_assets.data.splits import SplitSettings
from llmft_assets.data.stage import DATA_FILE, split_path
from llmft_assets.data.validation import ValidationLimits
from llmft_assets.defs import metadata
from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
)
from llmft_assets.manifests import BaseModelManifest, StageManifest

DATA_GROUP = "data"
MODEL_GROUP = "model"
# code_version on each asset: bump it when the step's output for the same inputs changes, so Dagster
# marks what was built by the old code as stale.


class RawDatasetConfig(dg.Config):
    source: str = "sample"
    """`sample` (bundled), a local file/glob/folder (jsonl, json, parquet), s3://bucket/prefix, or a HF dataset id."""
    config: str | None = "all"
    """R1-Distill-SFT config: v0, v1, or all (bundled sample only)."""
    max_rows: int | None = None
    batch_size: int = 2048
    columns: dict[str, str] | None = None
    """Your column names mapped onto a known format's, e.g. {prompt: question, response: answer}."""
    license: str | None = None
    """The dataset's licence when the per-source table (llmft_assets/training/licenses.py) does not know it."""


class CleanConfig(dg.Config):
    prefer_reannotated: bool = True
    """v1 rows: train on `reannotated_messages` (the R1 reasoning traces) rather than the short `messages`."""


ValidationConfig = dagster_config(ValidationLimits, "ValidationConfig")


class BaseModelConfig(dg.Config):
    model: str = "tiny"
    """`tiny` (built offline, deterministic) or a Hugging Face id / local path, e.g. Qwen/Qwen2.5-7B-Instruct."""
    revision: str | None = None
    pretrain_steps: int | None = None
    """tiny only: causal-LM pretraining steps on plain text (None = the builder's default)."""
    license: str | None = None
    """The model's licence when the per-model table (llmft_assets/training/licenses.py) does not know it."""


class TokenizeConfig(dg.Config):
    max_seq_len: int = 1024
    batch_size: int = 1024
    workers: int = 0
    """Tokenizer worker processes: 0 = one per CPU, 1 = in the step's own process."""


SplitConfig = dagster_config(SplitSettings, "SplitConfig")


def dataset_of(upstream: ArtifactHandle) -> dict | None:
    """The dataset description the upstream artifact carries (absent on old artifacts)."""
    return upstream.manifest(StageManifest).dataset


# The cleaned / validated / tokenized wiring, shared by this chain and its per-shard copy (shards.py);
# `asset` names the staging folder and the asset in config errors.


def cleaned_output(
    context: dg.AssetExecutionContext,
    config: CleanConfig,
    raw: ArtifactHandle,
    storage: StorageResource,
    asset: str,
) -> dg.Output[StagedArtifact]:
    from llmft_assets.data.stage import stage_cleaned

    staging = storage.staging_dir(asset)
    result = stage_cleaned(
        raw.file(DATA_FILE),
        prefer_reannotated=config.prefer_reannotated,
        dataset=dataset_of(raw),
        staging=staging,
        log=context.log.info,
    )
    return artifact_output(
        StagedArtifact.of(staging, result.manifest),
        metadata=metadata.stage_metadata(result, staging, raw.version),
    )


def validated_output(
    context: dg.AssetExecutionContext,
    config: "ValidationConfig",  # type: ignore[valid-type]
    cleaned: ArtifactHandle,
    storage: StorageResource,
    asset: str,
) -> dg.Output[StagedArtifact]:
    from llmft_assets.data.stage import stage_validated

    staging = storage.staging_dir(asset)
    result = stage_validated(
        cleaned.file(DATA_FILE),
        limits=config.to_domain(asset=asset),
        dataset=dataset_of(cleaned),
        staging=staging,
        log=context.log.info,
    )
    return artifact_output(
        StagedArtifact.of(staging, result.manifest),
        metadata={
            **metadata.stage_metadata(result, staging, cleaned.version),
            "reject_rate": result.reject_rate,
        },
    )


def tokenized_output(
    context: dg.AssetExecutionContext,
    config: "TokenizeConfig",
    validated: ArtifactHandle,
    base_model: ArtifactHandle,
    storage: StorageResource,
    asset: str,
) -> dg.Output[StagedArtifact]:
    from llmft_assets.data.stage import stage_tokenized

    staging = storage.staging_dir(asset)
    result = stage_tokenized(
        validated.file(DATA_FILE),
        base_model_dir=base_model.path,
        base_model_version=base_model.version,
        max_seq_len=config.max_seq_len,
        batch_size=config.batch_size,
        workers=config.workers,
        dataset=dataset_of(validated),
        staging=staging,
        log=context.log.info,
    )
    return artifact_output(
        StagedArtifact.of(staging, result.manifest),
        metadata=metadata.tokenized_metadata(result, staging, validated.version),
    )


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="2")
def raw_dataset(
    context: dg.AssetExecutionContext, config: RawDatasetConfig, storage: StorageResource
) -> dg.Output[StagedArtifact]:
    """R1-Distill-SFT rows as read from the source, one JSON payload per row; unparseable input quarantined."""
    from llmft_assets.data.raw_sources import DataSourceError
    from llmft_assets.data.stage import stage_raw

    staging = storage.staging_dir("raw_dataset")
    try:
        result = stage_raw(
            config.source,
            config=config.config,
            max_rows=config.max_rows,
            batch_size=config.batch_size,
            columns=config.columns,
            license_override=config.license,
            staging=staging,
            s3_client=storage.s3.get_client() if config.source.startswith("s3://") else None,
            log=context.log.info,
        )
    except (DataSourceError, ValueError) as exc:
        # One clear line for the person at the UI: which source, what is wrong. No retry can fix it.
        raise dg.Failure(description=f"raw_dataset: {exc}", allow_retries=False) from exc
    for warning in result.warnings:
        context.log.warning(warning)
    license_ = (result.manifest.dataset or {}).get("license")
    extra = {"source": config.source, "config": str(config.config), "license": license_}
    return artifact_output(
        StagedArtifact.of(staging, result.manifest),
        metadata={**metadata.stage_metadata(result, staging), **extra},
    )


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1")
def cleaned_dataset(
    context: dg.AssetExecutionContext,
    config: CleanConfig,
    raw_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """One canonical conversation schema for both configs: NFC, whitespace and control characters
    normalized, always-null columns dropped, exact duplicates removed by content hash."""
    return cleaned_output(context, config, raw_dataset, storage, "cleaned_dataset")


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="2")
def validated_dataset(
    context: dg.AssetExecutionContext,
    config: ValidationConfig,
    cleaned_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Conversations that pass the rules (role order, non-empty turns, balanced <think>, length bounds,
    answer present, unique ids); every rejected row is in quarantine.parquet with its reason."""
    return validated_output(context, config, cleaned_dataset, storage, "validated_dataset")


@dg.asset(group_name=MODEL_GROUP, owners=OWNERS, kinds={"pytorch", "safetensors"}, code_version="1")
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, storage: StorageResource
) -> dg.Output[StagedArtifact]:
    """The model and tokenizer everything trains on, published into storage so training pods and
    servers never need the hub. `tiny` is built offline and deterministically."""
    from llmft_assets.modeling.base_model import materialize_base_model
    from llmft_assets.training.licenses import base_model_license

    staging = storage.staging_dir("base_model")
    context.log.info(f"materializing base model {config.model!r}")
    info = materialize_base_model(
        config.model, staging, revision=config.revision, pretrain_steps=config.pretrain_steps
    )
    license_ = base_model_license(info.get("model_id"), config.license)
    info.update({"license": license_.license, "license_source": license_.source})
    return artifact_output(
        StagedArtifact.of(staging, BaseModelManifest(model_info=info)),
        metadata=metadata.base_model_metadata(info),
    )


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="1")
def tokenized_dataset(
    context: dg.AssetExecutionContext,
    config: TokenizeConfig,
    validated_dataset: ArtifactHandle,
    base_model: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Conversations rendered with the base model's own chat template; labels are -100 everywhere
    except assistant turns (content + end token); sequences over max_seq_len truncated and counted."""
    return tokenized_output(context, config, validated_dataset, base_model, storage, "tokenized_dataset")


@dg.asset(group_name=DATA_GROUP, owners=OWNERS, kinds={"parquet"}, code_version="2")
def dataset_splits(
    context: dg.AssetExecutionContext,
    config: SplitConfig,
    tokenized_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """train / validation / test by a stable hash of the normalized problem (the first user turn), so the
    same problem under two ids never crosses splits; near-duplicate prompts (MinHash) are kept together,
    with train winning. Adding rows never moves an existing row, except an evaluation row into train."""
    from llmft_assets.data.stage import stage_splits

    rule = config.to_domain(asset="dataset_splits")
    staging = storage.staging_dir("dataset_splits")
    result = stage_splits(
        tokenized_dataset.file(DATA_FILE),
        rule=rule,
        tokenized_version=tokenized_dataset.version,
        dataset=dataset_of(tokenized_dataset),
        staging=staging,
        log=context.log.info,
    )
    return artifact_output(
        StagedArtifact.of(staging, result.manifest),
        metadata=metadata.splits_metadata(result, staging, rule, tokenized_dataset.version),
    )


def split_file(splits: ArtifactHandle, name: str) -> Path:
    return split_path(splits.path, name)
