"""The retraining dataset step: the pool rows nearest to what users asked in a drift report's window,
mixed with the current training rows, held-out problems never taken, plus a traffic-shaped evaluation
slice. The selection itself is `retrain_selection`; this step reads, writes and counts. No Dagster import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llmft_assets.data.schema import QUARANTINE_SCHEMA, TOKENIZED_SCHEMA, StageCounts
from llmft_assets.data.stage import split_path
from llmft_assets.data.validation import ValidationLimits
from llmft_assets.manifests import RetrainingManifest
from llmft_assets.monitoring.retrain_pool import PoolLocations, RawPool, quarantine_path, tokenize_selected
from llmft_assets.monitoring.retrain_selection import SelectionSettings, TrafficSelection
from llmft_assets.storage import StorageBackend
from llmft_assets.storage.tables import iter_parquet_batches
from llmft_assets.training.training_data import SELECTION_FILE, TRAFFIC_SLICE_FILE

SPLIT_NAMES = ("train", "validation", "test")
NO_TRAFFIC = "no served traffic in the window: current splits carried over unchanged"


@dataclass(frozen=True)
class RetrainingInputs:
    drift_report_version: str
    drift_summary: dict[str, Any]
    splits_dir: Path
    splits_version: str
    pool_file: Path
    pool_version: str


@dataclass(frozen=True)
class RawPoolInputs:
    """A pool of raw R1-Distill-SFT files, prepared as the data chain prepares its rows."""

    locations: PoolLocations
    tokenizer_dir: Path  # the base model tokenized_dataset was tokenized with
    max_seq_len: int  # tokenized_dataset's
    prefer_reannotated: bool  # cleaned_dataset's
    limits: ValidationLimits  # validated_dataset's
    s3_client: Any = None


@dataclass
class RetrainingResult:
    manifest: RetrainingManifest
    stats: Any  # retrain_selection.SelectionStats; None when the splits were carried over
    traffic_prompts: int
    current_train_rows_kept: int
    pool_preparation: dict[str, Any] | None = None  # raw pools: rows rejected before the selection, why
    carried_over: str | None = None  # why the current splits were published unchanged (no selection)


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
    raw_pool: RawPoolInputs | None = None,
) -> RetrainingResult:
    """Select, mix and write train / validation / test / traffic_slice + selection.json into `staging`.

    ``raw_pool``: select from raw files instead of ``inputs.pool_file`` (tokenized_dataset); their rejected
    rows are in ``pool_quarantine.parquet`` and counted in the selection statistics.

    A window without a non-empty prompt (no served traffic, e.g. a fresh install) selects nothing: the
    current splits are published unchanged, without a traffic slice (see ``carry_over``).

    Raises ValueError when the drift report records no window and DataSourceError for a raw pool that
    cannot be read: no retry can fix either."""
    from llmft_assets.monitoring.request_logs import read_request_log_window
    from llmft_assets.monitoring.retrain_selection import (
        mix_with_training,
        problem_keys,
        select_for_traffic,
        traffic_texts,
    )

    window_days, end = window_of(inputs.drift_report_version, inputs.drift_summary)
    window = read_request_log_window(backend, window_days=window_days, end=end, model_version=model_version)
    prompts = window.table.column("prompt").to_pylist()
    if not traffic_texts(prompts):
        return carry_over(inputs, window, staging=staging, log=log)
    held_out: set[str] = set()
    for name in ("validation", "test"):  # a validation problem in training would flatter its loss
        batches = iter_parquet_batches(
            split_path(inputs.splits_dir, name), batch_size=batch_rows, columns=["id", "messages"]
        )
        held_out |= problem_keys(batches)
    preparation: dict[str, Any] | None = None
    if raw_pool is None:
        selection = select_for_traffic(
            prompts,
            iter_parquet_batches(inputs.pool_file, batch_size=batch_rows),
            excluded_keys=held_out,
            settings=settings,
        )
    else:
        selection, preparation = _select_from_raw(raw_pool, prompts, held_out, settings, batch_rows, staging)
    mixed = mix_with_training(
        selection,
        iter_parquet_batches(split_path(inputs.splits_dir, "train"), batch_size=batch_rows),
        settings=settings,
    )
    rows = {
        "train": _write(mixed.train, staging / "train.parquet"),
        "traffic_slice": _write(mixed.traffic_slice, staging / TRAFFIC_SLICE_FILE),
    }
    for name in SPLIT_NAMES[1:]:
        rows[name] = _write(pq.read_table(split_path(inputs.splits_dir, name)), staging / f"{name}.parquet")
    stats = selection.stats.as_dict()
    if preparation is not None:
        stats["pool_preparation"] = preparation
    (staging / SELECTION_FILE).write_text(json.dumps(stats, indent=1), encoding="utf-8")
    log(f"retraining_dataset: {rows} from {selection.stats.pool_rows} pool rows")
    manifest = RetrainingManifest(
        rows=rows,
        selection=stats,
        drift_report_version=inputs.drift_report_version,
        dataset_splits_version=inputs.splits_version,
        pool_version=inputs.pool_version if raw_pool is None else raw_pool.locations.version,
        request_log_window=f"[{window.start.isoformat()}, {window.end.isoformat()})",
    )
    return RetrainingResult(
        manifest=manifest,
        stats=selection.stats,
        traffic_prompts=window.rows,
        current_train_rows_kept=mixed.current_rows_kept,
        pool_preparation=preparation,
    )


def carry_over(
    inputs: RetrainingInputs, window: Any, *, staging: Path, log: Callable[[str], None]
) -> RetrainingResult:
    """No traffic to select for: train / validation / test are the current splits' files, byte for byte,
    and there is no traffic slice (an adapter trained on it is judged on the standard criteria alone;
    drift_retrain_sensor does not train on it). The pool is not read."""
    import shutil

    rows = {}
    for name in SPLIT_NAMES:
        source = split_path(inputs.splits_dir, name)
        shutil.copyfile(source, staging / f"{name}.parquet")
        rows[name] = pq.ParquetFile(source).metadata.num_rows
    rows["traffic_slice"] = 0
    selection = {"carried_over": NO_TRAFFIC, "traffic_prompts": window.rows, "selected_rows": 0}
    (staging / SELECTION_FILE).write_text(json.dumps(selection, indent=1), encoding="utf-8")
    log(
        f"retraining_dataset: {NO_TRAFFIC} ({window.rows} requests logged in "
        f"[{window.start.isoformat()}, {window.end.isoformat()}), none with a prompt); rows in = rows out: {rows}"
    )
    manifest = RetrainingManifest(
        rows=rows,
        selection=selection,
        drift_report_version=inputs.drift_report_version,
        dataset_splits_version=inputs.splits_version,
        pool_version=inputs.pool_version,
        request_log_window=f"[{window.start.isoformat()}, {window.end.isoformat()})",
    )
    return RetrainingResult(
        manifest=manifest,
        stats=None,
        traffic_prompts=window.rows,
        current_train_rows_kept=rows["train"],
        carried_over=NO_TRAFFIC,
    )


def _select_from_raw(
    raw_pool: RawPoolInputs,
    prompts: list[str],
    held_out: set[str],
    settings: SelectionSettings,
    batch_rows: int,
    staging: Path,
) -> tuple[TrafficSelection, dict[str, Any]]:
    """Select over the cleaned and validated raw rows, then tokenize only the selected ones."""
    from llmft_assets.data.parallel import load_tokenizer
    from llmft_assets.monitoring.retrain_selection import select_for_traffic
    from llmft_assets.storage.tables import ParquetSink

    with ParquetSink(quarantine_path(staging), QUARANTINE_SCHEMA) as quarantine:
        pool = RawPool(
            raw_pool.locations,
            quarantine,
            batch_rows=batch_rows,
            prefer_reannotated=raw_pool.prefer_reannotated,
            limits=raw_pool.limits,
            s3_client=raw_pool.s3_client,
        )
        selection = select_for_traffic(prompts, pool.batches(), excluded_keys=held_out, settings=settings)
    tokenizer = load_tokenizer(raw_pool.tokenizer_dir)
    counts = StageCounts(stage="tokenized")
    selection = replace(
        selection,
        training_rows=tokenize_selected(
            selection.training_rows, tokenizer, max_seq_len=raw_pool.max_seq_len, counts=counts
        ),
        traffic_slice=tokenize_selected(
            selection.traffic_slice, tokenizer, max_seq_len=raw_pool.max_seq_len, counts=counts
        ),
    )
    preparation = pool.stats()
    preparation["tokenized"] = {key: counts.extra[key] for key in ("truncated", "no_assistant_tokens")}
    return selection, preparation
