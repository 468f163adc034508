"""Cleaning: both R1-Distill-SFT configs, text normalization, dedupe, and every rejection reason."""

from __future__ import annotations

import copy
from typing import Any

import pyarrow as pa
import pytest

from llmft_assets.data.cleaning import (
    always_null_columns,
    clean_rows,
    content_hash,
    normalize_text,
)
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import CONVERSATION_SCHEMA, QUARANTINE_SCHEMA, StageCounts


def clean(rows: list[dict[str, Any]], seen: set[str] | None = None) -> tuple[list, list, StageCounts]:
    counts = StageCounts(stage="cleaned")
    cleaned, quarantine = clean_rows(rows, seen_hashes=seen if seen is not None else set(), counts=counts)
    counts.check_balanced()
    pa.Table.from_pylist(cleaned, schema=CONVERSATION_SCHEMA)
    pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
    return cleaned, quarantine, counts


def v0_row(**overrides: Any) -> dict[str, Any]:
    row = {
        "id": "v0-1",
        "problem": "What is 2 + 3?",
        "reannotated_assistant_content": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is $\\boxed{5}$.",
        "source": "gsm8k",
        "solution": "Adding gives $\\boxed{\\frac{10}{2}}$.",
        "verified": None,
        "quality_metrics": None,
        "origin": "file.jsonl#0",
    }
    row.update(overrides)
    return row


def v1_row(**overrides: Any) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! \\boxed{1}"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "<think>sum</think> \\boxed{4}"},
    ]
    row = {
        "id": "v1-1",
        "reannotated_assistant_content": "unused",
        "source": "numina_math",
        "reannotated_messages": None,
        "messages": messages,
        "source_dataset": "ai2-adapt-dev/openmath-2-math",
        "verified": None,
        "quality_metrics": None,
        "origin": "file.jsonl#1",
    }
    row.update(overrides)
    return row


def test_v0_row_maps_to_user_and_assistant_with_the_solution_answer() -> None:
    (conversation,), quarantine, counts = clean([v0_row()])
    assert quarantine == []
    assert conversation["messages"] == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is $\\boxed{5}$."},
    ]
    assert conversation["schema_version"] == "v0"
    assert conversation["reference_answer"] == "\\frac{10}{2}"  # balanced braces
    assert conversation["source"] == "gsm8k"
    assert conversation["source_dataset"] == "ServiceNow-AI/R1-Distill-SFT"
    assert conversation["origin"] == "file.jsonl#0"
    assert conversation["content_hash"] == content_hash(conversation["messages"])
    assert "verified" not in conversation and "quality_metrics" not in conversation
    assert set(always_null_columns(counts)) == {"verified", "quality_metrics"}


def test_v1_row_keeps_messages_and_takes_the_last_assistant_answer() -> None:
    (conversation,), _, _ = clean([v1_row()])
    assert [message["role"] for message in conversation["messages"]] == [
        "system", "user", "assistant", "user", "assistant",
    ]  # fmt: skip
    assert conversation["schema_version"] == "v1"
    assert conversation["reference_answer"] == "4"
    assert conversation["source_dataset"] == "ai2-adapt-dev/openmath-2-math"


def test_v1_falls_back_to_reannotated_messages_and_can_prefer_them() -> None:
    reannotated = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>r</think> \\boxed{7}"},
    ]
    (conversation,), _, _ = clean([v1_row(messages=None, reannotated_messages=reannotated)])
    assert conversation["messages"] == reannotated
    counts = StageCounts(stage="cleaned")
    (preferred,), _ = clean_rows(
        [v1_row(reannotated_messages=reannotated)], seen_hashes=set(), counts=counts, prefer_reannotated=True
    )
    assert preferred["messages"] == reannotated


