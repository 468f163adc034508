"""data_job: raw data to splits plus the base model, and the selection a data refresh materializes."""

import dagster as dg

from llmft_assets import settings

DATA_SELECTION = dg.AssetSelection.groups("data", "model")
# What a new data drop or a drift retraining refreshes: the data chain, not the base model (its own version
# is read from storage; rebuilding or re-downloading it per drop would be waste, and a new base model
# version would retrain everything).
FRESH_DATA_ASSETS = tuple(
    dg.AssetKey(name)
    for name in ("raw_dataset", "cleaned_dataset", "validated_dataset", "tokenized_dataset", "dataset_splits")
)


def fresh_data_selection(instance: dg.DagsterInstance) -> list[dg.AssetKey]:
    """The assets a data refresh materializes: the data chain, plus base_model only if it has never been."""
    has_base_model = instance.get_latest_materialization_event(dg.AssetKey("base_model")) is not None
    return list(FRESH_DATA_ASSETS) if has_base_model else [*FRESH_DATA_ASSETS, dg.AssetKey("base_model")]


data_job = dg.define_asset_job(
    "data_job",
    selection=DATA_SELECTION,
    description="Raw data to train/validation/test splits, plus the base model (CPU, multiprocess).",
    # Run monitoring fails a run whose worker vanished with its host after this long (single-host launchers
    # cannot probe worker health); data runs take minutes, so a few hours is generous.
    tags={"dagster/max_runtime": str(settings.get().data_max_runtime_s)},
)
