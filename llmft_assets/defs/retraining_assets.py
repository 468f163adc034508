"""Drift-targeted retraining data: the `retraining_dataset` asset and its job.

Lineage: drift_report (which request-log window drifted) + the request log of that window + the candidate
pool (tokenized_dataset: every row the pipeline ingested, streamed) + dataset_splits (the current training
rows to mix with, the held-out problems never to take). The selection itself is
`llmft_assets.monitoring.retrain_selection` (no Dagster there).

`drift_retrain_sensor` (monitoring_assets) builds it once per drift event: a failed drift_check with a drift
verdict starts `retraining_dataset_job` (run key per drift report version; the retraining cooldown applies),
then `train_job` with lora_adapter's `training_data=retraining_dataset`.

The artifact has dataset_splits' layout (train / validation / test .parquet, tokenized) plus
`traffic_slice.parquet` (held-out rows shaped like the traffic, for the gate) and `selection.json`.
"""

import json
from datetime import datetime
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from llmft_assets.data.schema import TOKENIZED_SCHEMA
from llmft_assets.defs.config_models import dagster_config
from llmft_assets.defs.data_assets import DATA_FILE, OWNERS, split_file
from llmft_assets.defs.jobs import retraining_dataset_job
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
)
from llmft_assets.monitoring.retrain_selection import SelectionSettings, SelectionStats
from llmft_assets.storage.tables import iter_parquet_batches
from llmft_assets.training.training_data import RETRAINING_DATASET, TRAFFIC_SLICE_FILE

RETRAINING_GROUP = "retraining"
SELECTION_FILE = "selection.json"

RetrainingDatasetConfig = dagster_config(
    SelectionSettings,
    "RetrainingDatasetConfig",
    doc="How the retraining dataset is selected (SelectionSettings) and which traffic it follows.",
    extra_fields={
        "model_version": (
            str | None,
            Field(default=None, description="only the traffic this adapter version answered; None: all"),
        ),
        "batch_rows": (int, Field(default=10_000, gt=0, description="pool rows read per streamed batch")),
    },
)


def _window_of(drift_report: ArtifactHandle) -> tuple[float, datetime]:
    """(window_days, end) of the request-log window the drift report judged."""
    window = (drift_report.metadata.get("summary") or {}).get("window") or {}
    try:
        start, end = datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"])
    except (KeyError, TypeError, ValueError) as error:
        raise dg.Failure(
            description=f"drift_report {drift_report.version} records no request-log window: {error!r}",
            allow_retries=False,
        ) from error
    return (end - start).total_seconds() / 86400, end


def _clusters_markdown(stats: SelectionStats) -> str:
    lines = [
        "| cluster | traffic share | top words | quota | selected | mean similarity |",
        "|---|---|---|---|---|---|",
    ]
    for item in stats.clusters:
        mean = "n/a" if item.mean_similarity is None else f"{item.mean_similarity:.3f}"
        lines.append(
            f"| {item.cluster.index} | {item.cluster.share:.1%} | {', '.join(item.cluster.top_terms)} | "
            f"{item.quota} | {item.selected} | {mean} |"
        )
    return "\n".join(lines)


def _histogram_markdown(stats: SelectionStats) -> str:
    lines = ["| similarity | pool rows | selected |", "|---|---|---|"]
    edges = stats.histogram_edges
    for index, (pool, selected) in enumerate(
        zip(stats.histogram_pool, stats.histogram_selected, strict=True)
    ):
        lines.append(f"| {edges[index]:.1f}-{edges[index + 1]:.1f} | {pool} | {selected} |")
    return "\n".join(lines)


def _write(table: pa.Table, path: Path) -> int:
    pq.write_table(table.select(TOKENIZED_SCHEMA.names).cast(TOKENIZED_SCHEMA), path)
    return table.num_rows


@dg.asset(group_name=RETRAINING_GROUP, owners=OWNERS, kinds={"parquet"})
def retraining_dataset(
    context: dg.AssetExecutionContext,
    config: RetrainingDatasetConfig,  # type: ignore[valid-type]
    drift_report: ArtifactHandle,
    dataset_splits: ArtifactHandle,
    tokenized_dataset: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """The pool rows nearest to what users asked in the drift report's window, mixed with the current
    training rows; held-out test/validation problems never taken; a traffic-shaped evaluation slice."""
    from llmft_assets.monitoring.request_logs import read_request_log_window
    from llmft_assets.monitoring.retrain_selection import mix_with_training, problem_keys, select_for_traffic

    selection_settings = config.to_domain(asset=RETRAINING_DATASET)
    window_days, end = _window_of(drift_report)
    window = read_request_log_window(
        storage.backend(), window_days=window_days, end=end, model_version=config.model_version
    )
    held_out = set()
    for name in ("validation", "test"):  # a validation problem in training would flatter its loss
        held_out |= problem_keys(
            iter_parquet_batches(
                split_file(dataset_splits, name), batch_size=config.batch_rows, columns=["id", "messages"]
            )
        )
    try:
        selection = select_for_traffic(
            window.table.column("prompt").to_pylist(),
            iter_parquet_batches(tokenized_dataset.file(DATA_FILE), batch_size=config.batch_rows),
            excluded_keys=held_out,
            settings=selection_settings,
        )
    except ValueError as error:  # e.g. no traffic in the window: one clear line, no retry can fix it
        raise dg.Failure(description=f"{RETRAINING_DATASET}: {error}", allow_retries=False) from error
    mixed = mix_with_training(
        selection,
        iter_parquet_batches(split_file(dataset_splits, "train"), batch_size=config.batch_rows),
        settings=selection_settings,
    )
    staging = storage.staging_dir(RETRAINING_DATASET)
    rows = {
        "train": _write(mixed.train, staging / "train.parquet"),
        "traffic_slice": _write(mixed.traffic_slice, staging / TRAFFIC_SLICE_FILE),
    }
    for name in ("validation", "test"):
        rows[name] = _write(pq.read_table(split_file(dataset_splits, name)), staging / f"{name}.parquet")
    stats = selection.stats.as_dict()
    (staging / SELECTION_FILE).write_text(json.dumps(stats, indent=1), encoding="utf-8")
    context.log.info(f"{RETRAINING_DATASET}: {rows} from {selection.stats.pool_rows} pool rows")
    lineage = {
        "drift_report_version": drift_report.version,
        "dataset_splits_version": dataset_splits.version,
        "pool_version": tokenized_dataset.version,
        "request_log_window": f"[{window.start.isoformat()}, {window.end.isoformat()})",
    }
    return artifact_output(
        StagedArtifact(staging, metadata={"rows": rows, "selection": stats, **lineage}),
        metadata={
            **{f"{name}_rows": count for name, count in rows.items()},
            "traffic_prompts": window.rows,
            "pool_rows": selection.stats.pool_rows,
            "selected_rows": selection.stats.selected_rows,
            "current_train_rows_kept": mixed.current_rows_kept,
            "dropped_in_held_out_splits": selection.stats.dropped_in_test_split,
            "dropped_duplicate_problem": selection.stats.dropped_duplicate_problem,
            "below_min_similarity": selection.stats.below_min_similarity,
            "index_mb": round(selection.stats.index_bytes / 2**20, 2),
            "rows_per_traffic_cluster": dg.MetadataValue.md(_clusters_markdown(selection.stats)),
            "similarity_histogram": dg.MetadataValue.md(_histogram_markdown(selection.stats)),
            **lineage,
        },
    )


RETRAINING_ASSETS = [retraining_dataset]
RETRAINING_JOBS = [retraining_dataset_job]  # started by drift_retrain_sensor (monitoring_assets)
