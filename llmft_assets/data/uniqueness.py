"""Exact uniqueness of a Parquet column, computed in Arrow.

Memory: the column's own Arrow buffers (for ids, their bytes plus 4 bytes a row) and Arrow's hash table
of its distinct values, no Python object per row (a ``Counter`` of ids costs about 200 bytes a row).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq


def duplicated_values(path: Path, column: str, *, max_examples: int = 10) -> tuple[int, int, list[str]]:
    """(rows, number of values that occur more than once, up to `max_examples` of them, sorted)."""
    values = pq.read_table(path, columns=[column]).column(column)
    counts = pc.value_counts(values)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    examples = sorted(repeated.to_pylist(), key=str)[:max_examples] if len(repeated) else []
    return len(values), len(repeated), examples
