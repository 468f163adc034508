"""The inputs retraining_dataset reads, published on local storage for its tests: current splits of
arithmetic problems (plus a few word problems), a candidate pool, a drift report over a three-day window and
served traffic of word problems in that window (the shift the selection follows)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from llmft_assets.data.cleaning import to_conversation
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import TOKENIZED_SCHEMA
from llmft_assets.storage import StorageBackend
from llmft_assets.storage.publish import publish_directory
from llmft_assets_tests.test_monitoring_asset import log_requests

WINDOW_END = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
DRIFT_DAY = "2025-03-10"  # the drift_report partition the published report stands for
UPSTREAM = [dg.SourceAsset(name) for name in ("drift_report", "dataset_splits", "tokenized_dataset")]
TRAFFIC_PROMPTS = 100
HELD_OUT_WORD = slice(4, 10)  # the word rows of the validation (4:6) and test (6:10) splits


def tokenized(rows: list[dict[str, Any]]) -> pa.Table:
    """Conversations with placeholder token columns (the asset copies them; it does not read them)."""
    fake = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "num_tokens": 3, "num_assistant_tokens": 2}
    return pa.Table.from_pylist(
        [{**row, **fake, "truncated": False} for row in rows], schema=TOKENIZED_SCHEMA
    )


def conversations(n: int, *, family: str, seed: int, schema: str = "v1") -> list[dict[str, Any]]:
    return [to_conversation(row) for row in generate_rows(n, schema=schema, seed=seed, family=family)]  # type: ignore[arg-type]


def publish(
    backend: StorageBackend,
    tmp_path: Path,
    asset: str,
    files: dict[str, pa.Table],
    partition: str | None = None,
    **metadata: Any,
) -> str:
    folder = tmp_path / asset
    folder.mkdir()
    for name, table in files.items():
        pq.write_table(table, folder / name, row_group_size=50)
    prefix = f"assets/{asset}" if partition is None else f"assets/{asset}/{partition}"
    return publish_directory(backend, prefix, folder, metadata=metadata).version


def instance_with_drift_report() -> dg.DagsterInstance:
    """An ephemeral instance that recorded drift_report[DRIFT_DAY] at its published version (retraining_dataset
    follows the newest day Dagster recorded a report for)."""
    from llmft_assets import settings
    from llmft_assets.storage import open_storage
    from llmft_assets.storage.publish import latest_version

    version = latest_version(open_storage(settings.storage_root()), f"assets/drift_report/{DRIFT_DAY}")
    assert version is not None, "publish_retraining_inputs first"
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        dg.AssetMaterialization("drift_report", partition=DRIFT_DAY, metadata={"version": version})
    )
    return instance


def publish_retraining_inputs(
    backend: StorageBackend,
    tmp_path: Path,
    *,
    arithmetic: list[dict[str, Any]],
    word: list[dict[str, Any]],
    pool: pa.Table,
    **pool_metadata: Any,
) -> str:
    """dataset_splits (train: arithmetic[:200] + word[:4]; validation and test: the next arithmetic rows
    and word[HELD_OUT_WORD]), tokenized_dataset (`pool`, with `pool_metadata`), a drift_report over
    [WINDOW_END - 3 days, WINDOW_END) (partition DRIFT_DAY; its version is returned) and TRAFFIC_PROMPTS
    word-problem requests inside that window."""
    splits = {
        "train.parquet": tokenized(arithmetic[:200] + word[:4]),
        "validation.parquet": tokenized(arithmetic[200:210] + word[4:6]),
        "test.parquet": tokenized(arithmetic[210:230] + word[6:10]),
    }
    publish(backend, tmp_path, "dataset_splits", splits)
    publish(backend, tmp_path, "tokenized_dataset", {"data.parquet": pool}, **pool_metadata)
    window = {"start": (WINDOW_END - timedelta(days=3)).isoformat(), "end": WINDOW_END.isoformat()}
    report = publish(
        backend,
        tmp_path,
        "drift_report",
        {"summary.json": tokenized([])},
        DRIFT_DAY,
        summary={"window": window},
    )
    traffic = generate_rows(TRAFFIC_PROMPTS, schema="v0", seed=9, family="word")
    log_requests(
        backend,
        [(row["problem"], row["solution"]) for row in traffic],
        start=WINDOW_END - timedelta(days=2),
        spacing=timedelta(minutes=20),
        batch="shifted",
    )
    return report
