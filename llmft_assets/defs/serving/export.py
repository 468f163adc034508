"""`merged_model`: the champion adapter merged into its base model, a `save_pretrained` folder in storage that
`AutoModelForCausalLM`, vLLM and llama.cpp's converter load directly. Materialized on demand (not part of
`release_job`): `dagster asset materialize -m llmft_assets.definitions --select merged_model`."""

import json
from typing import Any

import dagster as dg
from pydantic import Field

from llmft_assets.defs.data.assets import OWNERS
from llmft_assets.defs.mlflow_resource import MlflowResource
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    asset_prefix,
)
from llmft_assets.defs.training.assets import BOM_FILE, _adapter_dir_of_version
from llmft_assets.modeling.merge import DEFAULT_MAX_SHARD_SIZE

EXPORT_GROUP = "export"


class MergedModelConfig(dg.Config):
    dtype: str | None = Field(
        default=None, description="float32, bfloat16 or float16; default: the base model's own dtype"
    )
    max_shard_size: str = Field(
        default=DEFAULT_MAX_SHARD_SIZE, description="safetensors shard size (save_pretrained)"
    )


def _champion_eval(storage: StorageResource, adapter_version: str, champion: Any) -> dict[str, Any]:
    """``models`` and ``gate`` of the newest eval report in storage that scored ``adapter_version`` (the
    one the gate promoted on); the adapter's metrics from its MLflow tags when storage has none."""
    from llmft_assets.evaluation.report import REPORT_JSON
    from llmft_assets.storage import fetch_artifact
    from llmft_assets.storage.publish import list_versions, read_manifest

    backend = storage.backend()
    prefix = asset_prefix(dg.AssetKey("eval_report"))
    scored = [read_manifest(backend, prefix, version) for version in list_versions(backend, prefix)]
    scored = [artifact for artifact in scored if artifact.metadata.get("adapter_version") == adapter_version]
    if not scored:
        return {"models": {"adapter": json.loads(champion.tags.get("llmft.eval", "{}"))}, "gate": None}
    newest = max(scored, key=lambda artifact: artifact.published_at)
    _, path = fetch_artifact(backend, prefix, storage.cache_dir(), version=newest.version)
    return json.loads((path / REPORT_JSON).read_text())


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
    from llmft_assets.evaluation.model_card import model_card_from_bom
    from llmft_assets.modeling.merge import merge_adapter, saved_dtype
    from llmft_assets.training.licenses import LicensePolicy, licenses_from_bom

    champion = mlflow.get_version_by_alias("champion")
    adapter_version = (champion.tags or {}).get("llmft.adapter_version") if champion else None
    if not adapter_version:
        raise dg.Failure(
            description="no champion yet: no adapter has passed the eval gate", allow_retries=False
        )
    adapter_dir = _adapter_dir_of_version(storage, adapter_version)
    bom: dict[str, Any] = json.loads((adapter_dir / BOM_FILE).read_text())
    trained_on = (bom.get("base_model") or {}).get("weights_sha256")
    current = (base_model.metadata.get("model_info") or {}).get("weights_sha256")
    if trained_on and current and trained_on != current:
        raise dg.Failure(
            description=f"champion {adapter_version} was trained on other base weights than base_model "
            f"{base_model.version}; materialize base_model with the champion's base first",
            allow_retries=False,
        )
    # An exported model is deployed elsewhere: the same licence policy as packaging (LLMFT_LICENSE_POLICY).
    problems = LicensePolicy.from_env().problems(licenses_from_bom(bom))
    if problems:
        raise dg.Failure(description="licence policy: " + "; ".join(problems), allow_retries=False)
    base_id = str((bom.get("base_model") or {}).get("model_id", "unknown"))
    dtype = config.dtype or saved_dtype(base_model.path)
    report = _champion_eval(storage, adapter_version, champion)
    card = model_card_from_bom(
        bom,
        title=f"llmft chat model {adapter_version} (merged, {dtype})",
        version=f"{adapter_version} (MLflow llmft-adapter v{champion.version})",
        eval_metrics=report.get("models"),
        gate=report.get("gate"),
        library_name="transformers",
    )
    staging = storage.staging_dir("merged_model")
    context.log.info(f"merging champion v{champion.version} ({adapter_version}) into {base_id} as {dtype}")
    result = merge_adapter(
        base_model.path,
        adapter_dir,
        staging,
        dtype=dtype,
        max_shard_size=config.max_shard_size,
        model_card=card,
    )
    info = {
        **result.to_dict(),
        "base_model_id": base_id,
        "adapter_version": adapter_version,
        "mlflow_model_version": str(champion.version),
    }
    return artifact_output(
        StagedArtifact(staging, metadata=info),
        metadata={
            **{key: value for key, value in info.items() if isinstance(value, str | int)},
            "weight_files": dg.MetadataValue.json(result.weight_files),
            "base_model_version": base_model.version,
            "model_card": dg.MetadataValue.md(card),
        },
    )
