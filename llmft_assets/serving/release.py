"""The release step: the gated adapter packaged into the BentoML store, a bento built around it, the archive
exported. Build-time code (Dagster's `model_bento` calls it); the model server never imports this module,
so its evaluation/training imports stay out of the bento."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft_assets.serving.packaging import (
    BILL_OF_MATERIALS_FILE,
    DEFAULT_MODEL_NAME,
    build_bento,
    save_model_to_bentoml,
)


class NotReleasable(ValueError):
    """The version may not be packaged (not the evaluated adapter, not the champion, licence policy)."""


@dataclass(frozen=True)
class ReleaseCandidate:
    """The evaluated adapter and where its artifacts live (storage-relative URIs go into the labels)."""

    adapter_dir: Path
    adapter_version: str
    adapter_uri: str
    mlflow_run_id: str
    base_model_dir: Path
    base_model_uri: str
    eval_report_dir: Path
    eval_report_uri: str
    evaluated_adapter_version: str | None
    registered_version: str
    eval_headline: Mapping[str, Any]


@dataclass(frozen=True)
class PackagedBento:
    model_tag: str
    bento_tag: str | None
    labels: dict[str, Any]

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "model_tag": self.model_tag,
            "labels": {k: v for k, v in self.labels.items() if k != "bill_of_materials"},
        }
        if self.bento_tag:
            info["bento_tag"] = self.bento_tag
        return info


def license_problems(adapter_dir: Path) -> tuple[Any, dict[str, Any], list[str]]:
    """The policy from LLMFT_LICENSE_POLICY, the adapter's licences, and why they may not be packaged."""
    from llmft_assets.training.licenses import LicensePolicy, licenses_from_bom

    bom = json.loads((adapter_dir / BILL_OF_MATERIALS_FILE).read_text())
    policy = LicensePolicy.from_env()
    licenses = licenses_from_bom(bom)
    return policy, licenses, policy.problems(licenses)


def package_bento(
    release: ReleaseCandidate,
    *,
    champion_version: str | None,
    require_champion: bool,
    merge: bool,
    build: bool,
    bentos_dir: Path,
    export_to: Path | None,
    model_name: str = DEFAULT_MODEL_NAME,
) -> PackagedBento:
    """The gated model in the BentoML store with its lineage as labels (MLflow run and version, storage
    URI, bill of materials, licence), a bento built around it, and the bento archive exported to
    `export_to`. Raises NotReleasable when the version may not be packaged."""
    from llmft_assets.evaluation.model_card import model_card_from_bom
    from llmft_assets.evaluation.report import REPORT_JSON
    from llmft_assets.training.bom import portable_uri

    if release.evaluated_adapter_version != release.adapter_version:
        raise NotReleasable(
            f"eval_report scored adapter {release.evaluated_adapter_version}, not the current lora_adapter "
            f"{release.adapter_version}: evaluate it first"
        )
    if require_champion and champion_version != release.registered_version:
        raise NotReleasable(
            f"version {release.registered_version} did not pass the eval gate (champion: "
            f"{champion_version or 'none'}); not packaging it"
        )
    # The same policy as the blocking license_policy check, for runs that select model_bento alone.
    _, _, problems = license_problems(release.adapter_dir)
    if problems:
        raise NotReleasable("licence policy: " + "; ".join(problems))
    bom = json.loads((release.adapter_dir / BILL_OF_MATERIALS_FILE).read_text())
    report = json.loads((release.eval_report_dir / REPORT_JSON).read_text())
    labels: dict[str, Any] = {
        "model_version": release.adapter_version,
        "mlflow_run_id": release.mlflow_run_id,
        "mlflow_model_version": release.registered_version,
        # Storage-relative (or s3://) locations: no path of the build machine goes into the bento.
        "storage_uri": portable_uri(release.adapter_uri),
        "base_model_uri": portable_uri(release.base_model_uri),
        "eval_report_uri": portable_uri(release.eval_report_uri),
        "license": bom["dataset"]["license"],
        "license_source": bom["dataset"]["license_source"],
        "base_model_license": bom["base_model"]["license"],
        "bill_of_materials": bom,
    }
    card = model_card_from_bom(
        bom,
        title=f"llmft chat model {release.adapter_version}",
        version=f"{release.adapter_version} (MLflow llmft-adapter v{release.registered_version})",
        eval_metrics=report.get("models"),
        gate=report.get("gate"),
    )
    model_tag = save_model_to_bentoml(
        release.base_model_dir,
        release.adapter_dir,
        name=model_name,
        labels=labels,
        merge=merge,
        metadata={"eval": dict(release.eval_headline)},
        model_card=card,
    )
    bento_tag = None
    if build:
        bento_tag = build_bento(
            bentos_dir,
            model_tag=model_tag,
            labels={"model_version": release.adapter_version},
            model_card=card,
        )
        if export_to is not None:
            import bentoml

            bentoml.export_bento(bento_tag, str(export_to))
    return PackagedBento(model_tag=model_tag, bento_tag=bento_tag, labels=labels)
