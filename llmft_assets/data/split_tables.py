"""dataset_splits over Arrow: the leak-free plan from the prompts, then each split written by filtering
the tokenized table batch by batch. No row and no token list becomes a Python object; only each row's
first user turn does (the MinHash index needs the text), and the plan holds one int8 per row.

Memory: one Parquet batch (``batch_size`` rows) at a time plus 1 byte a row for the assignments and the
evaluation rows' MinHash index (`plan_leak_free_splits`); the token columns are never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmft_assets.data.splits import SPLITS, SplitPlan, SplitSettings, plan_leak_free_splits
from llmft_assets.storage.tables import ParquetSink, open_parquet

SPLIT_BATCH_ROWS = 2048


def first_user_turns(messages: pa.Array | pa.ChunkedArray) -> list[str]:
    """Per row of a ``list<struct<role, content>>`` column, the content of its first user message ("" if
    none), as `splits.first_user_turn` gives for the same row, computed in Arrow."""
    if isinstance(messages, pa.ChunkedArray):
        messages = messages.combine_chunks()
    turns = np.full(len(messages), "", dtype=object)
    flat = pc.list_flatten(messages)
    is_user = pc.fill_null(pc.equal(flat.field("role"), "user"), False)
    user_rows = pc.filter(pc.list_parent_indices(messages), is_user).to_numpy()
    if len(user_rows):
        # Parent indices ascend, so the first index of each row is its first user message.
        rows, first = np.unique(user_rows, return_index=True)
        contents = pc.fill_null(pc.filter(flat.field("content"), is_user).take(pa.array(first)), "")
        turns[rows] = contents.to_numpy(zero_copy_only=False)
    return turns.tolist()


@dataclass
class SplitResult:
    plan: SplitPlan
    rows: dict[str, int]
    tokens: dict[str, int]


def _prompt_batches(data_file: Path, batch_size: int) -> Iterator[list[tuple[str, str]]]:
    parquet = open_parquet(data_file)
    for batch in parquet.iter_batches(batch_size=batch_size, columns=["id", "messages"]):
        ids = batch.column("id").to_pylist()
        yield list(zip(ids, first_user_turns(batch.column("messages")), strict=True))


def write_splits(
    data_file: Path,
    out_paths: Mapping[str, Path],
    schema: pa.Schema,
    settings: SplitSettings,
    *,
    batch_size: int = SPLIT_BATCH_ROWS,
) -> SplitResult:
    """Plan the leak-free splits of the tokenized table in `data_file` and write each split's rows, in
    input order, to ``out_paths[split]`` (a Parquet file in `schema`)."""
    plan = plan_leak_free_splits(
        lambda: _prompt_batches(data_file, batch_size),
        validation_fraction=settings.validation_fraction,
        test_fraction=settings.test_fraction,
        salt=settings.salt,
        threshold=settings.near_duplicate_jaccard,
    )
    code_of = {split: code for code, split in enumerate(SPLITS)}
    codes = np.fromiter(
        (code_of[split] for split in plan.assignments), dtype=np.int8, count=len(plan.assignments)
    )
    tokens = dict.fromkeys(SPLITS, 0)
    sinks = {split: ParquetSink(out_paths[split], schema) for split in SPLITS}
    position = 0
    try:
        for batch in open_parquet(data_file).iter_batches(batch_size=batch_size):
            batch_codes = codes[position : position + batch.num_rows]
            if len(batch_codes) != batch.num_rows:
                raise ValueError(f"{data_file} has more rows than the split plan ({len(codes)})")
            position += batch.num_rows
            table = pa.Table.from_batches([batch])
            for split, code in code_of.items():
                rows = table.filter(pa.array(batch_codes == code))
                sinks[split].write_table(rows)
                tokens[split] += int(pc.sum(rows.column("num_tokens")).as_py() or 0)
    finally:
        for sink in sinks.values():
            sink.close()
    if position != len(codes):
        raise ValueError(f"{data_file} has {position} rows, the split plan {len(codes)}")
    return SplitResult(plan=plan, rows={split: sinks[split].rows_written for split in SPLITS}, tokens=tokens)
