"""The reference side of a drift comparison: what the model was trained on (the train split's prompts and
responses), sampled deterministically so a split bigger than memory works too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from llmft_assets.storage.tables import count_rows, iter_parquet_batches


def sample_indices(total: int, limit: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a deterministic sample of `limit` rows out of `total`, or None to keep all."""
    if total <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def sample_table(table: pa.Table, limit: int, seed: int) -> pa.Table:
    keep = sample_indices(table.num_rows, limit, seed)
    return table if keep is None else table.take(pa.array(keep, type=pa.int64()))


def reference_from_train_split(train_path: Path, *, max_rows: int, seed: int = 0) -> pa.Table:
    """(prompt, response) of the train split's conversations, streamed in row groups and sampled
    deterministically to at most `max_rows` rows."""
    from llmft_assets.monitoring.drift import reference_from_conversations

    keep = sample_indices(count_rows(train_path), max_rows, seed)
    parts: list[pa.Table] = []
    offset = 0
    for batch in iter_parquet_batches(train_path, columns=["messages"]):
        if keep is None:
            rows = pa.Table.from_batches([batch])
        else:
            wanted = keep[(keep >= offset) & (keep < offset + batch.num_rows)] - offset
            rows = pa.Table.from_batches([batch]).take(pa.array(wanted, type=pa.int64()))
        offset += batch.num_rows
        if rows.num_rows:
            parts.append(reference_from_conversations(rows))
    if not parts:
        return pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())})
    return pa.concat_tables(parts)
