"""`drift_report`: Evidently drift of served traffic against the training data.

The drift step is `llmft_assets.monitoring.drift_step`; this asset wires config and storage to it.
Evidently is imported inside the step, never at module top.
"""

import dagster as dg

from llmft_assets.data.stage import split_path
from llmft_assets.defs import metadata
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    asset_prefix,
)

MONITORING_GROUP = "monitoring"
DRIFT_REPORT = "drift_report"


class DriftReportConfig(dg.Config):
    window_days: float = 7.0
    """The request log window compared with the training prompts: the `window_days` before `end_time`."""
    end_time: str | None = None
    """ISO-8601 end of the window (UTC if no offset); default now. The schedule sets its tick time."""
    drift_share_threshold: float = 0.5
    """Drift when at least this share of the compared columns drifted (Evidently's DataDriftPreset)."""
    min_rows: int = 50
    """Fewer rows in either window is a 'not enough data' report, not a verdict."""
    sample_size: int | None = 2_000
    """Rows per window the text-drift columns are compared on (None: every row)."""
    model_version: str | None = None
    """Only the traffic one adapter version answered (the request log's `model_version`); None: all."""
    max_rows_per_window: int = 50_000
    """Deterministic sample cap per window for the whole comparison (bounds memory on a big train split)."""
    text_method: str = "abs_text_content_drift"
    seed: int = 0


@dg.asset(group_name=MONITORING_GROUP, owners=OWNERS, kinds={"evidently", "html"})
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftReportConfig,
    dataset_splits: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Evidently drift of served traffic (the request log over `window_days`) against what the model
    was trained on (the train split's prompts and responses): HTML + JSON report, drift share and
    drifted columns as metadata. Too little data in either window is a 'not enough data' report."""
    from llmft_assets.monitoring.drift_step import DriftSettings, build_drift_artifacts

    backend, staging = storage.backend(), storage.staging_dir(DRIFT_REPORT)
    try:
        outcome = build_drift_artifacts(
            backend,
            split_path(dataset_splits.path, "train"),
            splits_version=dataset_splits.version,
            settings=DriftSettings(**config.model_dump()),
            staging=staging,
            version_prefix=lambda version: f"{asset_prefix(context.asset_key)}/{version}",
            log=context.log.info,
            warn=context.log.warning,
        )
    except ValueError as error:  # bad config values: one clear line, no retry can fix it
        raise dg.Failure(description=f"drift_report: {error}", allow_retries=False) from error
    return artifact_output(
        StagedArtifact.of(staging, outcome.manifest), metadata=metadata.drift_metadata(outcome)
    )
