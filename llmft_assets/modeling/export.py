"""The champion export step: the promoted adapter merged into its base model as a `save_pretrained` folder
(safetensors shards, tokenizer with chat template, generation config, model card). No Dagster import."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft_assets.manifests import EvalManifest
from llmft_assets.storage import StorageBackend
from llmft_assets.training.run import BOM_FILE


class NotExportable(ValueError):
    """No champion, other base weights, or the licence policy forbids it (no retry can fix it)."""


@dataclass(frozen=True)
class ChampionExport:
    info: dict[str, Any]
    weight_files: list[str]
    model_card: str
    base_model_version: str


def champion_eval(
    backend: StorageBackend, eval_prefix: str, cache_dir: Path, adapter_version: str, champion: Any
) -> dict[str, Any]:
    """``models`` and ``gate`` of the newest eval report in storage that scored ``adapter_version`` (the
    one the gate promoted on); the adapter's metrics from its MLflow tags when storage has none."""
    from llmft_assets.evaluation.report import REPORT_JSON
    from llmft_assets.storage import fetch_artifact
    from llmft_assets.storage.publish import list_versions, read_manifest

    scored = [read_manifest(backend, eval_prefix, version) for version in list_versions(backend, eval_prefix)]
    scored = [
        item for item in scored if EvalManifest.from_dict(item.metadata).adapter_version == adapter_version
    ]
    if not scored:
        return {"models": {"adapter": json.loads(champion.tags.get("llmft.eval", "{}"))}, "gate": None}
    newest = max(scored, key=lambda artifact: artifact.published_at)
    _, path = fetch_artifact(backend, eval_prefix, cache_dir, version=newest.version)
    return json.loads((path / REPORT_JSON).read_text())


def export_champion(
    champion: Any,
    *,
    adapter_dir_of: Callable[[str], Path],
    base_model_dir: Path,
    base_model_version: str,
    base_model_info: dict[str, Any],
    champion_eval: Callable[[str, Any], dict[str, Any]],
    dtype: str | None,
    max_shard_size: str,
    staging: Path,
    log: Callable[[str], None],
) -> ChampionExport:
    """Merge the MLflow `champion` (a registry version; None: refused) into the base in the base's dtype."""
    from llmft_assets.evaluation.model_card import model_card_from_bom
    from llmft_assets.modeling.merge import merge_adapter, saved_dtype
    from llmft_assets.training.licenses import LicensePolicy, licenses_from_bom

    adapter_version = (champion.tags or {}).get("llmft.adapter_version") if champion else None
    if not adapter_version:
        raise NotExportable("no champion yet: no adapter has passed the eval gate")
    adapter_dir = adapter_dir_of(adapter_version)
    bom: dict[str, Any] = json.loads((adapter_dir / BOM_FILE).read_text())
    trained_on = (bom.get("base_model") or {}).get("weights_sha256")
    current = base_model_info.get("weights_sha256")
    if trained_on and current and trained_on != current:
        raise NotExportable(
            f"champion {adapter_version} was trained on other base weights than base_model "
            f"{base_model_version}; materialize base_model with the champion's base first"
        )
    # An exported model is deployed elsewhere: the same licence policy as packaging (LLMFT_LICENSE_POLICY).
    problems = LicensePolicy.from_env().problems(licenses_from_bom(bom))
    if problems:
        raise NotExportable("licence policy: " + "; ".join(problems))
    base_id = str((bom.get("base_model") or {}).get("model_id", "unknown"))
    dtype = dtype or saved_dtype(base_model_dir)
    report = champion_eval(adapter_version, champion)
    card = model_card_from_bom(
        bom,
        title=f"llmft chat model {adapter_version} (merged, {dtype})",
        version=f"{adapter_version} (MLflow llmft-adapter v{champion.version})",
        eval_metrics=report.get("models"),
        gate=report.get("gate"),
        library_name="transformers",
    )
    log(f"merging champion v{champion.version} ({adapter_version}) into {base_id} as {dtype}")
    result = merge_adapter(
        base_model_dir, adapter_dir, staging, dtype=dtype, max_shard_size=max_shard_size, model_card=card
    )
    info = {
        **result.to_dict(),
        "base_model_id": base_id,
        "adapter_version": adapter_version,
        "mlflow_model_version": str(champion.version),
    }
    return ChampionExport(
        info=info,
        weight_files=list(result.weight_files),
        model_card=card,
        base_model_version=base_model_version,
    )
