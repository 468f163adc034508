"""What each asset's published artifact tells the assets downstream of it, as typed records.

An asset writes one of these into its artifact manifest (`StagedArtifact(metadata=manifest.to_dict())`);
a downstream asset reads it back with `ArtifactHandle.manifest(Type)`. The keys are the ones earlier
artifacts were published with, and every field a past artifact may lack has a default, so artifacts
already in storage read back unchanged. No Dagster import: the domain steps build these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self


class Manifest:
    """to_dict / from_dict over the dataclass fields (unknown keys of newer writers are ignored)."""

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {item.name for item in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass(frozen=True)
class DatasetDescription(Manifest):
    """Which data this is and under what licence; travels from raw_dataset down to the bill of materials."""

    source: str
    config: str | None = None
    license: str | None = None
    license_source: str | None = None
    # How the rows were prepared (cleaned: prefer_reannotated; validated: the ValidationLimits fields), so
    # rows prepared later from the same source (a retraining pool) pass the same rules.
    preparation: dict[str, Any] | None = None


def with_preparation(dataset: dict[str, Any] | None, **steps: Any) -> dict[str, Any] | None:
    """`dataset` (a DatasetDescription dict) with `steps` added to its preparation record."""
    if dataset is None:
        return None
    return {**dataset, "preparation": {**(dataset.get("preparation") or {}), **steps}}


@dataclass(frozen=True)
class StageManifest(Manifest):
    """raw, cleaned, validated and tokenized datasets: the row accounting and what the stage recorded."""

    counts: dict[str, Any]
    dataset: dict[str, Any] | None = None
    source: str | None = None
    config: str | None = None
    dropped_null_columns: list[str] | None = None
    formats: dict[str, int] | None = None
    max_seq_len: int | None = None
    total_tokens: int | None = None
    base_model_version: str | None = None


@dataclass(frozen=True)
class SplitsManifest(Manifest):
    rows: dict[str, int]
    tokens: dict[str, int] = field(default_factory=dict)
    salt: str | None = None
    split_key: str | None = None
    near_duplicate_jaccard: float | None = None
    near_duplicates_moved_to_train: int | None = None
    upstream: str | None = None
    """The tokenized_dataset version the splits were cut from (`key@version,...` for sharded splits)."""
    dataset: dict[str, Any] | None = None
    shards: dict[str, str] | None = None
    """sharded_dataset_splits: each source shard (partition key) -> the tokenized shard version it read."""
    assembly: dict[str, Any] | None = None
    """sharded_dataset_splits: the cross-shard row accounting (rows_in = rows_out + quarantined + duplicates)."""
    max_seq_len: int | None = None
    """sharded_dataset_splits: the max_seq_len every shard was tokenized with (training reads it here)."""
    base_model_version: str | None = None
    """sharded_dataset_splits: the base_model version whose tokenizer every shard was tokenized with."""


@dataclass(frozen=True)
class BaseModelManifest(Manifest):
    model_info: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return str(self.model_info.get("model_id", "base"))


@dataclass(frozen=True)
class AdapterManifest(Manifest):
    run_key: str | None = None
    mlflow_run_id: str | None = None
    registered_version: str | None = None
    base_model_version: str | None = None
    dataset_version: str | None = None
    train_loss: float | None = None
    training_data: str | None = None
    """The dataset asset it trained on (`retraining_dataset`, `sharded_dataset_splits`); absent:
    dataset_splits."""


@dataclass(frozen=True)
class EvalManifest(Manifest):
    headline: dict[str, Any] = field(default_factory=dict)
    adapter_version: str | None = None
    registered_version: str | None = None
    gate_passed: bool | None = None


@dataclass(frozen=True)
class DriftManifest(Manifest):
    summary: dict[str, Any] = field(default_factory=dict)
    report_html: str | None = None
    report_json: str | None = None


@dataclass(frozen=True)
class RetrainingManifest(Manifest):
    """retraining_dataset: rows per split (dataset_splits' layout + traffic_slice) and its lineage."""

    rows: dict[str, int]
    selection: dict[str, Any] = field(default_factory=dict)
    drift_report_version: str | None = None
    dataset_splits_version: str | None = None
    pool_version: str | None = None
    request_log_window: str | None = None
