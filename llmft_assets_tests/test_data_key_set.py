"""CompactKeySet: the same answers as a Python set, in 16 bytes a key; the pipeline dedups through it."""

from __future__ import annotations

import random
from typing import Any

import pytest

from llmft_assets.data.cleaning import clean_rows
from llmft_assets.data.key_set import DIGEST_BYTES, CompactKeySet, claim
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import StageCounts
from llmft_assets.data.validation import ValidationLimits, validate_rows


@pytest.mark.parametrize("pending_limit", [1, 7, 65_536])
def test_answers_like_a_python_set_across_merges(pending_limit: int) -> None:
    rng = random.Random(pending_limit)
    keys = [f"id-{rng.randrange(3000)}" for _ in range(5000)] + ["", "é\u2063", "\ud800x"]
    compact, reference = CompactKeySet(pending_limit=pending_limit), set()
    for key in keys:
        assert (key in compact) == (key in reference), key
        compact.add(key)
        reference.add(key)
    assert len(compact) == len(reference)
    assert all(key in compact for key in reference)
    assert not any(f"other-{i}" in compact for i in range(2000))
    assert 12345 not in compact  # not a string: never a member


def test_memory_is_sixteen_bytes_a_key_once_merged() -> None:
    keys = CompactKeySet(pending_limit=1000)
    for index in range(10_000):
        keys.add(f"{index:064x}")
    assert keys.nbytes == 10_000 * DIGEST_BYTES


def test_cleaning_and_validation_drop_the_same_rows_with_either_set() -> None:
    rows = generate_rows(60, schema="v0", seed=3)
    rows += [dict(rows[4], id="copy-of-4"), dict(rows[9], problem=rows[9]["problem"] + " again")]
    results = []
    for make in (set, CompactKeySet):
        counts = StageCounts(stage="cleaned")
        cleaned, _ = clean_rows(rows, seen_hashes=make(), counts=counts)
        validated_counts = StageCounts(stage="validated")
        valid, _ = validate_rows(cleaned, seen_ids=make(), limits=ValidationLimits(), counts=validated_counts)
        results.append(([row["id"] for row in valid], counts.duplicates, validated_counts.reasons))
    assert results[0] == results[1]
    ids, duplicates, reasons = results[1]
    assert duplicates == 1 and reasons.get("duplicate_id") == 1 and "copy-of-4" not in ids


@pytest.mark.parametrize("make", [set, lambda: CompactKeySet(pending_limit=2)])
def test_claim_adds_a_new_key_and_refuses_a_known_one(make: Any) -> None:
    keys = make()
    assert [claim(keys, key) for key in ["a", "b", "a", "c", "b", "d"]] == [
        True,
        True,
        False,
        True,
        False,
        True,
    ]
    assert all(key in keys for key in "abcd") and "e" not in keys
