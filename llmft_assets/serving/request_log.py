"""Durable request log of the model server, read back by the drift report.

`SpooledRequestLogWriter` (what the server uses) first appends each record as a JSON line to a
local segment file with one write(2) before the response goes out, so a killed server (SIGKILL)
loses nothing the kernel has seen; the segment is fsynced every `fsync_interval_s` (machine
crashes lose at most that), and rotated into a Parquet batch in storage every `flush_interval_s`.
Segments left by a killed server are shipped by the next one at start-up (a segment a live server
still writes is flock-ed and left alone). The Parquet key is derived from the segment's name, so a
segment shipped twice (killed between upload and unlink) lands on the same key: no duplicates.

Each batch is one Parquet object at `<root>/request_logs/date=YYYY-MM-DD/<batch_id>.parquet`,
written through the storage backend, whose `put_bytes` is atomic (temp file + rename locally, a
single PUT on S3): a reader sees a whole batch or nothing. A batch is shipped when its segment
reaches `max_batch_rows`, when `flush_interval_s` has passed since the segment opened, and on close.
A storage outage leaves the segments on disk; they are retried at the next flush.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

REQUEST_LOG_PREFIX = "request_logs"

REQUEST_LOG_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("model", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("messages_json", pa.string()),
        pa.field("response", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("latency_ms", pa.float64()),
        pa.field("finish_reason", pa.string()),
        pa.field("stream", pa.bool_()),
        # The name of the API key that made the request (never the key); null in older batches.
        pa.field("api_key_name", pa.string()),
    ]
)


class BytesSink(Protocol):
    """What the writer needs from a storage backend (llmft_assets.storage.StorageBackend fits)."""

    def put_bytes(self, key: str, data: bytes) -> None: ...


@dataclass(frozen=True)
class RequestLogRecord:
    request_id: str
    timestamp: datetime
    model: str
    model_version: str
    prompt: str
    messages_json: str
    response: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    finish_reason: str
    stream: bool
    api_key_name: str | None = None


def request_log_key(day: str, batch_id: str) -> str:
    return f"{REQUEST_LOG_PREFIX}/date={day}/{batch_id}.parquet"


def records_to_parquet_bytes(records: Iterable[RequestLogRecord]) -> bytes:
    rows = [asdict(record) for record in records]
    for row in rows:
        if row["timestamp"].tzinfo is None:
            raise ValueError("request log timestamps must be timezone-aware (UTC)")
    table = pa.Table.from_pylist(rows, schema=REQUEST_LOG_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _new_batch_id(now: datetime) -> str:
    # Sortable by time, unique across server workers and restarts.
    return f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}"


def read_request_logs(sink_with_listing: object, *, day: str | None = None) -> pa.Table:
    """Read every logged batch (optionally of one day) back as one table.

    `sink_with_listing` is a storage backend with `list(prefix)` and `get_bytes(key)`.
    """
    prefix = f"{REQUEST_LOG_PREFIX}/date={day}/" if day else f"{REQUEST_LOG_PREFIX}/"
    keys = sorted(k for k in sink_with_listing.list(prefix) if k.endswith(".parquet"))  # type: ignore[attr-defined]
    tables = [pq.read_table(io.BytesIO(sink_with_listing.get_bytes(k))) for k in keys]  # type: ignore[attr-defined]
    if not tables:
        return REQUEST_LOG_SCHEMA.empty_table()
    return pa.concat_tables([conform_to_schema(t) for t in tables])


def conform_to_schema(table: pa.Table) -> pa.Table:
    """Cast a logged batch to REQUEST_LOG_SCHEMA; columns added since it was written become nulls."""
    for schema_field in REQUEST_LOG_SCHEMA:
        if schema_field.name not in table.column_names:
            table = table.append_column(schema_field, pa.nulls(table.num_rows, type=schema_field.type))
    return table.select(REQUEST_LOG_SCHEMA.names).cast(REQUEST_LOG_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Crash-safe spooled writer
# ---------------------------------------------------------------------------------------------

SEGMENT_SUFFIX = ".jsonl"


def _record_to_line(record: RequestLogRecord) -> bytes:
    row = asdict(record)
    row["timestamp"] = record.timestamp.astimezone(UTC).isoformat()
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", errors="replace")


def _record_from_line(line: bytes) -> RequestLogRecord:
    row = json.loads(line)
    row["timestamp"] = datetime.fromisoformat(row["timestamp"])
    return RequestLogRecord(**row)


def read_segment(data: bytes) -> tuple[list[RequestLogRecord], int]:
    """Records of a segment and how many lines were unreadable (a torn last write)."""
    records: list[RequestLogRecord] = []
    bad = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(_record_from_line(line))
        except (ValueError, TypeError, KeyError):
            bad += 1
    return records, bad


class SpooledRequestLogWriter:
    """Request log writer with a local append-only spool (see the module docstring).

    `log()` is called on the event loop: it never waits for the disk beyond one write(2).
    """

    def __init__(
        self,
        sink: BytesSink,
        spool_dir: str | os.PathLike[str],
        *,
        max_batch_rows: int = 256,
        flush_interval_s: float = 5.0,
        fsync_interval_s: float = 0.1,
    ) -> None:
        if max_batch_rows < 1 or flush_interval_s <= 0 or fsync_interval_s <= 0:
            raise ValueError("max_batch_rows must be >= 1 and the intervals > 0")
        self._sink = sink
        self._spool = Path(spool_dir)
        self._spool.mkdir(parents=True, exist_ok=True)
        self._max_batch_rows = max_batch_rows
        self._flush_interval_s = flush_interval_s
        self._fsync_interval_s = min(fsync_interval_s, flush_interval_s)
        self._lock = threading.Lock()  # guards the current segment
        self._ship_lock = threading.Lock()
        self._closed = threading.Event()
        self._wake = threading.Event()
        self.rows_written = 0
        self.batches_written = 0
        self.write_failures = 0
        self.unreadable_lines = 0
        self._fd = -1
        self._full_fds: list[int] = []  # swapped-out segments not yet fsynced and closed
        self._segment: Path | None = None
        self._segment_rows = 0
        self._segment_opened = 0.0
        self._dirty = False
        with self._lock:
            self._open_segment()
        self.recovered_rows = self._ship_closed_segments()  # what a killed predecessor left
        self._thread = threading.Thread(target=self._run, name="request-log-spool", daemon=True)
        self._thread.start()

    # -- writing ---------------------------------------------------------------------------

    def log(self, record: RequestLogRecord) -> None:
        if self._closed.is_set():
            raise RuntimeError("request log writer is closed")
        if record.timestamp.tzinfo is None:
            raise ValueError("request log timestamps must be timezone-aware (UTC)")
        line = _record_to_line(record)
        with self._lock:
            os.write(self._fd, line)  # O_APPEND, one call: in the kernel before we answer
            self._segment_rows += 1
            self._dirty = True
            full = self._segment_rows >= self._max_batch_rows
            if full:
                # A full segment is swapped out here (no disk wait); the spool thread fsyncs, closes
                # and ships it, so no Parquet batch holds more than max_batch_rows.
                self._full_fds.append(self._fd)
                self._open_segment()
        if full:
            self._wake.set()

    def pending_rows(self) -> int:
        """Rows logged but not yet in storage (the spool's segments)."""
        total = 0
        for path in self._spool.glob(f"*{SEGMENT_SUFFIX}"):
            try:
                total += path.read_bytes().count(b"\n")
            except FileNotFoundError:
                continue
        return total

    def _open_segment(self) -> None:
        now = datetime.now(UTC)
        path = self._spool / f"{_new_batch_id(now)}-{os.getpid()}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "a live writer owns this segment"
        self._fd, self._segment = fd, path
        self._segment_rows, self._segment_opened, self._dirty = 0, time.monotonic(), False

    def _rotate(self, *, current: bool = True) -> None:
        """Close the swapped-out segments (and the current one) fsynced; shipping happens after.

        fsync runs outside the lock: `log()` is called on the event loop and must never wait for
        a disk flush.
        """
        with self._lock:
            closing, self._full_fds = self._full_fds, []
            if current and self._segment_rows > 0:
                closing.append(self._fd)
                self._open_segment()
        for fd in closing:
            os.fsync(fd)
            os.close(fd)  # releases the flock: the segment is now shippable

    def _fsync(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            fd = os.dup(self._fd)  # the same file; survives a rotation meanwhile
            self._dirty = False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- shipping ----------------------------------------------------------------------------

    def _ship_closed_segments(self) -> int:
        shipped = 0
        with self._ship_lock:
            for path in sorted(self._spool.glob(f"*{SEGMENT_SUFFIX}")):
                if path == self._segment:
                    continue
                try:
                    shipped += self._ship(path)
                except Exception as exc:  # storage down: the segment stays and is retried
                    self.write_failures += 1
                    logger.error(
                        "request log: shipping %s failed (%s); will retry", path.name, type(exc).__name__
                    )
        return shipped

    def _ship(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0  # another server shipped it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live server still writes it
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read()
            records, bad = read_segment(data)
            if bad:
                self.unreadable_lines += bad
                logger.warning("request log: %d unreadable line(s) in %s skipped", bad, path.name)
            by_day: dict[str, list[RequestLogRecord]] = {}
            for record in records:
                by_day.setdefault(record.timestamp.astimezone(UTC).strftime("%Y-%m-%d"), []).append(record)
            for day, day_records in sorted(by_day.items()):
                self._sink.put_bytes(request_log_key(day, path.stem), records_to_parquet_bytes(day_records))
                self.batches_written += 1
            path.unlink(missing_ok=True)
            self.rows_written += len(records)
            return len(records)
        finally:
            os.close(fd)

    def flush(self) -> int:
        """Rotate and ship everything logged so far; returns the rows shipped."""
        self._rotate()
        return self._ship_closed_segments()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(timeout=self._fsync_interval_s)
            self._wake.clear()
            if self._closed.is_set():
                break
            try:
                self._fsync()
                with self._lock:
                    full = bool(self._full_fds)
                    due = self._segment_rows > 0 and (
                        time.monotonic() - self._segment_opened >= self._flush_interval_s
                    )
                if due:
                    self.flush()
                elif full:
                    self._rotate(current=False)
                    self._ship_closed_segments()
            except Exception:  # never let the spool thread die
                logger.exception("request log: spool thread error")

    def close(self) -> None:
        """Stop the thread, ship what is left, remove the empty segment (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()
        with self._lock:
            os.close(self._fd)
            if self._segment is not None and self._segment_rows == 0:
                self._segment.unlink(missing_ok=True)
