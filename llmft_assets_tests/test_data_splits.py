"""Stable hash splits, fraction checks and the cross-split overlap helper."""

from __future__ import annotations

import pytest

from llmft_assets.data.splits import assign_split, find_cross_split_overlap, validate_fractions


def splits_of(ids: list[str], **kwargs: float) -> dict[str, str]:
    return {
        row_id: assign_split(
            row_id, validation_fraction=kwargs.get("val", 0.1), test_fraction=kwargs.get("test", 0.1)
        )
        for row_id in ids
    }


def test_adding_rows_never_moves_existing_rows() -> None:
    before = splits_of([f"row-{i}" for i in range(2000)])
    after = splits_of([f"row-{i}" for i in range(6000)])
    assert all(after[row_id] == split for row_id, split in before.items())


def test_fractions_are_respected_roughly() -> None:
    assigned = list(splits_of([f"id-{i}" for i in range(20_000)], val=0.1, test=0.05).values())
    assert abs(assigned.count("validation") / len(assigned) - 0.1) < 0.01
    assert abs(assigned.count("test") / len(assigned) - 0.05) < 0.01


def test_salt_changes_the_assignment_and_zero_fractions_mean_all_train() -> None:
    ids = [f"id-{i}" for i in range(500)]
    a = [assign_split(i, validation_fraction=0.2, test_fraction=0.2) for i in ids]
    b = [assign_split(i, validation_fraction=0.2, test_fraction=0.2, salt="other") for i in ids]
    assert a != b
    assert {assign_split(i, validation_fraction=0.0, test_fraction=0.0) for i in ids} == {"train"}


@pytest.mark.parametrize(
    ("validation", "test", "message"),
    [
        (-0.1, 0.1, "validation_fraction must be in"),
        (0.1, 1.0, "test_fraction must be in"),
        (0.6, 0.5, "must be < 1"),
        (float("nan"), 0.1, "validation_fraction must be in"),
        ("0.1", 0.1, "must be a number"),
        (True, 0.1, "must be a number"),
    ],
)
def test_bad_fractions(validation: float, test: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_fractions(validation, test)


def test_bad_id() -> None:
    with pytest.raises(ValueError, match="conversation_id"):
        assign_split("", validation_fraction=0.1, test_fraction=0.1)


def test_cross_split_overlap() -> None:
    assert find_cross_split_overlap({"train": ["a", "b"], "validation": ["c"], "test": []}) == {}
    overlap = find_cross_split_overlap({"train": ["a", "b"], "validation": ["b"], "test": ["a", "b"]})
    assert overlap == {"a": ["test", "train"], "b": ["test", "train", "validation"]}
