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
    backend: StorageBackend, tmp_path: Path, asset: str, files: dict[str, pa.Table], **metadata: Any
) -> str:
    folder = tmp_path / asset
    folder.mkdir()
    for name, table in files.items():
        pq.write_table(table, folder / name, row_group_size=50)
    return publish_directory(backend, f"assets/{asset}", folder, metadata=metadata).version


def publish_retraining_inputs(
    backend: StorageBackend,
    tmp_path: Path,
    *,
    arithmetic: list[dict[str, Any]],
    word: list[dict[str, Any]],
    pool: pa.Table,
    **pool_metadata: Any,
) -> None:
    """dataset_splits (train: arithmetic[:200] + word[:4]; validation and test: the next arithmetic rows
    and word[HELD_OUT_WORD]), tokenized_dataset (`pool`, with `pool_metadata`), a drift_report over
    [WINDOW_END - 3 days, WINDOW_END) and TRAFFIC_PROMPTS word-problem requests inside that window."""
    splits = {
        "train.parquet": tokenized(arithmetic[:200] + word[:4]),
        "validation.parquet": tokenized(arithmetic[200:210] + word[4:6]),
        "test.parquet": tokenized(arithmetic[210:230] + word[6:10]),
    }
    publish(backend, tmp_path, "dataset_splits", splits)
    publish(backend, tmp_path, "tokenized_dataset", {"data.parquet": pool}, **pool_metadata)
    window = {"start": (WINDOW_END - timedelta(days=3)).isoformat(), "end": WINDOW_END.isoformat()}
    publish(backend, tmp_path, "drift_report", {"summary.json": tokenized([])}, summary={"window": window})
    traffic = generate_rows(TRAFFIC_PROMPTS, schema="v0", seed=9, family="word")
    log_requests(
        backend,
        [(row["problem"], row["solution"]) for row in traffic],
        start=WINDOW_END - timedelta(days=2),
        spacing=timedelta(minutes=20),
        batch="shifted",
    )
