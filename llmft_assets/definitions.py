"""The one Dagster code location of llmft: every asset, check, job, schedule and sensor found under
`llmft_assets/defs/<domain>/` (data, training, evaluation, serving, monitoring), plus the resources.

Heavy libraries (torch, transformers, mlflow, evidently, bentoml) are imported inside the asset bodies:
every step of a multiprocess run re-imports this module.
"""

import warnings

import dagster as dg
from dagster_aws.s3 import S3Resource

import llmft_assets.defs
from llmft_assets.defs.data import assets as data_assets
from llmft_assets.defs.data import shards as shard_assets
from llmft_assets.defs.evaluation.assets import eval_report
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.serving.assets import model_bento
from llmft_assets.defs.serving.export import merged_model
from llmft_assets.defs.storage_resources import ArtifactIOManager, StorageResource
from llmft_assets.defs.training.assets import lora_adapter

# Named groups of assets for tests and tools that build a smaller Definitions around some of them.
DATA_ASSETS = [
    data_assets.raw_dataset,
    data_assets.cleaned_dataset,
    data_assets.validated_dataset,
    data_assets.base_model,
    data_assets.tokenized_dataset,
    data_assets.dataset_splits,
]
# The data chain partitioned by source shard, its assembly, and the base model it tokenizes with.
SHARDED_DATA_ASSETS = [
    shard_assets.shard_raw_dataset,
    shard_assets.shard_cleaned_dataset,
    shard_assets.shard_validated_dataset,
    shard_assets.shard_tokenized_dataset,
    shard_assets.sharded_dataset_splits,
    data_assets.base_model,
]
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


def build_defs() -> dg.Definitions:
    """Every definition in the `llmft_assets.defs` package (each module's assets, checks, jobs, schedules
    and sensors, found by type; an object imported into several modules counts once), with the resources.

    Not `dg.load_from_defs_folder`: that needs the project's pyproject.toml at run time, which the
    installed package in the container image does not have."""
    with warnings.catch_warnings():  # the package loader is marked preview; it is the documented one
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.load_definitions_from_package_module(llmft_assets.defs, resources=build_resources())


defs = build_defs()
