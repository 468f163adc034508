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


def _fmix64(value: int) -> int:
    """MurmurHash3's 64-bit finalizer in Python integers (the reference for the NumPy version)."""
    mask = (1 << 64) - 1
    value ^= value >> 33
    value = (value * 0xFF51AFD7ED558CCD) & mask
    value ^= value >> 33
    value = (value * 0xC4CEB9FE1A85EC53) & mask
    return value ^ (value >> 33)


def _reference_signature(text: str) -> np.ndarray:
    """MinHash of one prompt, one shingle and one permutation at a time: the minimum over its word
    3-shingles of fmix64(4-byte BLAKE2b of the shingle XOR the permutation's seed)."""
    import hashlib

    words = splits.normalize_problem(text).split(" ")
    count = max(1, len(words) - 3 + 1)
    shingles = {" ".join(words[i : i + 3]) for i in range(count)}
    values = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "big") for s in shingles]
    seeds = [int(seed) for seed in splits._SEEDS]
    return np.array([min(_fmix64(v ^ seed) for v in values) for seed in seeds], dtype=np.uint64)


def _shingles(text: str) -> set[str]:
    words = splits.normalize_problem(text).split(" ")
    return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}


def _estimate_errors(signature: Any, pairs: int = 300) -> np.ndarray:
    """Estimated minus true Jaccard over random ~35-word prompts, each against itself with one word changed."""
    rng = random.Random(0)
    vocabulary = [f"word{i}" for i in range(40)]
    errors = []
    for _ in range(pairs):
        words = [rng.choice(vocabulary) for _ in range(35)]
        changed = list(words)
        changed[rng.randrange(len(words))] += "x"
        a, b = " ".join(words), " ".join(changed)
        true = len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))
        errors.append(float(np.mean(signature(a) == signature(b))) - true)
    return np.array(errors)


def test_minhash_estimates_are_as_precise_as_64_independent_permutations() -> None:
    # 64 independent minima: the estimate's standard error is sqrt(J(1-J)/64), about 0.045 near J = 0.85.
    errors = _estimate_errors(minhash_signature)
    assert abs(errors.mean()) < 0.02 and errors.std() < 0.06, (errors.mean(), errors.std())

    # The planted defect: the linear (a*x + b) mod 2^61-1 hash used before, with 32-bit x and a < 2^29,
    # never wrapped, so its permutations ordered the shingles alike (measured spread: 0.17).
    rng = np.random.default_rng(1)
    a = rng.integers(1, 1 << 29, size=MINHASH_PERMUTATIONS, dtype=np.uint64)
    b = rng.integers(0, 1 << 61, size=MINHASH_PERMUTATIONS, dtype=np.uint64)
    mersenne = np.uint64((1 << 61) - 1)

    def linear_signature(text: str) -> np.ndarray:
        import hashlib

        values = np.array(
            [
                int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "big")
                for s in _shingles(text)
            ],
            dtype=np.uint64,
        )
        return ((values[:, None] * a[None, :] + b[None, :]) % mersenne).min(axis=0)

    assert _estimate_errors(linear_signature).std() > 0.1


@pytest.mark.parametrize("chunk_shingles", [1, 7, 16_384])
def test_batched_signatures_are_the_per_prompt_ones(
    monkeypatch: pytest.MonkeyPatch, chunk_shingles: int
) -> None:
    # Chunks of 1 and 7 shingles: prompts longer than a chunk, and chunks ending inside a prompt's range.
    monkeypatch.setattr(splits, "_SIGNATURE_CHUNK_SHINGLES", chunk_shingles)
    prompts = ["", "   ", "one", "two words", "Three  Words here", *_prompts(60, seed=7), "a b c a b c a b c"]
    normalized = [splits.normalize_problem(prompt) for prompt in prompts]
    batched = splits.minhash_signatures_of_normalized(normalized)
    assert batched.shape == (len(prompts), MINHASH_PERMUTATIONS) and batched.dtype == np.uint64
    for prompt, signature in zip(prompts, batched, strict=True):
        assert np.array_equal(signature, _reference_signature(prompt)), prompt
        assert np.array_equal(minhash_signature(prompt), signature)
    assert splits.minhash_signatures_of_normalized([]).shape == (0, MINHASH_PERMUTATIONS)


def test_may_match_is_false_only_where_matches_is_empty() -> None:
    index = NearDuplicateIndex(0.5)
    prompts = _prompts(150, seed=11)
    assert not index.may_match(np.stack([minhash_signature(p) for p in prompts]), [()] * 150).any()
    for position, prompt in enumerate(prompts[:75]):
        index.add(position, prompt)
    queries = prompts[75:]
    signatures = np.stack([minhash_signature(p) for p in queries])
    numbers = [NearDuplicateIndex.prompt_numbers(p) for p in queries]
    may = index.may_match(signatures, numbers).tolist()
    answers = [index.query(prompt) for prompt in queries]
    assert all(may[i] for i, answer in enumerate(answers) if answer)
    assert any(answers) and not all(may)  # both outcomes were exercised
    # A prompt of the same template with other numbers shares no bucket: the filter already says no.
    other = prompts[0].rsplit(" ", 1)[0] + " 999"
    assert index.may_match(
        minhash_signature(other)[None, :], [NearDuplicateIndex.prompt_numbers(other)]
    ).tolist() == [False]
