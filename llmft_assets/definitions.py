"""The one Dagster code location of llmft: assets, checks, jobs, schedules, sensors and resources.

Heavy libraries (torch, transformers, mlflow, evidently, bentoml) are imported inside the asset bodies:
every step of a multiprocess run re-imports this module.
"""

import dagster as dg
from dagster_aws.s3 import S3Resource

from llmft_assets.defs.data_assets import (
    base_model,
    cleaned_dataset,
    dataset_splits,
    raw_dataset,
    tokenized_dataset,
    validated_dataset,
)
from llmft_assets.defs.data_checks import DATA_CHECKS
from llmft_assets.defs.storage_resources import ArtifactIOManager, StorageResource

DATA_ASSETS = [raw_dataset, cleaned_dataset, validated_dataset, base_model, tokenized_dataset, dataset_splits]

data_job = dg.define_asset_job(
    "data_job",
    selection=dg.AssetSelection.assets(*DATA_ASSETS),
    description="Raw data to train/validation/test splits, plus the base model (CPU).",
)


def build_resources() -> dict[str, object]:
    s3 = S3Resource()  # endpoint and credentials from the standard AWS environment (AWS_ENDPOINT_URL, ...)
    storage = StorageResource(s3=s3)
    return {"s3": s3, "storage": storage, "io_manager": ArtifactIOManager(storage=storage)}


defs = dg.Definitions(
    assets=DATA_ASSETS,
    asset_checks=DATA_CHECKS,
    jobs=[data_job],
    resources=build_resources(),
)
