"""train_job: training has its own job and executor (Dagster allows one executor per run, none per asset)."""

import dagster as dg

from llmft_assets import settings
from llmft_assets.defs.k8s_tags import gpu_run_tags
from llmft_assets.training.training_data import RETRAINING_DATASET

TRAIN_SELECTION = dg.AssetSelection.assets("lora_adapter")


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

# train_job's run config for a drift retraining: lora_adapter trains on the latest retraining_dataset.
DRIFT_TRAIN_RUN_CONFIG = {"ops": {"lora_adapter": {"config": {"training_data": RETRAINING_DATASET}}}}
