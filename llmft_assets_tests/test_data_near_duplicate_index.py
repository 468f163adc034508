"""The compact NearDuplicateIndex gives exactly what the per-band dict index (issue 10's) gave."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

import llmft_assets.data.splits as splits
from llmft_assets.data.splits import (
    MINHASH_BANDS,
    MINHASH_PERMUTATIONS,
    NearDuplicateIndex,
    minhash_signature,
)


class DictIndex:
    """The previous implementation, kept as the reference: a dict from (band, band bytes) to items."""

    def __init__(self, threshold: float = splits.NEAR_DUPLICATE_JACCARD) -> None:
        self.threshold = threshold
        self._items: list[tuple[Any, np.ndarray, tuple[str, ...]]] = []
        self._buckets: dict[tuple[int, bytes], list[int]] = {}

    @staticmethod
    def _bands(signature: np.ndarray) -> list[tuple[int, bytes]]:
        rows = MINHASH_PERMUTATIONS // MINHASH_BANDS
        return [(band, signature[band * rows : (band + 1) * rows].tobytes()) for band in range(MINHASH_BANDS)]

    def query(self, prompt: str) -> list[tuple[Any, float]]:
        signature = minhash_signature(prompt)
        numbers = NearDuplicateIndex._numbers(prompt)
        candidates = {i for band in self._bands(signature) for i in self._buckets.get(band, ())}
        found = []
        for i in sorted(candidates):
            item, other, other_numbers = self._items[i]
            jaccard = float(np.mean(signature == other))
            if jaccard >= self.threshold and numbers == other_numbers:
                found.append((item, jaccard))
        return found

    def add(self, item: Any, prompt: str) -> None:
        signature = minhash_signature(prompt)
        self._items.append((item, signature, NearDuplicateIndex._numbers(prompt)))
        for band in self._bands(signature):
            self._buckets.setdefault(band, []).append(len(self._items) - 1)


def _prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [
        "find",
        "the",
        "value",
        "of",
        "x",
        "when",
        "the",
        "sum",
        "of",
        "two",
        "numbers",
        "is",
        "given",
        "and",
        "their",
        "product",
        "is",
        "known",
    ]
    base = [
        " ".join(rng.choice(words) for _ in range(14)) + f" {rng.randrange(9)}" for _ in range(count // 3)
    ]
    prompts = []
    for _ in range(count):
        text = rng.choice(base).split(" ")
        for _ in range(rng.randrange(3)):  # reword one or two words: near duplicates at varied Jaccard
            text[rng.randrange(len(text) - 1)] = rng.choice(words)
        prompts.append(" ".join(text))
    return prompts


@pytest.mark.parametrize("pending_entries", [16, 1 << 16])
@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_same_matches_as_the_dict_index(
    monkeypatch: pytest.MonkeyPatch, pending_entries: int, threshold: float
) -> None:
    monkeypatch.setattr(splits, "_PENDING_BUCKET_ENTRIES", pending_entries)  # merges after every item
    compact, reference = NearDuplicateIndex(threshold), DictIndex(threshold)
    matched = 0
    for position, prompt in enumerate(_prompts(240, seed=int(threshold * 10))):
        got, want = compact.query(prompt), reference.query(prompt)
        assert got == want, position
        matched += bool(want)
        compact.add(position, prompt)
        reference.add(position, prompt)
    assert matched > 20  # the comparison exercised real matches, not only empty answers


def test_colliding_bucket_keys_add_no_false_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every band of every prompt gets the same key: only the exact band check can tell them apart.
    monkeypatch.setattr(splits, "_band_keys", lambda signature: np.zeros(MINHASH_BANDS, dtype=np.uint64))
    compact, reference = NearDuplicateIndex(0.3), DictIndex(0.3)
    for position, prompt in enumerate(_prompts(90, seed=4)):
        assert compact.query(prompt) == reference.query(prompt)
        compact.add(position, prompt)
        reference.add(position, prompt)
