"""Jobs. Training has its own job and executor (Dagster allows one executor per run, none per asset)."""

import dagster as dg

from llmft_assets import settings
from llmft_assets.defs.k8s_tags import gpu_run_tags

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


TRAIN_SELECTION = dg.AssetSelection.assets("lora_adapter")
RELEASE_SELECTION = dg.AssetSelection.groups("evaluation", "serving")

data_job = dg.define_asset_job(
    "data_job",
    selection=DATA_SELECTION,
    description="Raw data to train/validation/test splits, plus the base model (CPU, multiprocess).",
    # Run monitoring fails a run whose worker vanished with its host after this long (single-host launchers
    # cannot probe worker health); data runs take minutes, so a few hours is generous.
    tags={"dagster/max_runtime": str(settings.get().data_max_runtime_s)},
)


def _train_executor() -> dg.ExecutorDefinition:
    # LLMFT_TRAIN_EXECUTOR=k8s runs the training step in its own pod (GPU from the asset's op_tags);
    # the default runs it inside the run worker, which K8sRunLauncher places by the job's tags.
    if settings.get().train_executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return dg.in_process_executor


_train_on_k8s_steps = settings.get().train_executor == "k8s"

train_job = dg.define_asset_job(
    "train_job",
    selection=TRAIN_SELECTION,
    executor_def=_train_executor(),
    description="LoRA/QLoRA training on its own executor; one at a time through the `gpu` pool.",
    tags={
        "dagster/max_runtime": str(settings.get().train_max_runtime_s),
        "dagster/max_retries": "2",
        **({} if _train_on_k8s_steps else gpu_run_tags()),
    },
)

release_job = dg.define_asset_job(
    "release_job",
    selection=RELEASE_SELECTION,
    description="Evaluate the new adapter against the base model and the champion; package the winner.",
)
