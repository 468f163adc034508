"""Validation rules, limits and the duplicate-id rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from llmft_assets.data.schema import QUARANTINE_SCHEMA, StageCounts
from llmft_assets.data.validation import (
    ValidationLimits,
    role_order_problem,
    think_balance_problem,
    validate_rows,
)


def conversation(
    turns: list[tuple[str, str]], *, row_id: str = "c1", reference: str | None = "4"
) -> dict[str, Any]:
    return {
        "id": row_id,
        "messages": [{"role": role, "content": content} for role, content in turns],
        "source": "test",
        "source_dataset": "test",
        "schema_version": "v1",
        "reference_answer": reference,
        "content_hash": row_id,
        "origin": f"test#{row_id}",
    }


GOOD = [("user", "What is 2 + 2?"), ("assistant", "<think>2 + 2 = 4</think> So \\boxed{4}.")]


def validate(
    rows: list[dict[str, Any]], limits: ValidationLimits | None = None, seen: set[str] | None = None
):
    counts = StageCounts(stage="validated")
    valid, quarantine = validate_rows(
        rows, seen_ids=seen if seen is not None else set(), limits=limits or ValidationLimits(), counts=counts
    )
    counts.check_balanced()
    pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
    return valid, quarantine, counts


def reason_of(row: dict[str, Any], limits: ValidationLimits | None = None) -> str:
    valid, quarantine, _ = validate([row], limits)
    assert valid == [] and len(quarantine) == 1
    assert quarantine[0]["stage"] == "validated" and quarantine[0]["origin"] == row["origin"]
    return quarantine[0]["reason"]


def test_good_conversations_pass() -> None:
    multi = [("system", "Be brief."), *GOOD, ("user", "And 3+3?"), ("assistant", "\\boxed{6}")]
    valid, quarantine, counts = validate(
        [
            conversation(GOOD),
            conversation(multi, row_id="c2", reference="6"),
            conversation(GOOD, row_id="c3", reference=None),
        ]
    )
    assert len(valid) == 3 and quarantine == [] and counts.rows_out == 3


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["user", "assistant"], None),
        (["system", "user", "assistant", "user", "assistant"], None),
        ([], "no turns"),
        (["system"], "only a system turn"),
        (["assistant", "user"], "turn 0 is assistant, expected user"),
        (["user", "user", "assistant"], "turn 1 is user, expected assistant"),
        (["user", "assistant", "user"], "ends with a user turn"),
        (["user", "system", "assistant"], "system turn at position 1"),
        (["system", "system", "user", "assistant"], "system turn at position 1"),
    ],
)
def test_role_order(roles: list[str], expected: str | None) -> None:
    problem = role_order_problem(roles)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith("role_order:") and expected in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think> b", None),
        ("no tags at all", None),
        ("<think>a</think><think>b</think>", None),
        ("<think>never closed", "never closed"),
        ("</think> before", "without <think>"),
        ("<think><think>x</think></think>", "nested"),
    ],
)
def test_think_balance(text: str, expected: str | None) -> None:
    problem = think_balance_problem(text)
    assert (problem is None) if expected is None else (expected in (problem or ""))


def test_each_rule_quarantines_with_its_code() -> None:
    assert reason_of(conversation([("assistant", "\\boxed{4}"), ("user", "hello there")])).startswith(
        "role_order:"
    )
    assert reason_of(conversation([("user", "   "), ("assistant", "fine answer \\boxed{4}")])).startswith(
        "empty_turn:"
    )
    assert reason_of(conversation([("user", "What?"), ("assistant", "<think>open \\boxed{4}")])).startswith(
        "unbalanced_think: turn 1"
    )
    assert reason_of(conversation([("user", "Q"), ("assistant", "\\boxed{4}")])).startswith("too_short:")
    huge = conversation([("user", "Q" * 70_000), ("assistant", "\\boxed{4}")])
    assert reason_of(huge).startswith("too_long: 70009 characters")
    no_box = conversation([("user", "What is 2 + 2?"), ("assistant", "It is four, clearly.")])
    assert reason_of(no_box).startswith("missing_answer:")
    many = conversation([("user", "question?"), ("assistant", "\\boxed{4}")] * 3)
    assert reason_of(many, ValidationLimits(max_turns=4)).startswith("too_many_turns:")
    broken = conversation(GOOD)
    broken["messages"] = "not a list"
    assert reason_of(broken).startswith("wrong_type:")


def test_all_problems_are_listed() -> None:
    reason = reason_of(conversation([("assistant", "<think>"), ("user", "")]))
    assert reason.startswith("role_order:")
    for code in ("empty_turn:", "unbalanced_think:", "too_short:", "missing_answer:"):
        assert code in reason


def test_limits_can_switch_rules_off() -> None:
    no_box = conversation([("user", "What is 2 + 2?"), ("assistant", "<think>open, it is four")])
    limits = ValidationLimits(require_answer=False, require_balanced_think=False)
    valid, _, _ = validate([no_box], limits)
    assert len(valid) == 1


def test_duplicate_ids_across_batches_and_broken_rows_do_not_claim_ids() -> None:
    seen: set[str] = set()
    broken_first = conversation([("user", "   "), ("assistant", "\\boxed{4}")], row_id="dup")
    valid, quarantine, _ = validate([broken_first, conversation(GOOD, row_id="dup")], seen=seen)
    assert [row["id"] for row in valid] == ["dup"] and quarantine[0]["reason"].startswith("empty_turn")
    valid, quarantine, counts = validate(
        [conversation(GOOD, row_id="dup"), conversation(GOOD, row_id="new")], seen=seen
    )
    assert [row["id"] for row in valid] == ["new"]
    assert quarantine[0]["reason"] == "duplicate_id: id 'dup' was already accepted"
    assert counts.reasons == {"duplicate_id": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_chars": 100, "max_chars": 10}, "below min_chars"),
        ({"min_chars": -1}, "min_chars must be >= 0"),
        ({"max_chars": 0}, "max_chars must be > 0"),
        ({"max_chars": "big"}, "must be an integer"),
        ({"max_turns": 1}, "max_turns must be >= 2"),
        ({"require_answer": "yes"}, "must be a bool"),
    ],
)
def test_limits_reject_nonsense(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ValidationLimits(**kwargs)


def test_limits_are_frozen() -> None:
    limits = ValidationLimits()
    with pytest.raises(AttributeError):
        limits.max_chars = 5  # type: ignore[misc]


def test_reasoning_without_a_final_answer_has_its_own_reason() -> None:
    only_reasoning = conversation(
        [("user", "What is 2 + 2?"), ("assistant", "<think>2 + 2 = 4, so \\boxed{4}</think>  \n")],
        reference=None,
    )
    reason = reason_of(only_reasoning)
    assert reason == "no_final_answer: turn 1: nothing after the last </think> (reasoning only)"
    # With an answer after the reasoning, the same turn passes; without reasoning, the rule does not apply.
    answered = conversation(
        [("user", "What is 2 + 2?"), ("assistant", "<think>2 + 2 = 4</think> 4")], reference=None
    )
    plain = conversation([("user", "What is 2 + 2?"), ("assistant", "It is 4, plainly.")], reference=None)
    valid, quarantine, counts = validate([answered, {**plain, "id": "c2"}])
    assert len(valid) == 2 and quarantine == []
    # The reason code is counted on its own, apart from missing_answer.
    _, _, counts = validate([only_reasoning])
    assert counts.reasons == {"no_final_answer": 1}
    valid, _, _ = validate([only_reasoning], ValidationLimits(require_final_answer=False))
    assert len(valid) == 1


def test_stage_validated_writes_exactly_the_valid_rows_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    import llmft_assets.storage.tables as tables
    from llmft_assets.data.schema import CONVERSATION_SCHEMA
    from llmft_assets.data.stage import stage_validated

    rows = [
        {**conversation(GOOD, row_id="a"), "source_format": "r1_v1"},
        {**conversation([("user", "Q?"), ("assistant", "  ")], row_id="b"), "source_format": "r1_v1"},
        {**conversation(GOOD, row_id="a"), "source_format": "r1_v1", "content_hash": "a2"},
        {**conversation(GOOD, row_id="c"), "source_format": "r1_v0"},
    ]
    cleaned = tmp_path / "cleaned.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA), cleaned)
    # Batches of 2 rows: each batch keeps one row and drops one (an empty turn, then a duplicate id).
    read_batches = tables.iter_parquet_batches
    monkeypatch.setattr(tables, "iter_parquet_batches", lambda path, **_: read_batches(path, batch_size=2))
    result = stage_validated(
        cleaned, limits=ValidationLimits(), dataset=None, staging=tmp_path / "out", log=lambda _: None
    )
    written = pq.read_table(tmp_path / "out" / "data.parquet")
    assert written.schema == CONVERSATION_SCHEMA
    assert written.to_pylist() == [rows[0], rows[3]]
    quarantine = pq.read_table(tmp_path / "out" / "quarantine.parquet").to_pylist()
    assert [row["origin"] for row in quarantine] == ["test#b", "test#a"]
    assert quarantine[1]["reason"] == "duplicate_id: id 'a' was already accepted"
    assert (result.counts.rows_in, result.counts.rows_out, result.counts.quarantined) == (4, 2, 2)
