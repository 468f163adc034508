"""Streaming a Parquet table holds one batch at a time, not the file (bounded memory in the data chain)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llmft_assets.storage.tables import iter_parquet_batches

ROW_GROUPS = 40
ROW_GROUP_BYTES = 1 << 20


def _incompressible_table(path: Path) -> None:
    rows = 64
    with pq.ParquetWriter(path, pa.schema([("blob", pa.binary())]), compression="zstd") as writer:
        for _ in range(ROW_GROUPS):
            blobs = [os.urandom(ROW_GROUP_BYTES // rows) for _ in range(rows)]
            writer.write_table(pa.table({"blob": pa.array(blobs, pa.binary())}))


def _peak_arrow_bytes(batches: Iterator[pa.RecordBatch]) -> tuple[int, int]:
    before = pa.total_allocated_bytes()
    peak = rows = 0
    for batch in batches:
        rows += batch.num_rows
        peak = max(peak, pa.total_allocated_bytes() - before)
        del batch
    return peak, rows


def test_streaming_a_table_holds_about_one_batch_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    _incompressible_table(path)
    peak, rows = _peak_arrow_bytes(iter_parquet_batches(path, batch_size=64))
    assert rows == ROW_GROUPS * 64
    assert peak < 8 * ROW_GROUP_BYTES, peak  # a batch and its decoding buffers (measured: 4 MB)
    # The planted defect: pyarrow's default read-ahead keeps every chunk read so far (the file's size: 45 MB).
    eager_peak, _ = _peak_arrow_bytes(pq.ParquetFile(path).iter_batches(batch_size=64))
    assert eager_peak > ROW_GROUPS * ROW_GROUP_BYTES // 2, eager_peak
