"""release_job: evaluate the new adapter (the gate), then package the winner."""

import dagster as dg

RELEASE_SELECTION = dg.AssetSelection.groups("evaluation", "serving")

release_job = dg.define_asset_job(
    "release_job",
    selection=RELEASE_SELECTION,
    description="Evaluate the new adapter against the base model and the champion; package the winner.",
)
