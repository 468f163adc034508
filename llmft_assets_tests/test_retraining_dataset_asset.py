"""retraining_dataset materialized through Dagster on local storage: the drift report's window of the
request log, the pool, the current splits -> a new dataset version that over-represents the traffic's
kind, never holds a held-out problem, and carries its selection statistics as metadata."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmft_assets.data.cleaning import to_conversation
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import TOKENIZED_SCHEMA
from llmft_assets.definitions import build_resources
from llmft_assets.defs.monitoring.retraining import retraining_dataset
from llmft_assets.monitoring.retraining_step import SELECTION_FILE, TRAFFIC_SLICE_FILE
from llmft_assets.storage import LocalBackend, StorageBackend, open_storage
from llmft_assets.storage.publish import publish_directory
from llmft_assets_tests.test_monitoring_asset import log_requests

WINDOW_END = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
UPSTREAM = [dg.SourceAsset(name) for name in ("drift_report", "dataset_splits", "tokenized_dataset")]


def tokenized(rows: list[dict[str, Any]]) -> pa.Table:
    """Conversations with placeholder token columns (the asset copies them; it does not read them)."""
    fake = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "num_tokens": 3, "num_assistant_tokens": 2}
    return pa.Table.from_pylist(
        [{**row, **fake, "truncated": False} for row in rows], schema=TOKENIZED_SCHEMA
    )


def conversations(n: int, *, family: str, seed: int, schema: str = "v1") -> list[dict[str, Any]]:
    return [to_conversation(row) for row in generate_rows(n, schema=schema, seed=seed, family=family)]  # type: ignore[arg-type]


def publish(
    backend: StorageBackend, tmp_path: Path, asset: str, files: dict[str, pa.Table], **metadata: Any
) -> str:
    folder = tmp_path / asset
    folder.mkdir()
    for name, table in files.items():
        pq.write_table(table, folder / name, row_group_size=50)
    return publish_directory(backend, f"assets/{asset}", folder, metadata=metadata).version


@pytest.fixture
def storage(llmft_home: Path, tmp_path: Path) -> dict[str, Any]:
    backend = open_storage(str(llmft_home / "storage"))
    assert isinstance(backend, LocalBackend)
    arithmetic = conversations(400, family="arithmetic", seed=1)
    word = conversations(80, family="word", seed=1)
    splits = {
        "train.parquet": tokenized(arithmetic[:200] + word[:4]),
        "validation.parquet": tokenized(arithmetic[200:210] + word[4:6]),
        "test.parquet": tokenized(arithmetic[210:230] + word[6:10]),
    }
    publish(backend, tmp_path, "dataset_splits", splits)
    # The pool: everything ingested (the splits' rows too) plus word problems the splits never saw.
    publish(backend, tmp_path, "tokenized_dataset", {"data.parquet": tokenized(arithmetic + word)})
    window = {"start": (WINDOW_END - timedelta(days=3)).isoformat(), "end": WINDOW_END.isoformat()}
    publish(
        backend, tmp_path, "drift_report", {"summary.json": pa.table({"x": [1]})}, summary={"window": window}
    )
    traffic = generate_rows(100, schema="v0", seed=9, family="word")
    log_requests(
        backend,
        [(row["problem"], row["solution"]) for row in traffic],
        start=WINDOW_END - timedelta(days=2),
        spacing=timedelta(minutes=20),
        batch="shifted",
    )
    return {
        "root": str(backend.local_path("")),
        "word": {row["messages"][0]["content"] for row in word},
        "held_out": {row["id"] for row in word[4:10] + arithmetic[200:230]},
    }


def test_retraining_dataset_follows_the_traffic_and_publishes_its_statistics(storage: dict[str, Any]) -> None:
    config = {"target_rows": 60, "mix_ratio": 0.5, "traffic_slice_fraction": 0.25, "min_similarity": 0.2}
    result = dg.materialize(
        [*UPSTREAM, retraining_dataset],
        selection=dg.AssetSelection.assets(retraining_dataset),
        resources=build_resources(),
        run_config={"ops": {"retraining_dataset": {"config": config}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("retraining_dataset")
    metadata = {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    assert metadata["traffic_prompts"] == 100
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


def test_a_window_without_traffic_fails_with_a_clear_reason(
    storage: dict[str, Any], llmft_home: Path
) -> None:
    backend = open_storage(str(llmft_home / "storage"))
    for key in list(backend.iter_keys("request_logs/")):
        backend.delete(key)
    result = dg.materialize(
        [*UPSTREAM, retraining_dataset],
        selection=dg.AssetSelection.assets(retraining_dataset),
        resources=build_resources(),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert "retraining_dataset: no traffic prompt to select for" in str(
        failure.step_failure_data.error.message
    )


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
