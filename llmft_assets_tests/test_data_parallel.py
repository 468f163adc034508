"""Parallel tokenization: the worker pool and the Arrow fast path give exactly what the serial path gave.

`reference_tokenize_batch` is the serial implementation as it was before the fast path (per-row Python
lists, `Table.from_pylist`), kept here as the oracle: ids, labels and counts must not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from llmft_assets.data.cleaning import clean_rows
from llmft_assets.data.parallel import (
    iter_tokenized_batches,
    iter_tokenized_tables,
    load_tokenizer,
    resolve_workers,
)
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import CONVERSATION_COLUMNS, IGNORE_INDEX, TOKENIZED_SCHEMA, StageCounts
from llmft_assets.data.tokenization import (
    assistant_char_spans,
    assistant_end_marker,
    tokenize_batch,
    tokenize_to_table,
    verify_masks,
)
from llmft_assets_tests.test_data_tokenization import conversation


def reference_tokenize_batch(
    rows: list[dict[str, Any]], tokenizer: Any, *, max_seq_len: int, counts: StageCounts
) -> list[dict[str, Any]]:
    """The serial path before the numpy/Arrow fast path: one encoding per row, labels as Python lists."""
    texts, spans = assistant_char_spans(rows, tokenizer, assistant_end_marker(tokenizer))
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    out = []
    for row, row_spans, encoding in zip(rows, spans, encodings, strict=True):
        input_ids = encoding.ids
        labels = [IGNORE_INDEX] * len(input_ids)
        for start, end in row_spans:
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            labels[first : last + 1] = input_ids[first : last + 1]
        truncated = len(input_ids) > max_seq_len
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        assistant = len(input_ids) - labels.count(IGNORE_INDEX)
        out.append(
            {column: row.get(column) for column in CONVERSATION_COLUMNS}
            | {
                "input_ids": input_ids,
                "labels": labels,
                "num_tokens": len(input_ids),
                "num_assistant_tokens": assistant,
                "truncated": truncated,
            }
        )
        counts.extra["tokens"] += len(input_ids)
        counts.extra["assistant_tokens"] += assistant
        counts.extra["truncated"] += truncated
        counts.extra["no_assistant_tokens"] += assistant == 0
    counts.rows_in += len(rows)
    counts.rows_out += len(out)
    return out


EDGE_ROWS = [
    conversation(
        [
            ("system", "You add numbers."),
            ("user", "What is 2 + 2?"),
            ("assistant", "<think>\n2 + 2 = 4\n</think>\n\nThe answer is \\boxed{4}."),
            ("user", "And 10 + 5?"),
            ("assistant", "<think>10 + 5 = 15</think> So \\boxed{15}."),
            ("user", "Thanks, café ☕!"),
            ("assistant", "You're welcome — 🙂"),
        ],
        "multi-turn",
    ),
    conversation([("user", "Q1?"), ("assistant", "A1 \\boxed{1}"), ("user", "Q2?")], "trailing-user"),
    conversation([("user", "What is 3 * 3?"), ("assistant", "<think>3 * 3 = 9</think> \\boxed{9}")], "one"),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmft_assets.modeling.tiny_model import build_tiny_tokenizer

    rows = generate_rows(150, schema="v0", seed=21)
    texts = [row["problem"] + "\n" + row["reannotated_assistant_content"] for row in rows]
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(texts, vocab_size=800).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    # What the workers load: the same directory, through the same loader.
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    raw = generate_rows(60, schema="v0", seed=5) + generate_rows(60, schema="v1", seed=5)
    cleaned, _ = clean_rows(
        raw, seen_hashes=set(), counts=StageCounts(stage="cleaned"), prefer_reannotated=True
    )
    return EDGE_ROWS + cleaned


def batches_of(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def reference_table(
    rows: list[dict[str, Any]], tokenizer: Any, max_seq_len: int
) -> tuple[pa.Table, StageCounts]:
    counts = StageCounts(stage="tokenized")
    reference = reference_tokenize_batch(rows, tokenizer, max_seq_len=max_seq_len, counts=counts)
    return pa.Table.from_pylist(reference, schema=TOKENIZED_SCHEMA), counts


@pytest.mark.parametrize("max_seq_len", [4096, 300, 3])
def test_fast_paths_equal_the_reference(rows: list[dict[str, Any]], tokenizer: Any, max_seq_len: int) -> None:
    expected, expected_counts = reference_table(rows, tokenizer, max_seq_len)
    if max_seq_len == 300:
        assert 0 < sum(expected["truncated"].to_pylist()) < len(rows)  # some cut, some not
    row_counts, table_counts, arrow_counts = (StageCounts(stage="tokenized") for _ in range(3))
    as_rows = tokenize_batch(rows, tokenizer, max_seq_len=max_seq_len, counts=row_counts)
    assert as_rows == expected.to_pylist()
    assert all(type(token) is int for token in as_rows[0]["input_ids"] + as_rows[0]["labels"])
    table = tokenize_to_table(rows, tokenizer, max_seq_len=max_seq_len, counts=table_counts)
    assert table.schema == TOKENIZED_SCHEMA and table.equals(expected)
    # Arrow input (a Parquet row group): the conversation columns pass through untouched.
    from_arrow = tokenize_to_table(
        pa.Table.from_pylist(rows).to_batches()[0], tokenizer, max_seq_len=max_seq_len, counts=arrow_counts
    )
    assert from_arrow.equals(expected)
    assert row_counts == table_counts == arrow_counts == expected_counts
    if max_seq_len == 4096:
        # verify_masks expects every sequence to end with an assistant turn's end marker.
        assert verify_masks([row for row in as_rows if row["id"] != "trailing-user"], tokenizer) == []


def test_multi_turn_masks_survive_the_fast_path(tokenizer: Any) -> None:
    table = tokenize_to_table(EDGE_ROWS, tokenizer, max_seq_len=4096)
    multi, trailing, _ = table.to_pylist()
    runs = [
        tokenizer.decode([token for token in run if token != IGNORE_INDEX], skip_special_tokens=False)
        for run in _runs(multi["labels"])
    ]
    assert runs == ["<think>\n2 + 2 = 4\n</think>\n\nThe answer is \\boxed{4}.<|im_end|>",
                    "<think>10 + 5 = 15</think> So \\boxed{15}.<|im_end|>",
                    "You're welcome — 🙂<|im_end|>"]  # fmt: skip
    assert (
        tokenizer.decode(trailing["input_ids"], skip_special_tokens=False).rstrip().endswith("Q2?<|im_end|>")
    )


def _runs(labels: list[int]) -> Iterator[list[int]]:
    run: list[int] = []
    for label in labels:
        if label == IGNORE_INDEX:
            if run:
                yield run
            run = []
        else:
            run.append(label)
    if run:
        yield run


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_keeps_order_and_equals_the_reference(
    rows: list[dict[str, Any]], tokenizer: Any, tokenizer_dir: Path, workers: int
) -> None:
    expected, expected_counts = reference_table(rows, tokenizer, 300)
    batches: list[Any] = batches_of(rows, 11)
    batches.insert(3, [])  # an empty batch keeps its place and costs no worker round trip
    batches[5] = pa.Table.from_pylist(batches[5])  # Arrow batches mix with dict batches
    counts = StageCounts(stage="tokenized")
    tables = []
    for table, delta in iter_tokenized_tables(
        batches, tokenizer_dir, max_seq_len=300, workers=workers, max_in_flight=3
    ):
        tables.append(table)
        counts.merge(delta)
    assert [table.num_rows for table in tables] == [len(batch) for batch in batches]
    assert pa.concat_tables(tables).equals(expected)
    assert counts == expected_counts
    counts.check_balanced()


def test_row_batches_come_back_as_tokenize_batch_rows(
    rows: list[dict[str, Any]], tokenizer: Any, tokenizer_dir: Path
) -> None:
    expected = tokenize_batch(rows[:30], tokenizer, max_seq_len=512)
    got = [
        row
        for batch, _ in iter_tokenized_batches(
            batches_of(rows[:30], 8), tokenizer_dir, max_seq_len=512, workers=2
        )
        for row in batch
    ]
    assert got == expected


def test_input_is_pulled_lazily_with_a_bounded_number_in_flight(
    rows: list[dict[str, Any]], tokenizer_dir: Path
) -> None:
    pulled: list[int] = []

    def produce() -> Iterator[list[dict[str, Any]]]:
        for index, batch in enumerate(batches_of(rows[:40], 4)):
            pulled.append(index)
            yield batch

    results = iter_tokenized_tables(produce(), tokenizer_dir, max_seq_len=256, workers=2, max_in_flight=2)
    next(results)
    assert len(pulled) == 2  # batches 0 and 1 submitted, 0 yielded: nothing read ahead beyond that
    next(results)
    assert len(pulled) == 3
    results.close()  # stopping early shuts the pool down instead of tokenizing the rest
    assert len(pulled) == 3


def test_a_worker_error_is_raised_at_its_batch(rows: list[dict[str, Any]], tokenizer_dir: Path) -> None:
    broken = dict(rows[0], id="broken", messages=[])
    batches = [rows[:5], [rows[5], broken], rows[6:10]]
    results = iter_tokenized_tables(batches, tokenizer_dir, max_seq_len=256, workers=2)
    first, _ = next(results)
    assert first.num_rows == 5
    with pytest.raises(ValueError, match="'broken': messages must be a non-empty list"):
        next(results)


def test_bad_arguments(tokenizer_dir: Path) -> None:
    assert resolve_workers(None) == resolve_workers(0) >= 1
    assert resolve_workers(3) == 3
    with pytest.raises(ValueError, match="workers"):
        resolve_workers(-1)
    with pytest.raises(ValueError, match="max_in_flight"):
        next(iter_tokenized_tables([[]], tokenizer_dir, max_seq_len=8, workers=2, max_in_flight=0))
    with pytest.raises(ValueError, match="max_seq_len"):
        next(iter_tokenized_tables([[]], tokenizer_dir, max_seq_len=0, workers=2))
