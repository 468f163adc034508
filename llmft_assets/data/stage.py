"""One step of the data chain each: read the upstream table, run the pure row functions, write the
stage's table(s) into a staging folder, and return what happened as a typed result.

Rows stream through Parquet row groups; counts are kept so that rows in = rows out + quarantined +
duplicates dropped (checked before a result is returned). The Dagster assets call one function here
and turn the result into metadata; nothing here knows about Dagster.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmft_assets.data.key_set import CompactKeySet
from llmft_assets.data.schema import CONVERSATION_SCHEMA, QUARANTINE_SCHEMA, TOKENIZED_SCHEMA, StageCounts
from llmft_assets.data.splits import SplitSettings
from llmft_assets.data.validation import ValidationLimits
from llmft_assets.manifests import DatasetDescription, SplitsManifest, StageManifest, with_preparation
from llmft_assets.storage.tables import ParquetSink, iter_parquet_rows

Log = Callable[[str], None]

RAW_SCHEMA = pa.schema(
    [
        pa.field("origin", pa.string(), nullable=False),
        # Rows keep their own columns (v0 and v1 differ); JSON keeps both in one table without coercion.
        pa.field("payload", pa.string(), nullable=False),
    ]
)
DATA_FILE = "data.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SPLIT_NAMES = ("train", "validation", "test")
PROGRESS_EVERY_ROWS = 20_000
PREVIEW_ROWS = 5


@dataclass
class StageResult:
    """What one data stage wrote: its counts (balanced), the manifest it publishes, and what a person reads."""

    counts: StageCounts
    manifest: StageManifest
    table_file: str = DATA_FILE
    preview: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def reject_rate(self) -> float:
        return self.counts.quarantined / self.counts.rows_in if self.counts.rows_in else 0.0


@dataclass
class TokenizeResult(StageResult):
    lengths: list[int] = field(default_factory=list)
    assistant_tokens: int = 0
    truncated: int = 0


@dataclass
class SplitResult:
    manifest: SplitsManifest
    rows_in: int
    near_duplicates_joined_eval_split: int


class _Progress:
    """A log line every PROGRESS_EVERY_ROWS rows read."""

    def __init__(self, log: Log) -> None:
        self.log, self.last = log, 0

    def __call__(self, counts: StageCounts) -> None:
        if counts.rows_in - self.last >= PROGRESS_EVERY_ROWS:
            self.last = counts.rows_in
            self.log(
                f"{counts.stage}: {counts.rows_in} rows read, {counts.rows_out} kept, "
                f"{counts.quarantined} quarantined, {counts.duplicates} duplicates"
            )


def _sinks(staging: Path, schema: pa.Schema) -> tuple[ParquetSink, ParquetSink]:
    return ParquetSink(staging / DATA_FILE, schema), ParquetSink(staging / QUARANTINE_FILE, QUARANTINE_SCHEMA)


def _finished(counts: StageCounts, **manifest: Any) -> StageManifest:
    counts.check_balanced()
    return StageManifest(counts=counts.to_metadata(), **manifest)


def stage_raw(
    source: str,
    *,
    config: str | None,
    max_rows: int | None,
    batch_size: int,
    columns: dict[str, str] | None,
    license_override: str | None,
    staging: Path,
    s3_client: Any,
    log: Log,
    described_as: tuple[str, str | None] | None = None,
) -> StageResult:
    """R1-Distill-SFT rows as read from `source`, one JSON payload per row; unparseable input quarantined.

    `described_as`: the (source, config) the dataset description and licence name, when `source` is one
    shard of a larger source (default: `source`, `config`).

    Raises DataSourceError / ValueError for a source that cannot be read at all (before writing anything).
    """
    from llmft_assets.data.raw_sources import iter_raw_batches
    from llmft_assets.training.licenses import dataset_license

    counts = StageCounts(stage="raw")
    batches = iter_raw_batches(
        source,
        config=config,
        max_rows=max_rows,
        batch_size=batch_size,
        s3_client=s3_client,
        counts=counts,
        columns=columns,
    )
    progress = _Progress(log)
    rows_sink, quarantine_sink = _sinks(staging, RAW_SCHEMA)
    with rows_sink, quarantine_sink:
        for batch in batches:
            # The payloads are the JSON the reader encoded to check each row: no second encoding.
            origins = [row.get("origin", "unknown") for row in batch.rows]
            rows_sink.write_table(pa.table([origins, batch.payloads], schema=RAW_SCHEMA))
            quarantine_sink.write_rows(batch.quarantine)
            progress(counts)
    dataset_source, dataset_config = described_as or (source, config)
    license_ = dataset_license(dataset_source, license_override)
    # Which data this is and under what licence travels with every derived artifact, to the BOM.
    dataset = DatasetDescription(
        source=dataset_source, config=dataset_config, license=license_.license, license_source=license_.source
    )
    manifest = _finished(counts, source=source, config=config, dataset=dataset.to_dict())
    return StageResult(counts=counts, manifest=manifest, warnings=list(counts.warnings))


def stage_cleaned(
    raw_file: Path, *, prefer_reannotated: bool, dataset: dict[str, Any] | None, staging: Path, log: Log
) -> StageResult:
    """One canonical conversation schema for both configs: NFC, whitespace and control characters
    normalized, always-null columns dropped, exact duplicates removed by content hash."""
    from llmft_assets.data.cleaning import always_null_columns, clean_rows
    from llmft_assets.data.formats import format_counts

    counts = StageCounts(stage="cleaned")
    seen_hashes = CompactKeySet()  # 16 bytes a content hash, not a set of strings
    preview: list[dict[str, Any]] = []
    progress = _Progress(log)
    rows_sink, quarantine_sink = _sinks(staging, CONVERSATION_SCHEMA)
    with rows_sink, quarantine_sink:
        for raw_rows in iter_parquet_rows(raw_file):
            rows = [{**json.loads(r["payload"]), "origin": r["origin"]} for r in raw_rows]
            cleaned, quarantine = clean_rows(
                rows, seen_hashes=seen_hashes, counts=counts, prefer_reannotated=prefer_reannotated
            )
            rows_sink.write_rows(cleaned)
            quarantine_sink.write_rows(quarantine)
            preview.extend(cleaned[: PREVIEW_ROWS - len(preview)])
            progress(counts)
    manifest = _finished(
        counts,
        dropped_null_columns=always_null_columns(counts),
        formats=format_counts(counts),
        dataset=with_preparation(dataset, prefer_reannotated=prefer_reannotated),
    )
    return StageResult(counts=counts, manifest=manifest, preview=preview)


def stage_validated(
    cleaned_file: Path, *, limits: ValidationLimits, dataset: dict[str, Any] | None, staging: Path, log: Log
) -> StageResult:
    """Conversations that pass the rules (role order, non-empty turns, balanced <think>, length bounds,
    answer present, unique ids); every rejected row is in quarantine.parquet with its reason."""
    from llmft_assets.data.formats import format_counts
    from llmft_assets.data.validation import validate_rows
    from llmft_assets.storage.tables import iter_parquet_batches

    counts = StageCounts(stage="validated")
    seen_ids = CompactKeySet()
    progress = _Progress(log)
    rows_sink, quarantine_sink = _sinks(staging, CONVERSATION_SCHEMA)
    with rows_sink, quarantine_sink:
        for batch in iter_parquet_batches(cleaned_file):
            rows = batch.to_pylist()
            valid, quarantine = validate_rows(rows, seen_ids=seen_ids, limits=limits, counts=counts)
            # Valid rows are written as they were read (an Arrow filter), not rebuilt from Python objects.
            kept = {id(row) for row in valid}
            rows_sink.write_table(pa.Table.from_batches([batch]).filter([id(row) in kept for row in rows]))
            quarantine_sink.write_rows(quarantine)
            progress(counts)
    manifest = _finished(
        counts, formats=format_counts(counts), dataset=with_preparation(dataset, validation=asdict(limits))
    )
    return StageResult(counts=counts, manifest=manifest)


def stage_tokenized(
    validated_file: Path,
    *,
    base_model_dir: Path,
    base_model_version: str,
    max_seq_len: int,
    batch_size: int,
    workers: int,
    dataset: dict[str, Any] | None,
    staging: Path,
    log: Log,
) -> TokenizeResult:
    """Conversations rendered with the base model's own chat template; labels are -100 everywhere
    except assistant turns (content + end token); sequences over max_seq_len truncated and counted."""
    from llmft_assets.data.parallel import iter_tokenized_tables, resolve_workers
    from llmft_assets.storage.tables import iter_parquet_batches

    workers = resolve_workers(workers)
    counts = StageCounts(stage="tokenized")
    result = TokenizeResult(counts=counts, manifest=StageManifest(counts={}))
    progress = _Progress(log)
    log(f"tokenizing with {workers} worker process(es)")
    # Arrow batches go to the workers as they are: the conversation columns never become Python objects here.
    batches = iter_parquet_batches(validated_file, batch_size=batch_size)
    with ParquetSink(staging / DATA_FILE, TOKENIZED_SCHEMA) as rows_sink:
        for table, batch_counts in iter_tokenized_tables(
            batches, base_model_dir, max_seq_len=max_seq_len, workers=workers
        ):
            counts.merge(batch_counts)
            rows_sink.write_table(table)
            result.lengths.extend(table.column("num_tokens").to_pylist())
            result.assistant_tokens += batch_counts.extra["assistant_tokens"]
            result.truncated += batch_counts.extra["truncated"]
            progress(counts)
    result.manifest = _finished(
        counts,
        max_seq_len=max_seq_len,
        total_tokens=sum(result.lengths),
        base_model_version=base_model_version,
        dataset=dataset,
    )
    return result


def stage_splits(
    tokenized_file: Path,
    *,
    rule: SplitSettings,
    tokenized_version: str,
    dataset: dict[str, Any] | None,
    staging: Path,
    log: Log,
) -> SplitResult:
    """train / validation / test by a stable hash of the normalized problem (the first user turn), so the
    same problem under two ids never crosses splits; near-duplicate prompts (MinHash) are kept together,
    with train winning. Adding rows never moves an existing row, except an evaluation row into train."""
    from llmft_assets.data.split_tables import write_splits

    # In Arrow: rows are filtered into their split batch by batch, token lists never become Python objects.
    written = write_splits(
        tokenized_file, {name: split_path(staging, name) for name in SPLIT_NAMES}, TOKENIZED_SCHEMA, rule
    )
    plan, sizes, tokens = written.plan, written.rows, written.tokens
    rows_in = len(plan.assignments)
    if sum(sizes.values()) != rows_in:
        raise RuntimeError(f"split sizes {sizes} do not add up to {rows_in} tokenized rows")
    log(f"splits: {sizes}")
    manifest = SplitsManifest(
        rows=sizes,
        tokens=tokens,
        salt=rule.salt,
        split_key="normalized first user turn",
        near_duplicate_jaccard=rule.near_duplicate_jaccard,
        near_duplicates_moved_to_train=plan.moved_to_train,
        upstream=tokenized_version,
        dataset=dataset,
    )
    return SplitResult(
        manifest=manifest, rows_in=rows_in, near_duplicates_joined_eval_split=plan.joined_eval_group
    )


def split_path(splits_dir: Path, name: str) -> Path:
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
    return splits_dir / f"{name}.parquet"
