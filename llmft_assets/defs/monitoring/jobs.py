"""drift_job: the drift report of served traffic against the training data, with its checks."""

import dagster as dg

from llmft_assets.defs.monitoring.assets import DRIFT_REPORT

drift_job = dg.define_asset_job(
    "drift_job",
    selection=dg.AssetSelection.assets(DRIFT_REPORT),
    description="The drift report of served traffic against the training data, with its check.",
)