def test_text_normalization() -> None:
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("Cafe\u0301") == "Caf\u00e9"  # NFC
    assert normalize_text("x\x00y\x07z\x1b\x7f\u0085w\tq") == "xyzw\tq"  # tab kept
    assert normalize_text("line   \nnext\t\n") == "line\nnext"
    assert normalize_text("a\n\n\n\n\n\nb") == "a\n\n\nb"  # at most two blank lines
    assert normalize_text("a\n\n\nb") == "a\n\n\nb"
    assert normalize_text("  padded  ") == "padded"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a \x01\nb", "a\nb"),  # removing a control character leaves a trailing space to remove
        ("a\n \n\n\nb", "a\n\n\nb"),  # removing a trailing space leaves a blank-line run
        ("a\n\x02\n\n\nb", "a\n\n\nb"),  # removing a control character leaves one too
        ("é \t\nx\x85\n\n\n\ny", "é\nx\n\n\ny"),  # non-ASCII: C1 control, tab before newline
        ("plain ascii\twith tab\nand lines", "plain ascii\twith tab\nand lines"),  # nothing to do
        ("x\x7f\ty", "x\ty"),
    ],
)
def test_normalize_text_substring_shortcuts_give_the_regex_result(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_normalized_variants_are_duplicates_across_batches() -> None:
    seen: set[str] = set()
    first, _, _ = clean([v0_row()], seen)
    variant = v0_row(id="v0-2", problem="What is 2 + 3?   \r\n", origin="other#9")
    second, quarantine, counts = clean([variant, v0_row(id="v0-3", problem="Different?")], seen)
    assert len(first) == 1 and [row["id"] for row in second] == ["v0-3"]
    assert counts.duplicates == 1 and counts.rows_in == 2 and quarantine == []


@pytest.mark.parametrize(
    ("row", "reason_code", "detail"),
    [
        ({"id": "x", "text": "hello"}, "unknown_schema", "got columns ['id', 'text']"),
        (v0_row(problem=None), "missing_value", "problem is null"),
        (
            {k: v for k, v in v0_row().items() if k != "reannotated_assistant_content"},
            "missing_column",
            "reannotated_assistant_content",
        ),
        ({k: v for k, v in v0_row().items() if k != "id"}, "missing_column", "id"),
        (v0_row(id=""), "empty_id", "empty"),
        (v0_row(id=["a"]), "wrong_type", "id is list"),
        (v0_row(problem=42), "wrong_type", "problem is int"),
        (v0_row(solution=3.5), "wrong_type", "solution is float"),
        (v0_row(source={"a": 1}), "wrong_type", "source is dict"),
        (v1_row(messages="user: hi"), "wrong_type", "messages is str, expected a list"),
        (v1_row(messages=[]), "empty_messages", "empty list"),
        (v1_row(messages=["hi"]), "wrong_type", "messages[0] is str"),
        (v1_row(messages=[{"role": "user", "content": 5}]), "wrong_type", "messages[0].content is int"),
        (v1_row(messages=[{"role": None, "content": "x"}]), "wrong_type", "messages[0].role is null"),
        (v1_row(messages=[{"role": "tool", "content": "x"}]), "unknown_role", "'tool'"),
        (v1_row(messages=None, reannotated_messages=None), "missing_value", "both messages"),
    ],
)
def test_rejections_have_precise_reasons(row: dict[str, Any], reason_code: str, detail: str) -> None:
    cleaned, (quarantined,), counts = clean([row, v0_row(id="fine", problem="another problem")])
    assert [c["id"] for c in cleaned] == ["fine"]
    assert quarantined["reason"].startswith(reason_code + ":"), quarantined["reason"]
    assert detail in quarantined["reason"]
    assert quarantined["stage"] == "cleaned"
    assert counts.reasons == {reason_code: 1}
    assert quarantined["payload"] is not None


def test_non_dict_row_and_integer_id() -> None:
    cleaned, quarantine, _ = clean(["not a row", v0_row(id=17)])  # type: ignore[list-item]
    assert [row["id"] for row in cleaned] == ["17"]
    assert quarantine[0]["reason"].startswith("wrong_type: row is str")
    assert quarantine[0]["origin"] == "unknown"


def test_role_names_are_case_and_space_insensitive() -> None:
    row = v1_row(messages=[{"role": " User", "content": "q?"}, {"role": "ASSISTANT", "content": "a"}])
    (conversation,), _, _ = clean([row])
    assert [message["role"] for message in conversation["messages"]] == ["user", "assistant"]


def test_payload_is_truncated_for_huge_rows() -> None:
    _, (quarantined,), _ = clean([v0_row(problem=7, reannotated_assistant_content="x" * 50_000)])
    assert len(quarantined["payload"]) < 2200 and "truncated" in quarantined["payload"]


def test_input_rows_are_not_mutated() -> None:
    rows = generate_rows(3, schema="v1", seed=9)
    before = copy.deepcopy(rows)
    clean(rows)
    assert rows == before


def test_generated_stream_counts_add_up_over_batches() -> None:
    rows = generate_rows(300, schema="v0", seed=4) + generate_rows(300, schema="v1", seed=4)
    rows += copy.deepcopy(rows[:50])  # exact repeats
    rows.insert(10, {"id": "junk"})
    seen: set[str] = set()
    total = StageCounts(stage="cleaned")
    out = 0
    for start in range(0, len(rows), 128):
        counts = StageCounts(stage="cleaned")
        cleaned, _ = clean_rows(rows[start : start + 128], seen_hashes=seen, counts=counts)
        counts.check_balanced()
        total.merge(counts)
        out += len(cleaned)
    total.check_balanced()
    assert total.rows_in == 651 and total.rows_out == out
    assert total.duplicates >= 50 and total.quarantined == 1
    assert len(seen) == out
