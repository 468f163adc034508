"""Licences from the source, the deployment policy over them, and the model card (pure)."""

from __future__ import annotations

import pytest

from llmft_assets.evaluation.gate import decide_gate
from llmft_assets.evaluation.model_card import model_card_from_bom, render_model_card
from llmft_assets.training.bom import bill_of_materials, portable_model_id, portable_uri
from llmft_assets.training.config import TrainingConfig
from llmft_assets.training.licenses import (
    License,
    LicensePolicy,
    base_model_license,
    dataset_license,
    licenses_from_bom,
)


def test_dataset_licence_comes_from_the_source_table_or_config_else_unknown() -> None:
    assert dataset_license("ServiceNow-AI/R1-Distill-SFT") == License(
        "cc-by-nc-sa-4.0", "per-source table (ServiceNow-AI/R1-Distill-SFT)"
    )
    assert dataset_license("sample") == License("apache-2.0", "per-source table (sample)")
    assert dataset_license("s3://bucket/data", "CC-BY-4.0") == License("cc-by-4.0", "config override")
    assert dataset_license("/data/mine.jsonl") == License(
        "unknown", "source '/data/mine.jsonl' is not in the per-source licence table"
    )


def test_base_model_licence_table() -> None:
    assert base_model_license("Qwen/Qwen2.5-7B-Instruct").license == "apache-2.0"
    assert base_model_license("Qwen/Qwen2.5-3B-Instruct").license == "qwen-research"
    assert base_model_license("Qwen/Qwen2.5-72B-Instruct").license == "qwen"
    assert base_model_license("llmft/tiny-qwen2-chat") == License(
        "apache-2.0", "per-model table (llmft/tiny-qwen2-chat)"
    )
    assert base_model_license("someone/model").license == "unknown"
    assert base_model_license("someone/model", "mit") == License("mit", "config override")


NC_DATA = {
    "dataset": License("cc-by-nc-sa-4.0", "per-source table (ServiceNow-AI/R1-Distill-SFT)"),
    "base model": License("apache-2.0", "per-model table (Qwen/Qwen2.5-7B-Instruct)"),
}


def test_commercial_policy_refuses_non_commercial_data_naming_the_licence_and_its_origin() -> None:
    policy = LicensePolicy.parse("commercial")
    assert policy.problems(NC_DATA) == [
        "the dataset licence cc-by-nc-sa-4.0 (from per-source table (ServiceNow-AI/R1-Distill-SFT)) "
        "does not allow a commercial deployment"
    ]
    commercial_ok = {**NC_DATA, "dataset": License("apache-2.0", "per-source table (sample)")}
    assert policy.problems(commercial_ok) == []
    unknown = {**NC_DATA, "dataset": License("unknown", "not recorded")}
    assert policy.problems(unknown) == [
        "the dataset licence unknown (from not recorded) does not allow a commercial deployment"
    ]


def test_allowed_list_policy_and_no_policy() -> None:
    policy = LicensePolicy.parse(" Apache-2.0, cc-by-nc-sa-4.0 ")
    assert policy.allowed == ("apache-2.0", "cc-by-nc-sa-4.0") and policy.problems(NC_DATA) == []
    narrow = LicensePolicy.parse("apache-2.0,mit")
    assert narrow.problems(NC_DATA) == [
        "the dataset licence cc-by-nc-sa-4.0 (from per-source table (ServiceNow-AI/R1-Distill-SFT)) "
        "is not in the allowed licences (apache-2.0, mit)"
    ]
    assert (
        LicensePolicy.parse(None).problems(NC_DATA) == []
        and LicensePolicy.parse("").describe() == "no restriction"
    )
    with pytest.raises(ValueError, match="LLMFT_LICENSE_POLICY"):
        LicensePolicy.parse(" , ")


def test_policy_is_read_from_the_environment_at_use_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFT_LICENSE_POLICY", "commercial")
    assert LicensePolicy.from_env().commercial
    monkeypatch.delenv("LLMFT_LICENSE_POLICY")
    assert LicensePolicy.from_env() == LicensePolicy()


def _bom(tmp_root: str) -> dict:
    return bill_of_materials(
        base_model_info={
            "model_id": "Qwen/Qwen2.5-7B-Instruct",
            "path": f"{tmp_root}/staging/base_model-x",
            "artifact_uri": f"{tmp_root}/storage/assets/base_model/abc123",
            "license": "apache-2.0",
            "license_source": "per-model table (Qwen/Qwen2.5-7B-Instruct)",
        },
        dataset_version="splits-v1",
        dataset={
            "source": "ServiceNow-AI/R1-Distill-SFT",
            "config": "v1",
            "license": "cc-by-nc-sa-4.0",
            "license_source": "per-source table (ServiceNow-AI/R1-Distill-SFT)",
        },
        config=TrainingConfig(lora_r=8),
        seed=3,
    )


def test_bom_keeps_no_absolute_path_and_records_both_licences(tmp_path) -> None:
    bom = _bom(str(tmp_path))
    assert "path" not in bom["base_model"]
    assert bom["base_model"]["artifact_uri"] == "assets/base_model/abc123"
    assert str(tmp_path) not in str(bom)
    assert licenses_from_bom(bom) == NC_DATA
    assert portable_uri("s3://bucket/prefix/assets/x/1") == "s3://bucket/prefix/assets/x/1"
    assert portable_model_id("/home/me/models/qwen") == "local:qwen"
    assert portable_model_id("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    local = bill_of_materials(
        base_model_info={"model_id": str(tmp_path / "mymodel")},
        dataset_version="v",
        dataset={"source": str(tmp_path / "data.jsonl")},
        config=TrainingConfig(),
        seed=1,
    )
    assert (
        local["base_model"]["model_id"] == "local:mymodel"
        and local["dataset"]["source"] == "local:data.jsonl"
    )
    assert local["dataset"]["license"] == "unknown" and str(tmp_path) not in str(local)
    assert (bom["dataset"]["asset"], local["dataset"]["asset"]) == ("dataset_splits", "dataset_splits")


