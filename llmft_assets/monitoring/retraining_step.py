"""The retraining dataset step: the pool rows nearest to what users asked in a drift report's window,
mixed with the current training rows, held-out problems never taken, plus a traffic-shaped evaluation
slice. The selection itself is `retrain_selection`; this step reads, writes and counts. No Dagster import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmft_assets.data.schema import TOKENIZED_SCHEMA
from llmft_assets.data.stage import split_path
from llmft_assets.manifests import RetrainingManifest
from llmft_assets.monitoring.retrain_selection import SelectionSettings
from llmft_assets.storage import StorageBackend
from llmft_assets.storage.tables import iter_parquet_batches
from llmft_assets.training.training_data import TRAFFIC_SLICE_FILE

SELECTION_FILE = "selection.json"


@dataclass(frozen=True)
class RetrainingInputs:
    drift_report_version: str
    drift_summary: dict[str, Any]
    splits_dir: Path
    splits_version: str
    pool_file: Path
    pool_version: str


@dataclass
class RetrainingResult:
    manifest: RetrainingManifest
    stats: Any  # retrain_selection.SelectionStats
    traffic_prompts: int
    current_train_rows_kept: int


def window_of(drift_report_version: str, summary: dict[str, Any]) -> tuple[float, datetime]:
    """(window_days, end) of the request-log window the drift report judged; ValueError if it has none."""
    window = summary.get("window") or {}
    try:
        start, end = datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"drift_report {drift_report_version} records no request-log window: {error!r}"
        ) from error
    return (end - start).total_seconds() / 86400, end


def _write(table: pa.Table, path: Path) -> int:
    pq.write_table(table.select(TOKENIZED_SCHEMA.names).cast(TOKENIZED_SCHEMA), path)
    return table.num_rows


def build_retraining_dataset(
    inputs: RetrainingInputs,
    backend: StorageBackend,
    *,
    settings: SelectionSettings,
    model_version: str | None,
    batch_rows: int,
    staging: Path,
    log: Callable[[str], None],
) -> RetrainingResult:
    """Select, mix and write train / validation / test / traffic_slice + selection.json into `staging`.

    Raises ValueError when there is nothing to select for (no window, no traffic): no retry can fix it."""
    from llmft_assets.monitoring.request_logs import read_request_log_window
    from llmft_assets.monitoring.retrain_selection import mix_with_training, problem_keys, select_for_traffic

    window_days, end = window_of(inputs.drift_report_version, inputs.drift_summary)
    window = read_request_log_window(backend, window_days=window_days, end=end, model_version=model_version)
    held_out: set[str] = set()
    for name in ("validation", "test"):  # a validation problem in training would flatter its loss
        batches = iter_parquet_batches(
            split_path(inputs.splits_dir, name), batch_size=batch_rows, columns=["id", "messages"]
        )
        held_out |= problem_keys(batches)
    selection = select_for_traffic(
        window.table.column("prompt").to_pylist(),
        iter_parquet_batches(inputs.pool_file, batch_size=batch_rows),
        excluded_keys=held_out,
        settings=settings,
    )
    mixed = mix_with_training(
        selection,
        iter_parquet_batches(split_path(inputs.splits_dir, "train"), batch_size=batch_rows),
        settings=settings,
    )
    rows = {
        "train": _write(mixed.train, staging / "train.parquet"),
        "traffic_slice": _write(mixed.traffic_slice, staging / TRAFFIC_SLICE_FILE),
    }
    for name in ("validation", "test"):
        rows[name] = _write(pq.read_table(split_path(inputs.splits_dir, name)), staging / f"{name}.parquet")
    stats = selection.stats.as_dict()
    (staging / SELECTION_FILE).write_text(json.dumps(stats, indent=1), encoding="utf-8")
    log(f"retraining_dataset: {rows} from {selection.stats.pool_rows} pool rows")
    manifest = RetrainingManifest(
        rows=rows,
        selection=stats,
        drift_report_version=inputs.drift_report_version,
        dataset_splits_version=inputs.splits_version,
        pool_version=inputs.pool_version,
        request_log_window=f"[{window.start.isoformat()}, {window.end.isoformat()})",
    )
    return RetrainingResult(
        manifest=manifest,
        stats=selection.stats,
        traffic_prompts=window.rows,
        current_train_rows_kept=mixed.current_rows_kept,
    )
