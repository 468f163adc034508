"""The one Dagster code location of llmft: assets, checks, jobs, schedules, sensors and resources.

Heavy libraries (torch, transformers, mlflow, evidently, bentoml) are imported inside the asset bodies:
every step of a multiprocess run re-imports this module.
"""

import dagster as dg
from dagster_aws.s3 import S3Resource

from llmft_assets.defs.data.assets import (
    base_model,
    cleaned_dataset,
    dataset_splits,
    raw_dataset,
    tokenized_dataset,
    validated_dataset,
)
from llmft_assets.defs.data.checks import DATA_CHECKS
from llmft_assets.defs.data.jobs import data_job, release_job, train_job
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.monitoring.assets import (
    MONITORING_ASSETS,
    MONITORING_CHECKS,
    MONITORING_JOBS,
    MONITORING_SCHEDULES,
    MONITORING_SENSORS,
)
from llmft_assets.defs.serving.assets import license_policy, model_bento
from llmft_assets.defs.serving.export import merged_model
from llmft_assets.defs.storage_resources import ArtifactIOManager, StorageResource
from llmft_assets.defs.training.assets import eval_gate, eval_report, lora_adapter
from llmft_assets.defs.training.sensors import release_sensor, train_sensor

DATA_ASSETS = [raw_dataset, cleaned_dataset, validated_dataset, base_model, tokenized_dataset, dataset_splits]
TRAINING_ASSETS = [lora_adapter, eval_report]
SERVING_ASSETS = [model_bento]
EXPORT_ASSETS = [merged_model]


def build_resources() -> dict[str, object]:
    s3 = S3Resource()  # endpoint and credentials from the standard AWS environment (AWS_ENDPOINT_URL, ...)
    storage = StorageResource(s3=s3)
    return {
        "s3": s3,
        "storage": storage,
        "io_manager": ArtifactIOManager(storage=storage),
        "mlflow": MlflowResource(),
    }


defs = dg.Definitions(
    assets=[*DATA_ASSETS, *TRAINING_ASSETS, *SERVING_ASSETS, *EXPORT_ASSETS, *MONITORING_ASSETS],
    asset_checks=[*DATA_CHECKS, eval_gate, license_policy, *MONITORING_CHECKS],
    jobs=[data_job, train_job, release_job, *MONITORING_JOBS],
    sensors=[train_sensor, release_sensor, *MONITORING_SENSORS],
    schedules=MONITORING_SCHEDULES,
    resources=build_resources(),
)
