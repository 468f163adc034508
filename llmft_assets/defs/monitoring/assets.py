"""`drift_report`: Evidently drift of served traffic against the training data.

The drift step is `llmft_assets.monitoring.drift_step`; this asset wires config and storage to it.
Evidently is imported inside the step, never at module top.
"""

import dagster as dg

from llmft_assets.data.stage import split_path
from llmft_assets.defs import metadata
from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    asset_prefix,
)
from llmft_assets.monitoring.drift_step import DriftSettings

DRIFT_START_DATE = "2025-01-01"  # the first day a drift report can be made for (backfills start here)

MONITORING_GROUP = "monitoring"
DRIFT_REPORT = "drift_report"


# One report per day of the request log (`request_logs/date=YYYY-MM-DD/`): backfills and per-day history.
# end_offset=1: today's partition exists (a report on the traffic so far, rematerialized once the day is over).
DRIFT_PARTITIONS = dg.DailyPartitionsDefinition(start_date=DRIFT_START_DATE, end_offset=1, timezone="UTC")

DriftReportConfig = dagster_config(
    DriftSettings, "DriftReportConfig", doc="How the partition's day of traffic is compared (DriftSettings)."
)


@dg.asset(
    group_name=MONITORING_GROUP, owners=OWNERS, kinds={"evidently", "html"}, partitions_def=DRIFT_PARTITIONS
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftReportConfig,  # type: ignore[valid-type]
    dataset_splits: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Evidently drift of one day's served traffic (the partition; `window_days` > 1: the days up to it)
    against what the model was trained on (the train split's prompts and responses): HTML + JSON report,
    drift share and drifted columns as metadata. Too little data in either window (a day without traffic)
    is a 'not enough data' report."""
    from llmft_assets.monitoring.drift_step import build_drift_artifacts, day_window_end

    backend, staging = storage.backend(), storage.staging_dir(DRIFT_REPORT)
    try:
        outcome = build_drift_artifacts(
            backend,
            split_path(dataset_splits.path, "train"),
            splits_version=dataset_splits.version,
            settings=config.to_domain(asset=DRIFT_REPORT),
            end=day_window_end(context.partition_key),
            staging=staging,
            version_prefix=lambda version: (
                f"{asset_prefix(context.asset_key, context.partition_key)}/{version}"
            ),
            log=context.log.info,
            warn=context.log.warning,
        )
    except ValueError as error:  # bad config values: one clear line, no retry can fix it
        raise dg.Failure(description=f"drift_report: {error}", allow_retries=False) from error
    return artifact_output(
        StagedArtifact.of(staging, outcome.manifest), metadata=metadata.drift_metadata(outcome)
    )
