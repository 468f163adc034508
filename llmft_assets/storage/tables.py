"""Parquet tables written and read in row groups, so a dataset larger than memory streams through."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetSink:
    """Appends batches of rows (dicts) to one Parquet file; always leaves a valid file, even when empty."""

    def __init__(self, path: Path, schema: pa.Schema, *, compression: str = "zstd"):
        self.path = Path(path)
        self.schema = schema
        self.rows_written = 0
        self._compression = compression
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, schema, compression=compression)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def write_table(self, table: pa.Table) -> None:
        if self._writer is None:
            raise ValueError(f"{self.path} is already closed")
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows_written += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_parquet(source: Any) -> pq.ParquetFile:
    """A Parquet file to stream batch by batch in bounded memory.

    pyarrow's default `pre_buffer=True` keeps every column chunk it has read ahead until the reader is
    done: streaming a file then holds about the file's size in memory (measured: +390 MB for a 240 MB
    tokenized table of 200k rows, flat without it). Local files and our row groups gain nothing from it."""
    return pq.ParquetFile(source, pre_buffer=False)


def iter_parquet_batches(
    path: Path, *, batch_size: int = 2048, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    parquet = open_parquet(path)
    yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def iter_parquet_rows(
    path: Path, *, batch_size: int = 2048, columns: list[str] | None = None
) -> Iterator[list[dict[str, Any]]]:
    for batch in iter_parquet_batches(path, batch_size=batch_size, columns=columns):
        yield batch.to_pylist()


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows
