"""retraining_dataset materialized through Dagster on local storage: the drift report's window of the
request log, the pool, the current splits -> a new dataset version that over-represents the traffic's
kind, never holds a held-out problem, and carries its selection statistics as metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from llmft_assets.definitions import build_resources
from llmft_assets.defs.evaluation.assets import _traffic_slice, _trained_on
from llmft_assets.defs.monitoring.retraining import retraining_dataset
from llmft_assets.manifests import AdapterManifest
from llmft_assets.monitoring.retraining_step import NO_TRAFFIC, SELECTION_FILE, TRAFFIC_SLICE_FILE
from llmft_assets.storage import LocalBackend, open_storage
from llmft_assets.training.training_data import RETRAINING_DATASET, training_data_of
from llmft_assets_tests.retraining_inputs import (
    HELD_OUT_WORD,
    TRAFFIC_PROMPTS,
    UPSTREAM,
    conversations,
    instance_with_drift_report,
    publish_retraining_inputs,
    tokenized,
)


@pytest.fixture
def storage(llmft_home: Path, tmp_path: Path) -> dict[str, Any]:
    backend = open_storage(str(llmft_home / "storage"))
    assert isinstance(backend, LocalBackend)
    arithmetic = conversations(400, family="arithmetic", seed=1)
    word = conversations(80, family="word", seed=1)
    # The pool: everything ingested (the splits' rows too) plus word problems the splits never saw.
    publish_retraining_inputs(
        backend, tmp_path, arithmetic=arithmetic, word=word, pool=tokenized(arithmetic + word)
    )
    return {
        "root": str(backend.local_path("")),
        "word": {row["messages"][0]["content"] for row in word},
        "held_out": {row["id"] for row in word[HELD_OUT_WORD] + arithmetic[200:230]},
    }


def _materialize(
    config: dict[str, Any] | None = None, instance: dg.DagsterInstance | None = None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*UPSTREAM, retraining_dataset],
        selection=dg.AssetSelection.assets(retraining_dataset),
        resources=build_resources(),
        run_config={"ops": {"retraining_dataset": {"config": config or {}}}},
        instance=instance or instance_with_drift_report(),
    )


def _gate_traffic_slice(version: str) -> tuple[str, Path | None] | None:
    """What eval_report scores an adapter trained on this retraining_dataset version on, besides the test."""
    adapter = AdapterManifest(training_data=RETRAINING_DATASET, dataset_version=version)
    return _traffic_slice(_trained_on(build_resources()["storage"], adapter))  # type: ignore[arg-type]


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node("retraining_dataset")
    return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}


def test_retraining_dataset_follows_the_traffic_and_publishes_its_statistics(storage: dict[str, Any]) -> None:
    config = {"target_rows": 60, "mix_ratio": 0.5, "traffic_slice_fraction": 0.25, "min_similarity": 0.2}
    result = _materialize(config)
    assert result.success
    metadata = _metadata(result)
    assert "carried_over" not in metadata
    assert metadata["traffic_prompts"] == TRAFFIC_PROMPTS
    assert metadata["pool_rows"] == 480
    assert metadata["dropped_in_held_out_splits"] >= 1  # the held-out word problems are in the pool
    assert "| cluster | traffic share |" in metadata["rows_per_traffic_cluster"]
    assert "| similarity | pool rows | selected |" in metadata["similarity_histogram"]
    # The published version, read from storage (the staging folder is gone).
    folder = Path(storage["root"]) / "assets" / "retraining_dataset" / str(metadata["version"])
    train = pq.read_table(folder / "train.parquet")
    traffic_slice = pq.read_table(folder / TRAFFIC_SLICE_FILE)
    word_in_train = sum(m[0]["content"] in storage["word"] for m in train.column("messages").to_pylist())
    assert word_in_train / train.num_rows >= 0.4  # from 4 of 204 rows (2%)
    assert (
        metadata["train_rows"] == train.num_rows
        and metadata["traffic_slice_rows"] == traffic_slice.num_rows > 0
    )
    chosen = set(train.column("id").to_pylist()) | set(traffic_slice.column("id").to_pylist())
    assert chosen.isdisjoint(storage["held_out"])
    assert set(train.column("id").to_pylist()).isdisjoint(traffic_slice.column("id").to_pylist())
    assert pq.read_table(folder / "test.parquet").num_rows == 24
    stats = json.loads((folder / SELECTION_FILE).read_text())
    assert stats["selected_rows"] == metadata["selected_rows"]
    assert _gate_traffic_slice(str(metadata["version"])) == (
        str(metadata["version"]),
        folder / TRAFFIC_SLICE_FILE,
    )


def test_a_window_without_traffic_carries_the_current_splits_over_unchanged(
    storage: dict[str, Any], llmft_home: Path
) -> None:
    """A fresh install (no served traffic): nothing to select for, so the asset publishes the current
    splits byte for byte, with no traffic slice, and says so; the pool is not read."""
    backend = open_storage(str(llmft_home / "storage"))
    for key in list(backend.iter_keys("request_logs/")):
        backend.delete(key)
    instance = instance_with_drift_report()
    result = _materialize({"target_rows": 60}, instance)
    assert result.success
    metadata = _metadata(result)
    assert (
        metadata["carried_over"]
        == NO_TRAFFIC
        == ("no served traffic in the window: current splits carried over unchanged")
    )
    assert (metadata["traffic_prompts"], metadata["selected_rows"], metadata["current_train_rows_kept"]) == (
        0,
        0,
        204,
    )
    rows = {name: metadata[f"{name}_rows"] for name in ("train", "validation", "test", "traffic_slice")}
    assert rows == {"train": 204, "validation": 12, "test": 24, "traffic_slice": 0}
    assert "pool_rows" not in metadata and "rows_per_traffic_cluster" not in metadata
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any(f"retraining_dataset: {NO_TRAFFIC} (0 requests logged in" in m for m in messages)
    root = Path(storage["root"]) / "assets"
    folder = root / "retraining_dataset" / str(metadata["version"])
    splits = root / "dataset_splits" / str(metadata["dataset_splits_version"])
    for name in ("train", "validation", "test"):  # rows in = rows out, byte for byte
        assert (folder / f"{name}.parquet").read_bytes() == (splits / f"{name}.parquet").read_bytes()
    assert not (folder / TRAFFIC_SLICE_FILE).exists()
    data = training_data_of(RETRAINING_DATASET, str(metadata["version"]), folder, {})
    assert (data.carried_over, data.traffic_slice) == (NO_TRAFFIC, None)
    assert _gate_traffic_slice(str(metadata["version"])) is None  # the gate keeps the standard criteria only
    assert json.loads((folder / SELECTION_FILE).read_text()) == {
        "carried_over": NO_TRAFFIC,
        "traffic_prompts": 0,
        "selected_rows": 0,
    }


def test_definitions_carry_the_retraining_dataset_job_and_its_lineage_to_the_adapter() -> None:
    from llmft_assets.definitions import defs

    repository = defs.get_repository_def()
    job = repository.get_job("retraining_dataset_job")
    assert job.asset_layer.executable_asset_keys == {dg.AssetKey("retraining_dataset")}
    assert not repository.has_sensor_def("drift_retraining_dataset_sensor")  # drift_retrain_sensor starts it
    sensor = repository.get_sensor_def("drift_retrain_sensor")
    assert {target.job_name for target in sensor.targets} == {"retraining_dataset_job", "train_job"}
    # A drift retraining's adapter trains on it (lora_adapter's training_data), drawn as lineage.
    assert (
        dg.AssetKey("retraining_dataset")
        in repository.asset_graph.get(dg.AssetKey("lora_adapter")).parent_keys
    )
    upstream = repository.asset_graph.get(dg.AssetKey("retraining_dataset")).parent_keys
    assert upstream == {dg.AssetKey(name) for name in ("drift_report", "dataset_splits", "tokenized_dataset")}
