"""The data half of the graph materialized end to end through Dagster, on local storage and on S3."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from llmft_assets.data.validation import ValidationLimits
from llmft_assets.definitions import DATA_ASSETS, build_resources, defs
from llmft_assets.defs.data.checks import DATA_CHECKS
from llmft_assets.storage import open_storage
from llmft_assets.storage.publish import latest_version, read_manifest

RUN_CONFIG_SMALL = {
    "ops": {
        "raw_dataset": {"config": {"source": "sample", "config": "all", "max_rows": 300}},
        "base_model": {"config": {"pretrain_steps": 0}},
        "tokenized_dataset": {"config": {"max_seq_len": 512}},
        "dataset_splits": {"config": {"validation_fraction": 0.1, "test_fraction": 0.1}},
    }
}


def _materialize(run_config: dict) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*DATA_ASSETS, *DATA_CHECKS],
        resources=build_resources(),
        run_config=run_config,
        instance=dg.DagsterInstance.ephemeral(),
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    raise AssertionError(f"{asset} was not materialized")


def test_definitions_load_and_validate() -> None:
    repo = defs.get_repository_def()
    keys = {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()}
    assert {
        "raw_dataset",
        "cleaned_dataset",
        "validated_dataset",
        "base_model",
        "tokenized_dataset",
        "dataset_splits",
    } <= keys


def test_dagster_definitions_validate_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    completed = subprocess.run(
        [str(bin_dir / "dagster"), "definitions", "validate", "-m", "llmft_assets.definitions"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        # Validation needs no instance; an inherited DAGSTER_HOME that does not exist yet must not matter.
        env={key: value for key, value in os.environ.items() if key != "DAGSTER_HOME"},
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "passed validation" in completed.stdout + completed.stderr


def _assert_chain(result: dg.ExecuteInProcessResult, root: str) -> None:
    assert result.success
    checks = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
    assert checks == dict.fromkeys(
        [
            "validated_schema",
            "validated_unique_ids",
            "validated_reject_rate",
            "tokenized_masks",
            "splits_disjoint",
        ],
        True,
    )
    raw, cleaned = _metadata(result, "raw_dataset"), _metadata(result, "cleaned_dataset")
    validated, splits = _metadata(result, "validated_dataset"), _metadata(result, "dataset_splits")
    assert raw["rows_in"] == 300
    for stage in (raw, cleaned, validated):
        assert stage["rows_in"] == stage["rows_out"] + stage["quarantined"] + stage["duplicates_dropped"]
    assert cleaned["rows_in"] == raw["rows_out"]
    assert validated["rows_in"] == cleaned["rows_out"]
    assert splits["train_rows"] + splits["validation_rows"] + splits["test_rows"] == validated["rows_out"]
    assert splits["train_rows"] > splits["test_rows"] > 0
    backend = open_storage(root)
    for asset in (
        "raw_dataset",
        "cleaned_dataset",
        "validated_dataset",
        "tokenized_dataset",
        "dataset_splits",
    ):
        version = latest_version(backend, f"assets/{asset}")
        assert version == _metadata(result, asset)["version"]
        assert str(_metadata(result, asset)["uri"]).startswith(root)


def test_data_chain_on_local_storage(llmft_home: Path) -> None:
    result = _materialize(RUN_CONFIG_SMALL)
    root = str(llmft_home / "storage")
    _assert_chain(result, root)
    manifest = read_manifest(open_storage(root), "assets/dataset_splits")
    assert {entry.path for entry in manifest.files} == {"train.parquet", "validation.parquet", "test.parquet"}
    # How the rows were prepared travels with the dataset description (a retraining pool follows it).
    tokenized = read_manifest(open_storage(root), "assets/tokenized_dataset").metadata
    assert tokenized["dataset"]["preparation"] == {
        "prefer_reannotated": True,
        "validation": asdict(ValidationLimits()),
    }
    # No pickles anywhere in storage: tables are Parquet, the model is safetensors + json.
    suffixes = {path.suffix for path in (llmft_home / "storage").rglob("*") if path.is_file()}
    assert ".pkl" not in suffixes and ".pickle" not in suffixes
    assert ".safetensors" in suffixes


def test_data_chain_on_s3(llmft_home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = f"s3://{s3_bucket}/llmft"
    monkeypatch.setenv("LLMFT_STORAGE", root)
    result = _materialize(RUN_CONFIG_SMALL)
    _assert_chain(result, root)
    assert not (llmft_home / "storage").exists()  # nothing went to the local default
    keys = open_storage(root).list("assets/dataset_splits/")
    assert any(key.endswith("/train.parquet") for key in keys)


def test_bad_input_is_quarantined_with_reasons(llmft_home: Path, tmp_path: Path) -> None:
    good = {
        "id": "good-1",
        "problem": "What is 2 + 3?",
        "reannotated_assistant_content": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is \\boxed{5}.",
        "source": "unit",
        "solution": "2 + 3 = \\boxed{5}",
        "verified": None,
        "quality_metrics": None,
    }
    lines = [
        json.dumps(good).encode(),
        b'{"id": "broken", "problem": ',  # malformed JSON
        b'{"id": "bad-utf8", "problem": "caf\xc3\x28"}',  # broken UTF-8
        json.dumps(
            {**good, "id": "no-answer-col", "reannotated_assistant_content": 42}
        ).encode(),  # wrong type
        json.dumps({**good, "id": "empty", "problem": "   "}).encode(),  # empty turn
        json.dumps(
            {**good, "id": "unclosed", "reannotated_assistant_content": "<think> never closed \\boxed{5}"}
        ).encode(),
        json.dumps({**good, "problem": "What is 2 + 4?"}).encode(),  # duplicate id, other content
        json.dumps(good).encode(),  # exact duplicate
        json.dumps(["not", "an", "object"]).encode(),
    ]
    source = tmp_path / "drop.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    run_config = {
        "ops": {
            **RUN_CONFIG_SMALL["ops"],
            "raw_dataset": {"config": {"source": str(source), "config": None}},
        }
    }
    result = dg.materialize(
        [*DATA_ASSETS[:3]],
        resources=build_resources(),
        run_config={"ops": {"raw_dataset": run_config["ops"]["raw_dataset"]}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    raw, cleaned, validated = (
        _metadata(result, name) for name in ("raw_dataset", "cleaned_dataset", "validated_dataset")
    )
    assert raw["rows_in"] == len(lines)
    assert raw["quarantined"] == 3  # malformed JSON, broken UTF-8, not an object
    assert cleaned["quarantined"] >= 1 and cleaned["duplicates_dropped"] == 1
    assert validated["rows_out"] == 1
    total_out = validated["rows_out"]
    total_quarantined = raw["quarantined"] + cleaned["quarantined"] + validated["quarantined"]
    assert raw["rows_in"] == total_out + total_quarantined + cleaned["duplicates_dropped"]
    storage = llmft_home / "storage" / "assets"
    reasons = []
    for asset in ("raw_dataset", "cleaned_dataset", "validated_dataset"):
        version = latest_version(open_storage(str(llmft_home / "storage")), f"assets/{asset}")
        reasons += (
            pq.read_table(storage / asset / version / "quarantine.parquet").column("reason").to_pylist()
        )
    assert len(reasons) == total_quarantined
    assert all(reason for reason in reasons)


def test_unreadable_source_is_one_clear_error(llmft_home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    result = dg.materialize(
        [DATA_ASSETS[0]],
        resources=build_resources(),
        run_config={"ops": {"raw_dataset": {"config": {"source": str(missing), "config": None}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    bad_config = dg.materialize(
        [DATA_ASSETS[0]],
        resources=build_resources(),
        run_config={"ops": {"raw_dataset": {"config": {"source": "sample", "max_rows": 0}}}},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not bad_config.success
    assert "max_rows" in bad_config.get_step_failure_events()[0].event_specific_data.error.message
    assert str(missing) in failure.message
    assert "no such file" in failure.message
