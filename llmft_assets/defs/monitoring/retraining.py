"""Drift-targeted retraining data: the `retraining_dataset` asset, its job and its sensor.

Lineage: drift_report (which request-log window drifted) + the request log of that window + the candidate
pool (config `pool`: tokenized_dataset, every row the pipeline ingested, by default; or raw files,
`llmft_assets.monitoring.retrain_pool`) + dataset_splits (the current training
rows to mix with, the held-out problems never to take). The step is
`llmft_assets.monitoring.retraining_step` over `llmft_assets.monitoring.retrain_selection` (no Dagster there).

`drift_retrain_sensor` (defs/monitoring/sensors.py) builds it once per drift event: a failed drift_check with
a drift verdict starts `retraining_dataset_job` (run key per drift report version; the retraining cooldown
applies), then `train_job` with lora_adapter's `training_data=retraining_dataset`.

The artifact has dataset_splits' layout (train / validation / test .parquet, tokenized) plus
`traffic_slice.parquet` (held-out rows shaped like the traffic, for the gate) and `selection.json`. A window
without served traffic (a fresh install) selects nothing: the current splits are published unchanged, with no
traffic slice, so 'Materialize all' succeeds and drift_retrain_sensor does not train on it.
"""

import dagster as dg
from pydantic import Field

from llmft_assets.data.stage import DATA_FILE
from llmft_assets.defs import metadata
from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.monitoring.assets import DRIFT_REPORT
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    recorded_partition_artifact,
)
from llmft_assets.manifests import DriftManifest, StageManifest
from llmft_assets.monitoring.retrain_pool import DEFAULT_POOL, POOL_DESCRIPTION, POOL_TOKENIZED
from llmft_assets.monitoring.retrain_selection import SelectionSettings
from llmft_assets.monitoring.retraining_step import RawPoolInputs
from llmft_assets.training.training_data import RETRAINING_DATASET

RETRAINING_GROUP = "retraining"

RetrainingDatasetConfig = dagster_config(
    SelectionSettings,
    "RetrainingDatasetConfig",
    doc="How the retraining dataset is selected (SelectionSettings) and which traffic it follows.",
    extra_fields={
        "model_version": (
            str | None,
            Field(default=None, description="only the traffic this adapter version answered; None: all"),
        ),
        "batch_rows": (int, Field(default=10_000, gt=0, description="pool rows read per streamed batch")),
        "pool": (str, Field(default=DEFAULT_POOL, description=POOL_DESCRIPTION)),
        "drift_day": (
            str | None,
            Field(
                default=None,
                description="the drift_report partition (YYYY-MM-DD) whose traffic to follow; None: the newest "
                "day with a report (drift_retrain_sensor sets the day whose drift_check failed)",
            ),
        ),
    },
)


def retraining_run_config(drift_day: str | None) -> dict:
    """retraining_dataset_job's run config following one day's drift report."""
    return {"ops": {RETRAINING_DATASET: {"config": {"drift_day": drift_day}}}}


# drift_report is daily-partitioned; this asset is not. It follows one day's report (config drift_day: the
# day whose drift_check failed, else the newest day with a report), so it reads it itself; the graph draws
# the dependency on the last partition.
@dg.asset(
    group_name=RETRAINING_GROUP,
    owners=OWNERS,
    kinds={"parquet"},
    deps=[dg.AssetDep(DRIFT_REPORT, partition_mapping=dg.LastPartitionMapping())],
)
def retraining_dataset(
    context: dg.AssetExecutionContext,
    config: RetrainingDatasetConfig,  # type: ignore[valid-type]
    dataset_splits: ArtifactHandle,
    tokenized_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """The pool rows nearest to what users asked in the drift report's window, mixed with the current
    training rows; held-out test/validation problems never taken; a traffic-shaped evaluation slice.
    A window without served traffic publishes the current splits unchanged (metadata `carried_over`)."""
    from llmft_assets.data.raw_sources import DataSourceError
    from llmft_assets.monitoring.retraining_step import RetrainingInputs, build_retraining_dataset

    drift_report = _drift_report(context, storage, config.drift_day)
    inputs = RetrainingInputs(
        drift_report_version=drift_report.version,
        drift_summary=drift_report.manifest(DriftManifest).summary,
        splits_dir=dataset_splits.path,
        splits_version=dataset_splits.version,
        pool_file=tokenized_dataset.file(DATA_FILE),
        pool_version=tokenized_dataset.version,
    )
    staging = storage.staging_dir(RETRAINING_DATASET)
    try:
        raw_pool = _raw_pool(context, config.pool, tokenized_dataset, storage)
        result = build_retraining_dataset(
            inputs,
            storage.backend(),
            settings=config.to_domain(asset=RETRAINING_DATASET),
            model_version=config.model_version,
            batch_rows=config.batch_rows,
            staging=staging,
            log=context.log.info,
            raw_pool=raw_pool,
        )
    except (ValueError, DataSourceError) as error:  # e.g. no window, no pool: one clear line, no retry
        raise dg.Failure(description=f"{RETRAINING_DATASET}: {error}", allow_retries=False) from error
    return artifact_output(
        StagedArtifact.of(staging, result.manifest), metadata=metadata.retraining_metadata(result)
    )


def _drift_report(
    context: dg.AssetExecutionContext, storage: StorageResource, day: str | None
) -> ArtifactHandle:
    try:
        day, report = recorded_partition_artifact(context.instance, storage, dg.AssetKey(DRIFT_REPORT), day)
    except ValueError as error:  # nothing to follow yet: one clear line, no retry can fix it
        raise dg.Failure(
            description=f"{RETRAINING_DATASET}: {error}; materialize a day of drift_report first",
            allow_retries=False,
        ) from error
    context.log.info(f"following drift_report[{day}] {report.version}")
    return report


def _raw_pool(
    context: dg.AssetExecutionContext, pool: str, tokenized_dataset: ArtifactHandle, storage: StorageResource
) -> RawPoolInputs | None:
    """A raw pool is prepared like the data chain's rows: the cleaning and validation settings its dataset
    description records, and the tokenizer and max_seq_len tokenized_dataset was built with."""
    from llmft_assets.monitoring.retrain_pool import preparation_of, resolve_pool
    from llmft_assets.run_tags import TAG_INCOMING_DROP

    if pool.strip() == POOL_TOKENIZED:
        return None  # the tokenized rows themselves: nothing to prepare
    tokenized = tokenized_dataset.manifest(StageManifest)
    # incoming/ drops the incoming sensor already took are complete (as are ready-marked ones); the others
    # may still be being written.
    taken = {value for tag in context.instance.get_run_tags([TAG_INCOMING_DROP]) for value in tag[1]}
    locations = resolve_pool(pool, dataset=tokenized.dataset, backend=storage.backend(), complete_drops=taken)
    if locations is None:
        return None
    if not tokenized.base_model_version or not tokenized.max_seq_len:
        raise ValueError(
            "tokenized_dataset records no base_model_version/max_seq_len to tokenize the pool with"
        )
    return RawPoolInputs(
        locations=locations,
        tokenizer_dir=storage.artifact_dir("base_model", tokenized.base_model_version),
        max_seq_len=tokenized.max_seq_len,
        **preparation_of(tokenized.dataset, log=context.log.warning),
        s3_client=storage.s3.get_client() if any(s.startswith("s3://") for s in locations.sources) else None,
    )


retraining_dataset_job = dg.define_asset_job(
    "retraining_dataset_job",
    selection=dg.AssetSelection.assets(RETRAINING_DATASET),
    description="The drift-targeted retraining dataset of the latest drift report.",
)
