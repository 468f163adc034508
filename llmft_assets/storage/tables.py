"""Parquet tables written and read in row groups, so a dataset larger than memory streams through."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetSink:
    """Appends batches of rows (dicts) to one Parquet file; always leaves a valid file, even when empty.

    With ``background`` (the default) each table is encoded and compressed on a writer thread (Arrow
    releases the GIL there) while the caller prepares the next batch; at most one table is in flight,
    tables are written in the order given, and a write's error is raised by the next `write_table` or by
    `close`."""

    def __init__(self, path: Path, schema: pa.Schema, *, compression: str = "zstd", background: bool = True):
        self.path = Path(path)
        self.schema = schema
        self.rows_written = 0
        self._compression = compression
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, schema, compression=compression)
        self._thread = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-sink") if background else None
        )
        self._in_flight: Future[None] | None = None

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def write_table(self, table: pa.Table) -> None:
        if self._writer is None:
            raise ValueError(f"{self.path} is already closed")
        if table.num_rows:
            table = table.select(self.schema.names).cast(self.schema)
            self._finish_in_flight()
            if self._thread is None:
                self._writer.write_table(table)
            else:
                self._in_flight = self._thread.submit(self._writer.write_table, table)
            self.rows_written += table.num_rows

    def _finish_in_flight(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._finish_in_flight()
            finally:
                self._writer.close()
                self._writer = None
                if self._thread is not None:
                    self._thread.shutdown()

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def iter_parquet_batches(
    path: Path, *, batch_size: int = 2048, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(path)
    yield from parquet.iter_batches(batch_size=batch_size, columns=columns)


def iter_parquet_rows(
    path: Path, *, batch_size: int = 2048, columns: list[str] | None = None
) -> Iterator[list[dict[str, Any]]]:
    for batch in iter_parquet_batches(path, batch_size=batch_size, columns=columns):
        yield batch.to_pylist()


def count_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows
