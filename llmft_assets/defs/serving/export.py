"""`merged_model`: the champion adapter merged into its base model, a `save_pretrained` folder in storage that
`AutoModelForCausalLM`, vLLM and llama.cpp's converter load directly. Materialized on demand (not part of
`release_job`): `dagster asset materialize -m llmft_assets.definitions --select merged_model`."""

import dagster as dg
from pydantic import Field

from llmft_assets.defs import metadata
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.owners import OWNERS
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    asset_prefix,
)
from llmft_assets.manifests import BaseModelManifest
from llmft_assets.modeling.merge import DEFAULT_MAX_SHARD_SIZE
from llmft_assets.training.registration import CHAMPION_ALIAS
from llmft_assets.training.run import ADAPTER_SUBDIR

EXPORT_GROUP = "export"


class MergedModelConfig(dg.Config):
    dtype: str | None = Field(
        default=None, description="float32, bfloat16 or float16; default: the base model's own dtype"
    )
    max_shard_size: str = Field(
        default=DEFAULT_MAX_SHARD_SIZE, description="safetensors shard size (save_pretrained)"
    )


# After eval_report (and its blocking gate): an export in the same run follows that run's gate decision.
@dg.asset(
    group_name=EXPORT_GROUP,
    owners=OWNERS,
    kinds={"pytorch", "safetensors"},
    deps=[dg.AssetKey("eval_report")],
)
def merged_model(
    context: dg.AssetExecutionContext,
    config: MergedModelConfig,
    base_model: ArtifactHandle,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[StagedArtifact]:
    """The MLflow `champion` merged into the base in the base's dtype: safetensors shards, tokenizer with
    chat template, generation config and a model card (licences, data, eval results)."""
    from llmft_assets.modeling.export import NotExportable, champion_eval, export_champion

    staging = storage.staging_dir("merged_model")
    try:
        export = export_champion(
            mlflow.get_version_by_alias(CHAMPION_ALIAS),
            adapter_dir_of=lambda version: storage.artifact_dir("lora_adapter", version) / ADAPTER_SUBDIR,
            base_model_dir=base_model.path,
            base_model_version=base_model.version,
            base_model_info=base_model.manifest(BaseModelManifest).model_info,
            champion_eval=lambda version, champion: champion_eval(
                storage.backend(),
                asset_prefix(dg.AssetKey("eval_report")),
                storage.cache_dir(),
                version,
                champion,
            ),
            dtype=config.dtype,
            max_shard_size=config.max_shard_size,
            staging=staging,
            log=context.log.info,
        )
    except NotExportable as error:
        raise dg.Failure(description=str(error), allow_retries=False) from error
    return artifact_output(
        StagedArtifact(staging, metadata=export.info), metadata=metadata.merged_model_metadata(export)
    )
