"""`model_bento`: the champion (adapter merged into the base) in the BentoML model store, and a bento built
from `bentos/`, exported into storage so a deployment pulls exactly these bytes."""

import json
from pathlib import Path
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
)
from llmft_assets.defs.training.assets import ADAPTER_SUBDIR, BOM_FILE, eval_report

SERVING_GROUP = "serving"
BENTOS_DIR = Path(__file__).resolve().parents[3] / "bentos"
BENTO_MODEL_NAME = "llmft-chat"
BENTO_INFO_FILE = "bento.json"


class ModelBentoConfig(dg.Config):
    merge_adapter: bool = Field(
        default=True, description="merge the LoRA into the base (else base + adapter)"
    )
    build_bento: bool = Field(default=True, description="also build a bento from bentos/bentofile.yaml")
    export_to_storage: bool = Field(default=True, description="export the bento archive into storage")
    require_champion: bool = Field(
        default=True, description="refuse to package a version the gate did not promote"
    )


def _license_problems(lora_adapter: ArtifactHandle) -> tuple[Any, dict[str, Any], list[str]]:
    """The policy from LLMFT_LICENSE_POLICY, the adapter's licences, and why they may not be packaged."""
    from llmft_assets.training.licenses import LicensePolicy, licenses_from_bom

    bom = json.loads((lora_adapter.path / ADAPTER_SUBDIR / BOM_FILE).read_text())
    policy = LicensePolicy.from_env()
    licenses = licenses_from_bom(bom)
    return policy, licenses, policy.problems(licenses)


@dg.asset_check(
    asset=eval_report,
    name="license_policy",
    blocking=True,
    additional_ins={"lora_adapter": dg.AssetIn("lora_adapter")},
    description="The dataset and base-model licences allow the deployment LLMFT_LICENSE_POLICY describes "
    "(`commercial`, or a list of allowed licences); blocks packaging when they do not.",
)
def license_policy(lora_adapter: ArtifactHandle) -> dg.AssetCheckResult:
    policy, licenses, problems = _license_problems(lora_adapter)
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) if problems else f"allowed under {policy.describe()}",
        metadata={
            "policy": policy.describe(),
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none"),
            **{f"{what.replace(' ', '_')}_license": lic.license for what, lic in licenses.items()},
            **{f"{what.replace(' ', '_')}_license_source": lic.source for what, lic in licenses.items()},
        },
    )


@dg.asset(group_name=SERVING_GROUP, owners=OWNERS, kinds={"bentoml"})
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
    from llmft_assets.evaluation.model_card import model_card_from_bom
    from llmft_assets.evaluation.report import REPORT_JSON
    from llmft_assets.serving.packaging import build_bento, save_model_to_bentoml
    from llmft_assets.training.bom import portable_uri

    if eval_report.metadata.get("adapter_version") != lora_adapter.version:
        raise dg.Failure(
            description=(
                f"eval_report {eval_report.version} scored adapter {eval_report.metadata.get('adapter_version')}, "
                f"not the current lora_adapter {lora_adapter.version}: evaluate it first"
            ),
            allow_retries=False,
        )
    registered = str(eval_report.metadata.get("registered_version"))
    champion = mlflow.get_version_by_alias("champion")
    if config.require_champion and (champion is None or str(champion.version) != registered):
        raise dg.Failure(
            description=f"version {registered} did not pass the eval gate (champion: "
            f"{champion.version if champion else 'none'}); not packaging it",
            allow_retries=False,
        )
    # The same policy as the blocking license_policy check, for runs that select model_bento alone.
    _, _, problems = _license_problems(lora_adapter)
    if problems:
        raise dg.Failure(description="licence policy: " + "; ".join(problems), allow_retries=False)
    bom = json.loads((lora_adapter.path / ADAPTER_SUBDIR / BOM_FILE).read_text())
    report = json.loads((eval_report.path / REPORT_JSON).read_text())
    labels: dict[str, Any] = {
        "model_version": lora_adapter.version,
        "mlflow_run_id": lora_adapter.metadata.get("mlflow_run_id", ""),
        "mlflow_model_version": registered,
        # Storage-relative (or s3://) locations: no path of the build machine goes into the bento.
        "storage_uri": portable_uri(lora_adapter.uri),
        "base_model_uri": portable_uri(base_model.uri),
        "eval_report_uri": portable_uri(eval_report.uri),
        "license": bom["dataset"]["license"],
        "license_source": bom["dataset"]["license_source"],
        "base_model_license": bom["base_model"]["license"],
        "bill_of_materials": bom,
    }
    card = model_card_from_bom(
        bom,
        title=f"llmft chat model {lora_adapter.version}",
        version=f"{lora_adapter.version} (MLflow llmft-adapter v{registered})",
        eval_metrics=report.get("models"),
        gate=report.get("gate"),
    )
    model_tag = save_model_to_bentoml(
        base_model.path,
        lora_adapter.path / ADAPTER_SUBDIR,
        name=BENTO_MODEL_NAME,
        labels=labels,
        merge=config.merge_adapter,
        metadata={"eval": eval_report.metadata.get("headline", {})},
        model_card=card,
    )
    context.log.info(f"BentoML model {model_tag}")
    staging = storage.staging_dir("model_bento")
    info: dict[str, Any] = {
        "model_tag": model_tag,
        "labels": {k: v for k, v in labels.items() if k != "bill_of_materials"},
    }
    if config.build_bento:
        bento_tag = build_bento(
            BENTOS_DIR, model_tag=model_tag, labels={"model_version": lora_adapter.version}, model_card=card
        )
        info["bento_tag"] = bento_tag
        context.log.info(f"built bento {bento_tag}")
        if config.export_to_storage:
            import bentoml

            bentoml.export_bento(bento_tag, str(staging / "llmft-chat.bento"))
    (staging / BENTO_INFO_FILE).write_text(json.dumps(info, indent=2))
    metadata = {
        "model_tag": model_tag,
        "bento_tag": info.get("bento_tag", "not built"),
        "model_version": lora_adapter.version,
        "mlflow_model_version": registered,
        "serve": dg.MetadataValue.md(
            f"`make serve` (or `bentoml serve {info.get('bento_tag', 'bentos.service:LLMChatService')}`)"
        ),
    }
    return artifact_output(StagedArtifact(staging, metadata=info), metadata=metadata)
