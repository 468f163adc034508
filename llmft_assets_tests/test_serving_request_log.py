"""The request log: a crash-safe local spool shipped as batched, atomic, day-partitioned Parquet
objects in the storage root (the SIGKILL recovery is in test_serving_hardening.py)."""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from llmft_assets.serving.request_log import (
    REQUEST_LOG_SCHEMA,
    RequestLogRecord,
    SpooledRequestLogWriter,
    read_request_logs,
)
from llmft_assets.storage import open_storage


def record(index: int, when: datetime | None = None) -> RequestLogRecord:
    return RequestLogRecord(
        request_id=f"req-{index}",
        timestamp=when or datetime.now(UTC),
        model="llmft-chat",
        model_version="v1",
        prompt=f"prompt {index}",
        messages_json='[{"role": "user", "content": "prompt"}]',
        response=f"answer {index}",
        prompt_tokens=10 + index,
        completion_tokens=index,
        latency_ms=12.5,
        finish_reason="stop",
        stream=index % 2 == 0,
    )


def test_size_trigger_writes_whole_batches_with_the_schema(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    writer = SpooledRequestLogWriter(storage, tmp_path / "spool", max_batch_rows=4, flush_interval_s=3600)
    try:
        for i in range(8):
            writer.log(record(i))
        deadline = time.monotonic() + 10
        while writer.rows_written < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        keys = storage.list("request_logs/")
        assert writer.rows_written == 8 and len(keys) == 2
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        assert all(key.startswith(f"request_logs/date={day}/") and key.endswith(".parquet") for key in keys)
        table = pq.read_table(io.BytesIO(storage.get_bytes(keys[0])))
        assert table.schema.equals(REQUEST_LOG_SCHEMA, check_metadata=False)
        assert table.num_rows == 4
    finally:
        writer.close()


def test_interval_and_close_flush_everything(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    writer = SpooledRequestLogWriter(storage, tmp_path / "spool", max_batch_rows=1000, flush_interval_s=0.2)
    writer.log(record(1))
    deadline = time.monotonic() + 10
    while writer.rows_written < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.rows_written == 1  # written by the interval, not by size
    writer.log(record(2))
    writer.close()  # the shutdown flush
    table = read_request_logs(storage)
    assert sorted(table.column("request_id").to_pylist()) == ["req-1", "req-2"]
    with pytest.raises(RuntimeError, match="closed"):
        writer.log(record(3))


def test_rows_are_partitioned_by_their_own_day(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    writer = SpooledRequestLogWriter(storage, tmp_path / "spool", max_batch_rows=100, flush_interval_s=3600)
    yesterday = datetime(2030, 1, 1, 23, 59, tzinfo=UTC)
    writer.log(record(1, yesterday))
    writer.log(record(2, yesterday + timedelta(minutes=2)))
    writer.close()
    assert read_request_logs(storage, day="2030-01-01").num_rows == 1
    assert read_request_logs(storage, day="2030-01-02").num_rows == 1


class FlakySink:
    """Fails the first write, then stores in memory (a storage outage that recovers)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.calls = 0

    def put_bytes(self, key: str, data: bytes) -> None:
        self.calls += 1
        if self.calls == 1:
            raise ConnectionError("storage unavailable")
        self.objects[key] = data


def test_failed_write_keeps_rows_for_the_next_flush(tmp_path) -> None:
    sink = FlakySink()
    writer = SpooledRequestLogWriter(sink, tmp_path / "spool", max_batch_rows=100, flush_interval_s=3600)
    writer.log(record(1))
    assert writer.flush() == 0 and writer.pending_rows() == 1 and writer.write_failures == 1
    assert writer.flush() == 1 and writer.pending_rows() == 0
    writer.close()
    (data,) = sink.objects.values()
    assert pq.read_table(io.BytesIO(data)).column("request_id").to_pylist() == ["req-1"]


def test_concurrent_loggers_lose_nothing(tmp_path) -> None:
    storage = open_storage(str(tmp_path))
    writer = SpooledRequestLogWriter(storage, tmp_path / "spool", max_batch_rows=7, flush_interval_s=0.05)
    threads = [
        threading.Thread(target=lambda t=t: [writer.log(record(t * 100 + i)) for i in range(50)])
        for t in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    ids = read_request_logs(storage).column("request_id").to_pylist()
    assert len(ids) == 200 and len(set(ids)) == 200
    # No temp files are left behind: every object is a complete Parquet file.
    assert all(key.endswith(".parquet") for key in storage.list("request_logs/"))


def test_naive_timestamps_are_rejected_at_log_time(tmp_path) -> None:
    writer = SpooledRequestLogWriter(
        FlakySink(), tmp_path / "spool", max_batch_rows=10, flush_interval_s=3600
    )
    with pytest.raises(ValueError, match="timezone-aware"):
        writer.log(record(1, datetime(2030, 1, 1)))
    assert writer.pending_rows() == 0
    writer.close()
