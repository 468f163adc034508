"""drift_job: the drift report of served traffic against the training data, with its checks."""

import dagster as dg

from llmft_assets.defs.monitoring.assets import DRIFT_PARTITIONS, DRIFT_REPORT

drift_job = dg.define_asset_job(
    "drift_job",
    selection=dg.AssetSelection.assets(DRIFT_REPORT),
    partitions_def=DRIFT_PARTITIONS,
    description="The drift report of one day of served traffic (a partition) against the training data, "
    "with its check.",
)
