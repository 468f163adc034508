"""Which published dataset a training run reads, and where its files are.

`dataset_splits` is the default (the current train/validation/test split); `retraining_dataset` is the
drift-targeted one (rows nearest to recent traffic mixed with the current train rows, same layout plus a
traffic slice). Both are tokenized the same way; they differ in which tokenized_dataset version their rows
came from (the splits' `upstream`, the retraining dataset's `pool_version`).
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DATASET_SPLITS = "dataset_splits"
RETRAINING_DATASET = "retraining_dataset"
TrainingDataSource = Literal["dataset_splits", "retraining_dataset"]
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


def training_data_of(asset: str, version: str, folder: Path, metadata: Mapping[str, Any]) -> TrainingData:
    """A dataset_splits or retraining_dataset artifact (its published metadata) as training data."""
    if asset == DATASET_SPLITS:
        tokenized = metadata.get("upstream")
    elif asset == RETRAINING_DATASET:
        tokenized = metadata.get("pool_version")
    else:
        raise ValueError(f"training data must be {DATASET_SPLITS} or {RETRAINING_DATASET}, not {asset!r}")
    return TrainingData(
        asset=asset,
        version=version,
        folder=folder,
        tokenized_version=None if tokenized is None else str(tokenized),
    )
