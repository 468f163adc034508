"""Read the model server's request log for a time window, the `current` side of the drift report.

The log is `<root>/request_logs/date=YYYY-MM-DD/<batch_id>.parquet` (one atomic object per batch, see
`llmft_assets.serving.request_log`). Only the daily partitions that overlap the window are listed,
each batch is read with just the columns asked for and filtered to the window before the next one
is read, so memory follows the window's rows, not the log's size. An empty or missing log is an
empty table; a batch that cannot be read is skipped and reported with its reason, never fatal.
No Dagster import here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmft_assets.serving.request_log import REQUEST_LOG_PREFIX, REQUEST_LOG_SCHEMA
from llmft_assets.storage import StorageBackend

logger = logging.getLogger(__name__)

TIMESTAMP_COLUMN = "timestamp"
VERSION_COLUMN = "model_version"  # the adapter version that answered (drift per version)
# What the drift report compares; `timestamp` is always read too, to filter to the window.
DRIFT_COLUMNS: tuple[str, ...] = ("prompt", "response")


@dataclass
class RequestLogWindow:
    """The rows logged in [start, end) and what it took to read them."""

    table: pa.Table
    start: datetime
    end: datetime
    days: list[str]
    batches_read: int = 0
    # Batch key -> why it was left out (unreadable Parquet, a missing column, a bad type).
    skipped_batches: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.table.num_rows

    def to_summary(self) -> dict[str, object]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "days": len(self.days),
            "rows": self.rows,
            "batches_read": self.batches_read,
            "batches_skipped": len(self.skipped_batches),
            "skipped_batches": dict(self.skipped_batches),
        }


def window_bounds(window_days: float, end: datetime | None = None) -> tuple[datetime, datetime]:
    """[end - window_days, end) in UTC; `end` defaults to now and must be timezone-aware."""
    if window_days <= 0:
        raise ValueError(f"window_days must be positive, got {window_days}")
    end = datetime.now(UTC) if end is None else end
    if end.tzinfo is None:
        raise ValueError("the window end must be timezone-aware (UTC)")
    end = end.astimezone(UTC)
    return end - timedelta(days=window_days), end


def partition_days(start: datetime, end: datetime) -> list[str]:
    """The `date=` partitions (UTC days) that hold rows in [start, end)."""
    if end <= start:
        return []
    first: date = start.astimezone(UTC).date()
    # `end` is exclusive: an end exactly at midnight needs nothing from that day.
    last: date = (end.astimezone(UTC) - timedelta(microseconds=1)).date()
    return [(first + timedelta(days=offset)).isoformat() for offset in range((last - first).days + 1)]


def partition_prefix(day: str) -> str:
    return f"{REQUEST_LOG_PREFIX}/date={day}/"


def iter_request_log_batches(
    backend: StorageBackend,
    start: datetime,
    end: datetime,
    *,
    columns: Sequence[str] = DRIFT_COLUMNS,
    skipped: dict[str, str] | None = None,
    model_version: str | None = None,
) -> Iterator[pa.Table]:
    """Each logged batch in the window's partitions, cut to [start, end) and to `columns` (+ timestamp).

    `model_version` keeps only the rows that adapter version answered. Unreadable batches go into
    `skipped` (key -> reason) and are logged; the rest stream on.
    """
    wanted = _wanted_columns(columns)
    schema = pa.schema([REQUEST_LOG_SCHEMA.field(name) for name in wanted])
    read_columns = wanted if model_version is None or VERSION_COLUMN in wanted else [*wanted, VERSION_COLUMN]
    read_schema = pa.schema([REQUEST_LOG_SCHEMA.field(name) for name in read_columns])
    start_scalar = pa.scalar(start.astimezone(UTC), type=REQUEST_LOG_SCHEMA.field(TIMESTAMP_COLUMN).type)
    end_scalar = pa.scalar(end.astimezone(UTC), type=REQUEST_LOG_SCHEMA.field(TIMESTAMP_COLUMN).type)
    for day in partition_days(start, end):
        for key in backend.iter_keys(partition_prefix(day)):
            if not key.endswith(".parquet"):
                continue
            try:
                batch = _read_batch(backend, key, read_columns).cast(read_schema)
            except Exception as error:  # a bad batch must not hide the rest of the window
                reason = f"{type(error).__name__}: {error}"[:500]
                logger.warning("request log batch %s skipped: %s", key, reason)
                if skipped is not None:
                    skipped[key] = reason
                continue
            timestamps = batch.column(TIMESTAMP_COLUMN)
            keep = pc.and_(pc.greater_equal(timestamps, start_scalar), pc.less(timestamps, end_scalar))
            if model_version is not None:
                keep = pc.and_(keep, pc.equal(batch.column(VERSION_COLUMN), model_version))
            yield batch.filter(pc.fill_null(keep, False)).select(schema.names)


def read_request_log_window(
    backend: StorageBackend,
    *,
    window_days: float = 7,
    end: datetime | None = None,
    columns: Sequence[str] = DRIFT_COLUMNS,
    model_version: str | None = None,
) -> RequestLogWindow:
    """The request log's rows in the `window_days` before `end` (default now), oldest batch first."""
    start, end = window_bounds(window_days, end)
    wanted = _wanted_columns(columns)
    skipped: dict[str, str] = {}
    tables: list[pa.Table] = []
    batches_read = 0
    for table in iter_request_log_batches(
        backend, start, end, columns=columns, skipped=skipped, model_version=model_version
    ):
        batches_read += 1
        if table.num_rows:
            tables.append(table)
    schema = pa.schema([REQUEST_LOG_SCHEMA.field(name) for name in wanted])
    combined = pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()
    return RequestLogWindow(
        table=combined,
        start=start,
        end=end,
        days=partition_days(start, end),
        batches_read=batches_read,
        skipped_batches=skipped,
    )


def _wanted_columns(columns: Sequence[str]) -> list[str]:
    unknown = sorted(set(columns) - set(REQUEST_LOG_SCHEMA.names))
    if unknown:
        raise ValueError(f"not request log columns: {unknown} (columns: {REQUEST_LOG_SCHEMA.names})")
    return [TIMESTAMP_COLUMN, *(name for name in dict.fromkeys(columns) if name != TIMESTAMP_COLUMN)]


def _read_batch(backend: StorageBackend, key: str, columns: list[str]) -> pa.Table:
    local = backend.local_path(key)
    source = local if local is not None else io.BytesIO(backend.get_bytes(key))
    parquet = pq.ParquetFile(source)
    missing = [name for name in columns if name not in parquet.schema_arrow.names]
    if missing:
        raise ValueError(f"missing columns {missing}")
    return parquet.read(columns=columns)
