"""`model_bento`: the champion (adapter merged into the base) in the BentoML model store, and a bento built
from `bentos/`, exported into storage so a deployment pulls exactly these bytes.

The packaging step is `llmft_assets.serving.release.package_bento`; this asset wires config, storage
and MLflow to it.
"""

from pathlib import Path

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
)
from llmft_assets.manifests import AdapterManifest, EvalManifest
from llmft_assets.serving.release import NotReleasable, ReleaseCandidate, package_bento
from llmft_assets.training.registration import CHAMPION_ALIAS
from llmft_assets.training.run import ADAPTER_SUBDIR

SERVING_GROUP = "serving"
BENTOS_DIR = Path(__file__).resolve().parents[3] / "bentos"
BENTO_INFO_FILE = "bento.json"
BENTO_ARCHIVE = "llmft-chat.bento"

# Release after eval, declaratively: a new eval_report whose blocking checks (eval_gate, license_policy)
# passed is packaged, whichever run produced it (release_job does both in one run; an evaluation run
# from the UI then packages too). Only eval_report counts: a new adapter or base model is not packaged
# before it is evaluated (release_sensor starts that evaluation).
RELEASE_AFTER_EVAL = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
).allow(dg.AssetSelection.assets("eval_report"))


class ModelBentoConfig(dg.Config):
    merge_adapter: bool = Field(
        default=True, description="merge the LoRA into the base (else base + adapter)"
    )
    build_bento: bool = Field(default=True, description="also build a bento from bentos/bentofile.yaml")
    export_to_storage: bool = Field(default=True, description="export the bento archive into storage")
    require_champion: bool = Field(
        default=True, description="refuse to package a version the gate did not promote"
    )


def _release_candidate(
    eval_report: ArtifactHandle, lora_adapter: ArtifactHandle, base_model: ArtifactHandle
) -> ReleaseCandidate:
    evaluated, adapter = eval_report.manifest(EvalManifest), lora_adapter.manifest(AdapterManifest)
    return ReleaseCandidate(
        adapter_dir=lora_adapter.path / ADAPTER_SUBDIR,
        adapter_version=lora_adapter.version,
        adapter_uri=lora_adapter.uri,
        mlflow_run_id=adapter.mlflow_run_id or "",
        base_model_dir=base_model.path,
        base_model_uri=base_model.uri,
        eval_report_dir=eval_report.path,
        eval_report_uri=eval_report.uri,
        evaluated_adapter_version=evaluated.adapter_version,
        registered_version=str(evaluated.registered_version),
        eval_headline=evaluated.headline,
    )


@dg.asset(group_name=SERVING_GROUP, owners=OWNERS, kinds={"bentoml"}, automation_condition=RELEASE_AFTER_EVAL)
def model_bento(
    context: dg.AssetExecutionContext,
    config: ModelBentoConfig,
    eval_report: ArtifactHandle,
    lora_adapter: ArtifactHandle,
    base_model: ArtifactHandle,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.Output[StagedArtifact]:
    """The gated model in the BentoML store with its lineage as labels (MLflow run and version, storage URI,
    bill of materials, licence) and a bento built around it; `make serve` serves the latest one."""
    import json

    release = _release_candidate(eval_report, lora_adapter, base_model)
    champion = mlflow.get_version_by_alias(CHAMPION_ALIAS)
    staging = storage.staging_dir("model_bento")
    try:
        packaged = package_bento(
            release,
            champion_version=str(champion.version) if champion is not None else None,
            require_champion=config.require_champion,
            merge=config.merge_adapter,
            build=config.build_bento,
            bentos_dir=BENTOS_DIR,
            export_to=staging / BENTO_ARCHIVE if config.export_to_storage else None,
        )
    except NotReleasable as error:
        raise dg.Failure(description=str(error), allow_retries=False) from error
    context.log.info(f"BentoML model {packaged.model_tag}; bento {packaged.bento_tag or 'not built'}")
    (staging / BENTO_INFO_FILE).write_text(json.dumps(packaged.info(), indent=2))
    return artifact_output(
        StagedArtifact(staging, metadata=packaged.info()), metadata=metadata.bento_metadata(packaged, release)
    )
