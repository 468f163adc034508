"""The whole pure data chain on a messy file: every row is accounted for at every stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from llmft_assets.data.cleaning import clean_rows
from llmft_assets.data.raw_sources import iter_raw_batches
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import CONVERSATION_SCHEMA, QUARANTINE_SCHEMA, TOKENIZED_SCHEMA, StageCounts
from llmft_assets.data.splits import assign_split, find_cross_split_overlap
from llmft_assets.data.tokenization import tokenize_batch, verify_masks
from llmft_assets.data.validation import ValidationLimits, validate_rows


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from llmft_assets.modeling.tiny_model import build_tiny_tokenizer

    texts = [row["reannotated_assistant_content"] for row in generate_rows(100, schema="v0", seed=31)]
    return build_tiny_tokenizer(texts, vocab_size=700)


def test_counts_add_up_from_raw_file_to_tokens(tmp_path: Path, tokenizer: Any) -> None:
    good = generate_rows(40, schema="v0", seed=8) + generate_rows(40, schema="v1", seed=8)
    duplicate = dict(good[3], id="copy-of-3")  # same content, new id: dropped as a duplicate
    same_id = dict(good[5], problem=good[5]["problem"] + " (variant)")  # new content, same id
    no_answer = dict(good[7], id="no-answer", reannotated_assistant_content="I think it is 5.")
    bad_role = dict(good[45], id="bad-role", messages=[{"role": "robot", "content": "beep"}])
    lines = [json.dumps(row) for row in [*good, duplicate, same_id, no_answer, bad_role]]
    lines.insert(10, "{not json")
    lines.insert(20, '"just a string"')
    path = tmp_path / "drop.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    counts = {stage: StageCounts(stage=stage) for stage in ("raw", "cleaned", "validated", "tokenized")}
    seen_hashes: set[str] = set()
    seen_ids: set[str] = set()
    quarantine: list[dict[str, Any]] = []
    tokenized: list[dict[str, Any]] = []
    for batch in iter_raw_batches(str(path), batch_size=16, counts=counts["raw"]):
        quarantine += batch.quarantine
        cleaned, rejected = clean_rows(batch.rows, seen_hashes=seen_hashes, counts=counts["cleaned"])
        quarantine += rejected
        pa.Table.from_pylist(cleaned, schema=CONVERSATION_SCHEMA)
        valid, rejected = validate_rows(
            cleaned, seen_ids=seen_ids, limits=ValidationLimits(), counts=counts["validated"]
        )
        quarantine += rejected
        tokenized += tokenize_batch(valid, tokenizer, max_seq_len=1024, counts=counts["tokenized"])

    for stage_counts in counts.values():
        stage_counts.check_balanced()
    assert counts["raw"].rows_in == len(lines)
    assert counts["cleaned"].rows_in == counts["raw"].rows_out
    assert counts["validated"].rows_in == counts["cleaned"].rows_out
    assert counts["tokenized"].rows_in == counts["validated"].rows_out == len(tokenized)
    total_dropped = sum(c.quarantined + c.duplicates for c in counts.values())
    assert len(tokenized) + total_dropped == len(lines)
    assert len(quarantine) == sum(c.quarantined for c in counts.values())
    assert counts["raw"].reasons == {"malformed_json": 1, "not_an_object": 1}
    assert counts["cleaned"].reasons == {"unknown_role": 1} and counts["cleaned"].duplicates >= 1
    assert counts["validated"].reasons == {"duplicate_id": 1, "missing_answer": 1}
    pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
    pa.Table.from_pylist(tokenized, schema=TOKENIZED_SCHEMA)
    assert verify_masks(tokenized, tokenizer) == []

    by_split: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for row in tokenized:
        by_split[assign_split(row["id"], validation_fraction=0.2, test_fraction=0.2)].append(
            row["content_hash"]
        )
    assert find_cross_split_overlap(by_split) == {}
    assert all(by_split.values())


def test_max_rows_counts_only_this_read(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": str(i)}) + "\n" for i in range(10)), encoding="utf-8")
    shared = StageCounts(stage="raw")
    first = [row for batch in iter_raw_batches(str(path), max_rows=4, counts=shared) for row in batch.rows]
    second = [row for batch in iter_raw_batches(str(path), max_rows=3, counts=shared) for row in batch.rows]
    assert (len(first), len(second), shared.rows_in) == (4, 3, 7)
