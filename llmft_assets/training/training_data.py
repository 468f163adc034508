"""Which published dataset a training run reads (and its adapter is evaluated on), and where its files are.

`dataset_splits` is the default (the current train/validation/test split); `retraining_dataset` is the
drift-targeted one (rows nearest to recent traffic mixed with the current train rows, same layout plus a
traffic slice); `sharded_dataset_splits` is the same layout assembled from a source's shards (the data
chain partitioned by `source_shards`). All are tokenized the same way; they differ in where the
max_seq_len their rows were cut to is recorded: the tokenized_dataset version their rows came from (the
splits' `upstream`, the retraining dataset's `pool_version`), or, for sharded splits (rows from several
shard_tokenized_dataset partitions), their own manifest.

`resolve_training_data` is the one place a source name and a version become files: lora_adapter passes
the version Dagster recorded, eval_report the one the adapter recorded (so it scores the test split of the
data the adapter was trained on).
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

DATASET_SPLITS = "dataset_splits"
RETRAINING_DATASET = "retraining_dataset"
SHARDED_DATASET_SPLITS = "sharded_dataset_splits"
TrainingDataSource = Literal["dataset_splits", "retraining_dataset", "sharded_dataset_splits"]
TRAINING_DATA_SOURCES: tuple[str, ...] = get_args(TrainingDataSource)
# What makes each source, named when none is materialized.
_HOW_TO_MAKE = {
    DATASET_SPLITS: "materialize the data chain (data_job) first",
    RETRAINING_DATASET: "run retraining_dataset_job first",
    SHARDED_DATASET_SPLITS: "register the source's shards (register_shards_job), backfill shard_job over "
    "source_shards, then materialize sharded_dataset_splits",
}
# Held-out rows of a retraining dataset shaped like the traffic it followed (read by the gate).
TRAFFIC_SLICE_FILE = "traffic_slice.parquet"
SELECTION_FILE = "selection.json"  # a retraining dataset's selection statistics (or why it carried over)


@dataclass(frozen=True)
class TrainingData:
    """One published dataset version as training sees it."""

    asset: str
    version: str
    folder: Path
    tokenized_version: str | None  # the tokenized_dataset version its rows (and max_seq_len) came from
    max_seq_len: int | None = None  # recorded with the data itself (sharded splits): no tokenized_dataset
    # Source and licence the splits recorded (None for a retraining dataset: its splits' apply).
    dataset: dict[str, Any] | None = None

    def split(self, name: str) -> Path:
        return self.folder / f"{name}.parquet"

    @property
    def traffic_slice(self) -> Path | None:
        """The traffic slice, for a retraining dataset that has one."""
        path = self.folder / TRAFFIC_SLICE_FILE
        return path if self.asset == RETRAINING_DATASET and path.exists() else None

    @property
    def carried_over(self) -> str | None:
        """Why a retraining dataset holds the current splits unchanged (no served traffic to select
        for); None when it selected rows, or for dataset_splits."""
        path = self.folder / SELECTION_FILE
        if self.asset != RETRAINING_DATASET or not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8")).get("carried_over")


class TrainingDataMissing(LookupError):
    """The source has no version to read (never materialized, or an adapter that recorded none)."""


def training_data_of(asset: str, version: str, folder: Path, metadata: Mapping[str, Any]) -> TrainingData:
    """A dataset_splits, retraining_dataset or sharded_dataset_splits artifact (its published metadata) as
    training data."""
    if asset not in TRAINING_DATA_SOURCES:
        raise ValueError(f"training data must be one of {', '.join(TRAINING_DATA_SOURCES)}, not {asset!r}")
    tokenized = metadata.get("pool_version" if asset == RETRAINING_DATASET else "upstream")
    max_seq_len = metadata.get("max_seq_len") if asset == SHARDED_DATASET_SPLITS else None
    return TrainingData(
        asset=asset,
        version=version,
        folder=folder,
        # sharded splits' upstream lists `shard@version`s: their rows came from no one tokenized_dataset
        tokenized_version=None if tokenized is None or asset == SHARDED_DATASET_SPLITS else str(tokenized),
        max_seq_len=None if max_seq_len is None else int(max_seq_len),
        dataset=None if asset == RETRAINING_DATASET else metadata.get("dataset"),
    )


def resolve_training_data(
    source: str,
    version: str | None,
    fetch: Callable[[str, str], tuple[str, Path, Mapping[str, Any]]],
) -> TrainingData:
    """`source` at `version` (lora_adapter: the version Dagster recorded; eval_report: the one the adapter
    recorded). `fetch(asset, version)` returns (version, local folder, published metadata).

    Raises ValueError for another asset name and TrainingDataMissing, saying what makes it, when `version`
    is None."""
    if source not in TRAINING_DATA_SOURCES:
        raise ValueError(f"training data must be one of {', '.join(TRAINING_DATA_SOURCES)}, not {source!r}")
    if version is None:
        raise TrainingDataMissing(
            f"training_data={source} but no {source} is materialized; {_HOW_TO_MAKE[source]}"
        )
    published_version, folder, metadata = fetch(source, version)
    return training_data_of(source, published_version, folder, metadata)