def test_bom_and_model_card_name_the_dataset_asset_trained_on(tmp_path) -> None:
    sharded = bill_of_materials(
        base_model_info={"model_id": "base"},
        dataset_version="sh-1",
        dataset={"source": "shards"},
        config=TrainingConfig(),
        seed=1,
        dataset_asset="sharded_dataset_splits",
    )
    assert sharded["dataset"]["asset"] == "sharded_dataset_splits"
    card = model_card_from_bom(sharded, title="adapter")
    assert "- asset: `sharded_dataset_splits`\n- version (content hash of the splits): `sh-1`" in card
    unrecorded = model_card_from_bom({**sharded, "dataset": {"version": "old"}}, title="adapter")
    assert "- asset:" not in unrecorded  # a BOM made before the asset was recorded names none


def test_model_card_has_ids_licences_config_eval_and_gate(tmp_path) -> None:
    bom = _bom(str(tmp_path))
    base = {
        "accuracy": 0.1,
        "format_compliance": 0.05,
        "finished_rate": 0.1,
        "perplexity": 9.0,
        "mean_response_tokens": 300.0,
    }
    adapter = {
        "accuracy": 0.6,
        "format_compliance": 0.9,
        "finished_rate": 0.95,
        "perplexity": 3.5,
        "mean_response_tokens": 120.0,
    }
    base_rows = {**base, "correct_by_row": {f"r{i}": i < 1 for i in range(10)}}
    adapter_rows = {**adapter, "correct_by_row": {f"r{i}": i < 6 for i in range(10)}}
    gate = decide_gate(adapter_rows, base_rows, None).as_dict()
    card = model_card_from_bom(
        bom,
        title="llmft chat model v9",
        version="v9",
        eval_metrics={"base": base, "adapter": adapter},
        gate=gate,
    )
    assert card.startswith('---\nlicense: "cc-by-nc-sa-4.0"\nbase_model: "Qwen/Qwen2.5-7B-Instruct"\n')
    assert 'datasets: ["ServiceNow-AI/R1-Distill-SFT"]' in card
    assert "- id: `Qwen/Qwen2.5-7B-Instruct`" in card
    assert "- licence: apache-2.0 (from per-model table (Qwen/Qwen2.5-7B-Instruct))" in card
    assert "- asset: `dataset_splits`\n- version (content hash of the splits): `splits-v1`" in card
    assert "- licence: cc-by-nc-sa-4.0 (from per-source table (ServiceNow-AI/R1-Distill-SFT))" in card
    assert "| lora_r | 8 |" in card
    assert "| Verified accuracy (math-verify) | 10.0% | 60.0% |" in card
    assert "| Stopped at the end token | 10.0% | 95.0% |" in card
    assert "Decision: **promoted**" in card
    assert "| accuracy_significance | 0.03125 | <= 0.05 | pass |" in card
    assert "| champion_accuracy | n/a | - | skipped |" in card
    assert str(tmp_path) not in card
    pending = render_model_card(
        title="adapter",
        base_model_id=str(tmp_path / "local-base"),
        base_model_license="unknown",
        dataset={"source": "sample", "version": "v1", "license": "apache-2.0"},
        training_config={"seed": 1},
    )
    assert "Not evaluated yet" in pending and "`local:local-base`" in pending and str(tmp_path) not in pending


@pytest.mark.slow  # builds the tiny base model (about a minute on 2 busy cores)
def test_readme_config_examples_reach_the_bom_and_the_gate(llmft_home) -> None:
    """README: `raw_dataset: {config: {license: ...}}` and `eval_report: {config: {gate: {alpha: 0.01}}}`."""
    import json

    import dagster as dg

    from llmft_assets.definitions import build_resources
    from llmft_assets.defs.data.assets import raw_dataset
    from llmft_assets.defs.evaluation.assets import EvalReportConfig
    from llmft_assets.evaluation.gate import GateThresholds

    result = dg.materialize(
        [raw_dataset],
        resources=build_resources(),
        run_config={
            "ops": {"raw_dataset": {"config": {"source": "sample", "max_rows": 5, "license": "CC-BY-4.0"}}}
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    metadata = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    assert metadata["license"].value == "cc-by-4.0"
    manifest = json.loads(
        next((llmft_home / "storage" / "assets" / "raw_dataset").glob("*/_MANIFEST.json")).read_text()
    )
    assert manifest["metadata"]["dataset"] == {
        "source": "sample",
        "config": "all",
        "license": "cc-by-4.0",
        "license_source": "config override",
    }
    from llmft_assets.defs.data.assets import base_model

    built = dg.materialize(
        [base_model],
        resources=build_resources(),
        run_config={"ops": {"base_model": {"config": {"pretrain_steps": 0, "license": "MIT"}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    info = (
        built.get_asset_materialization_events()[0].event_specific_data.materialization.metadata["info"].value
    )
    assert (info["license"], info["license_source"]) == ("mit", "config override")
    config = EvalReportConfig(gate={"alpha": 0.01})
    assert GateThresholds(**config.gate.model_dump()) == GateThresholds(alpha=0.01)
    assert EvalReportConfig().gate.model_dump() == GateThresholds().model_dump()
