"""Stable train/validation/test assignment by hash, and the cross-split leak checks.

A row's split depends only on its *problem key* (and the salt), never on the other rows, so adding rows
never moves an existing row to another split and evaluation numbers stay comparable. The key is the first
user turn, Unicode- (NFKC) and whitespace-normalized and case-folded: the same problem under two ids (a v0
and a v1 twin, a re-annotation, a whitespace variant) gets one key and so one split.

Near-duplicate prompts are found with MinHash (word shingles, banded LSH, estimated Jaccard verified per
candidate pair): a problem reworded by a character or two is still the same problem. The isolation check
over finished splits (`split_isolation`) uses both.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import numpy as np

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
DEFAULT_SALT = "llmft-v1"
_HASH_SCALE = float(2**64)


@dataclass(frozen=True)
class SplitSettings:
    """How dataset_splits divides the data (the home of these defaults; the Dagster config derives)."""

    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    salt: str = DEFAULT_SALT
    near_duplicate_jaccard: float = 0.8

    def __post_init__(self) -> None:
        validate_fractions(self.validation_fraction, self.test_fraction)
        if not 0.0 < self.near_duplicate_jaccard <= 1.0:
            raise ValueError(f"near_duplicate_jaccard must be in (0, 1], got {self.near_duplicate_jaccard!r}")


def validate_fractions(validation_fraction: float, test_fraction: float) -> None:
    """Raise ValueError unless both fractions are finite numbers in [0, 1) leaving room for train."""
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1 to leave rows for training, got "
            f"{validation_fraction} + {test_fraction} = {validation_fraction + test_fraction}"
        )


def split_point(key: str, salt: str = DEFAULT_SALT) -> float:
    """The key's position in [0, 1): the first 8 bytes of sha256(salt:key)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_SCALE


def assign_split(
    key: str,
    *,
    validation_fraction: float,
    test_fraction: float,
    salt: str = DEFAULT_SALT,
) -> Split:
    """'test' for the lowest test_fraction of hash space, then 'validation', the rest 'train'.

    `key` is the row's `problem_key` in the pipeline (any non-empty string works)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"split key must be a non-empty string, got {key!r}")
    validate_fractions(validation_fraction, test_fraction)
    return _split_at(split_point(key, salt), validation_fraction, test_fraction)


def _split_at(point: float, validation_fraction: float, test_fraction: float) -> Split:
    if point < test_fraction:
        return "test"
    if point < test_fraction + validation_fraction:
        return "validation"
    return "train"


_WHITESPACE = re.compile(r"\s+")


def normalize_problem(text: str) -> str:
    """NFKC, case-folded, every run of whitespace one space, trimmed."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def first_user_turn(messages: Sequence[Mapping[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in messages if m.get("role") == "user"), "")


def problem_key_of_prompt(prompt: str, fallback: str = "") -> str:
    """sha256 of the normalized prompt (`fallback`, e.g. the row id, when the prompt is empty)."""
    return problem_key_of_normalized(normalize_problem(prompt), fallback)


def problem_key_of_normalized(normalized: str, fallback: str) -> str:
    problem = normalized or f"\0id:{fallback}"
    return hashlib.sha256(problem.encode()).hexdigest()[:32]


def problem_key(messages: Sequence[Mapping[str, Any]], fallback: str = "") -> str:
    """The split key of a conversation: its normalized first user turn, hashed."""
    return problem_key_of_prompt(first_user_turn(messages), fallback)


# ---- near duplicates: MinHash over word shingles of the normalized prompt ----------------------------

MINHASH_PERMUTATIONS = 64
MINHASH_BANDS = 16  # 16 bands x 4 rows: a pair at Jaccard 0.8 shares some band with p ~ 0.9998
NEAR_DUPLICATE_JACCARD = SplitSettings.near_duplicate_jaccard
_SHINGLE_WORDS = 3
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# Shingles hashed against all permutations in one array operation: 4,096 x 64 uint64 = 2 MiB at most.
_SIGNATURE_CHUNK_SHINGLES = 4_096


def _permutation_seeds(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 63, size=MINHASH_PERMUTATIONS, dtype=np.uint64)


_SEEDS = _permutation_seeds()
_FMIX_1, _FMIX_2, _SHIFT = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)


def _permuted(values: np.ndarray) -> np.ndarray:
    """Each shingle hash under every permutation: MurmurHash3's 64-bit finalizer of (hash XOR seed),
    shape (len(values), MINHASH_PERMUTATIONS).

    A well-mixed hash per permutation, so the 64 minima are independent estimates. (The linear
    (a*x + b) mod 2^61-1 used before never wrapped for 32-bit x and small a: every permutation ordered
    the shingles nearly the same way, and the estimated Jaccard of a pair at 0.86 could read 0.47; its
    error's spread was 0.17 where 64 independent minima give about 0.045.)"""
    z = values[:, None] ^ _SEEDS[None, :]
    z = (z ^ (z >> _SHIFT)) * _FMIX_1  # uint64 arithmetic wraps: multiplication mod 2^64, as the hash wants
    z = (z ^ (z >> _SHIFT)) * _FMIX_2
    return z ^ (z >> _SHIFT)


def _shingle_digests(normalized: str) -> list[bytes]:
    """The 4-byte BLAKE2b digests of the distinct word 3-shingles of a normalized prompt (at least one;
    a prompt of fewer words is one shingle)."""
    words = normalized.split(" ")
    if len(words) < _SHINGLE_WORDS:
        shingles = {normalized}
    else:
        shingles = set(map(" ".join, zip(*(words[k:] for k in range(_SHINGLE_WORDS)), strict=False)))
    return [hashlib.blake2b(shingle.encode(), digest_size=4).digest() for shingle in shingles]


def minhash_signatures_of_normalized(normalized: Sequence[str]) -> np.ndarray:
    """One `minhash_signature` row per already normalized prompt, shape (len, MINHASH_PERMUTATIONS).

    All prompts' shingle hashes go through the permutations as array operations, a chunk of
    _SIGNATURE_CHUNK_SHINGLES shingles at a time (whole prompts), the minimum per prompt by `reduceat`:
    the same numbers as one prompt at a time, without a NumPy call per prompt."""
    signatures = np.empty((len(normalized), MINHASH_PERMUTATIONS), dtype=np.uint64)
    if not len(normalized):
        return signatures
    hashes = [_shingle_digests(text) for text in normalized]
    offsets = np.zeros(len(hashes) + 1, dtype=np.int64)
    np.cumsum([len(values) for values in hashes], out=offsets[1:])
    # The digests read as big-endian 32-bit integers.
    values = np.frombuffer(b"".join(chain.from_iterable(hashes)), dtype=">u4").astype(np.uint64)
    row = 0
    while row < len(hashes):
        # The prompts from `row` whose shingles fit in one chunk (always at least one prompt).
        fits = int(np.searchsorted(offsets, offsets[row] + _SIGNATURE_CHUNK_SHINGLES, side="right")) - 1
        end = min(len(hashes), max(row + 1, fits))
        start = offsets[row]
        permuted = _permuted(values[start : offsets[end]])
        signatures[row:end] = np.minimum.reduceat(permuted, offsets[row:end] - start, axis=0)
        row = end
    return signatures


def minhash_signature(text: str) -> np.ndarray:
    """MINHASH_PERMUTATIONS minimum hashes of the prompt's word 3-shingles (uint64)."""
    return minhash_signatures_of_normalized([normalize_problem(text)])[0]


_BAND_ROWS = MINHASH_PERMUTATIONS // MINHASH_BANDS
# Odd multipliers mixing a band's rows into one uint64 bucket key (wrapping arithmetic).
_BAND_MIX = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64
)
_BAND_SALT = np.arange(MINHASH_BANDS, dtype=np.uint64) * np.uint64(0x94D049BB133111EB)
_PENDING_BUCKET_ENTRIES = 1 << 16


def _band_keys(signatures: np.ndarray) -> np.ndarray:
    """One uint64 per band: shape (MINHASH_BANDS,) for one signature, (n, MINHASH_BANDS) for n. Equal
    bands give equal keys; unequal bands may collide, so every candidate found through a key is checked
    for a truly shared band."""
    bands = signatures.reshape(*signatures.shape[:-1], MINHASH_BANDS, _BAND_ROWS)
    return (bands * _BAND_MIX[:_BAND_ROWS]).sum(axis=-1, dtype=np.uint64) + _BAND_SALT


def numbers_of_normalized(normalized: str) -> tuple[str, ...]:
    return tuple(_NUMBER.findall(normalized))


def _numbers_key(numbers: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(numbers).encode(), digest_size=8).digest(), "big")


def _bucket_keys(signatures: np.ndarray, numbers_keys: int | np.ndarray) -> np.ndarray:
    """The index's bucket keys: each band key mixed with the key of the prompt's numbers (one per
    signature). A near duplicate needs the same numbers, so prompts of one template with other numbers
    share no bucket and are never candidates; colliding keys are caught by the band and numbers checks."""
    return _band_keys(signatures) ^ np.asarray(numbers_keys, dtype=np.uint64)[..., None]


class NearDuplicateIndex:
    """Banded-LSH index of prompts; `query` returns the indexed items whose prompt is a near duplicate.

    Near duplicate: estimated Jaccard of word 3-shingles >= `threshold` *and* the same numbers in the
    same order. Math problems from one template differ only in their numbers and are different
    problems; the same numbers in nearly the same words are the same problem (and the same answer).

    Candidates are the items sharing at least one whole band with the query. Memory per item: its
    signature (512 bytes, in one growing array), 16 bucket entries of 16 bytes in sorted arrays (the
    newest in a small dict, merged every 65,536 entries) and its numbers; not per-band Python objects.

    `query`/`add` take a prompt; `matches`/`insert` the same from a signature and the prompt's numbers
    (`prompt_numbers`), and `may_match` tells for many signatures at once which can have a match at all.
    """

    def __init__(self, threshold: float = NEAR_DUPLICATE_JACCARD) -> None:
        self.threshold = threshold
        self._items: list[Any] = []
        self._numbers_of: list[tuple[str, ...]] = []
        self._signatures = np.empty((64, MINHASH_PERMUTATIONS), dtype=np.uint64)
        self._keys = np.empty(0, dtype=np.uint64)  # sorted bucket keys
        self._members = np.empty(0, dtype=np.int64)  # the item of each key
        self._pending: dict[int, list[int]] = {}
        self._pending_entries = 0

    @staticmethod
    def _numbers(prompt: str) -> tuple[str, ...]:
        return numbers_of_normalized(normalize_problem(prompt))

    prompt_numbers = _numbers

    def _candidates(self, signature: np.ndarray, numbers: tuple[str, ...]) -> np.ndarray:
        keys = _bucket_keys(signature, _numbers_key(numbers))
        found: list[np.ndarray] = []
        if len(self._keys):
            low = np.searchsorted(self._keys, keys, side="left")
            high = np.searchsorted(self._keys, keys, side="right")
            found += [self._members[a:b] for a, b in zip(low, high, strict=True) if b > a]
        for key in keys.tolist():
            if key in self._pending:
                found.append(np.array(self._pending[key], dtype=np.int64))
        if not found:
            return np.empty(0, dtype=np.int64)
        candidates = np.unique(np.concatenate(found))  # sorted, as the query reports them
        bands = signature.reshape(MINHASH_BANDS, _BAND_ROWS)
        others = self._signatures[candidates].reshape(len(candidates), MINHASH_BANDS, _BAND_ROWS)
        return candidates[(others == bands).all(axis=2).any(axis=1)]

    def may_match(self, signatures: np.ndarray, numbers: Sequence[tuple[str, ...]]) -> np.ndarray:
        """Per prompt (a row of an (n, MINHASH_PERMUTATIONS) array of signatures, and its numbers): False
        when `matches` is surely empty (no bucket key of it is in the index), True when it has to be asked."""
        if self._pending:
            self._merge_pending()
        if not len(self._keys):
            return np.zeros(len(signatures), dtype=bool)
        keys = _bucket_keys(signatures, np.array([_numbers_key(n) for n in numbers], dtype=np.uint64))
        positions = np.searchsorted(self._keys, keys).clip(max=len(self._keys) - 1)
        return (self._keys[positions] == keys).any(axis=1)

    def matches(self, signature: np.ndarray, numbers: tuple[str, ...]) -> list[tuple[Any, float]]:
        """`query` for a prompt with this signature and these numbers."""
        candidates = self._candidates(signature, numbers)
        # Templated prompts share bands with many others: estimate all their Jaccards in one operation.
        jaccards = (self._signatures[candidates] == signature).mean(axis=1)
        close = jaccards >= self.threshold
        return [
            (self._items[i], jaccard)
            for i, jaccard in zip(candidates[close].tolist(), jaccards[close].tolist(), strict=True)
            if numbers == self._numbers_of[i]
        ]

    def query(self, prompt: str, signature: np.ndarray | None = None) -> list[tuple[Any, float]]:
        signature = minhash_signature(prompt) if signature is None else signature
        return self.matches(signature, self._numbers(prompt))

    def insert(self, item: Any, signature: np.ndarray, numbers: tuple[str, ...]) -> None:
        """`add` of a prompt with this signature and these numbers."""
        position = len(self._items)
        if position == len(self._signatures):
            grown = np.empty((2 * position, MINHASH_PERMUTATIONS), dtype=np.uint64)
            grown[:position] = self._signatures
            self._signatures = grown
        self._signatures[position] = signature
        self._items.append(item)
        self._numbers_of.append(numbers)
        for key in _bucket_keys(signature, _numbers_key(numbers)).tolist():
            self._pending.setdefault(key, []).append(position)
        self._pending_entries += MINHASH_BANDS
        if self._pending_entries >= _PENDING_BUCKET_ENTRIES:
            self._merge_pending()

    def add(self, item: Any, prompt: str, signature: np.ndarray | None = None) -> None:
        signature = minhash_signature(prompt) if signature is None else signature
        self.insert(item, signature, self._numbers(prompt))

    def _merge_pending(self) -> None:
        keys = [key for key, members in self._pending.items() for _ in members]
        members = [member for group in self._pending.values() for member in group]
        all_keys = np.concatenate([self._keys, np.array(keys, dtype=np.uint64)])
        all_members = np.concatenate([self._members, np.array(members, dtype=np.int64)])
        order = np.argsort(all_keys, kind="stable")
        self._keys, self._members = all_keys[order], all_members[order]
        self._pending.clear()
        self._pending_entries = 0


@dataclass(frozen=True)
class NearDuplicate:
    split_a: str
    index_a: int
    split_b: str
    index_b: int
    jaccard: float


def find_near_duplicates(
    prompts_by_split: Mapping[str, Sequence[str]], threshold: float = NEAR_DUPLICATE_JACCARD
) -> list[NearDuplicate]:
    """Pairs of prompts in *different* splits that are near duplicates (see NearDuplicateIndex)."""
    index = NearDuplicateIndex(threshold)
    found: list[NearDuplicate] = []
    for split, prompts in prompts_by_split.items():
        normalized = [normalize_problem(prompt) for prompt in prompts]
        numbers = [numbers_of_normalized(text) for text in normalized]
        signatures = minhash_signatures_of_normalized(normalized)
        # The index holds only earlier splits while this one is queried: ask it only where it can answer.
        for position in np.flatnonzero(index.may_match(signatures, numbers)).tolist():
            for (other_split, other_position), jaccard in index.matches(
                signatures[position], numbers[position]
            ):
                if other_split != split:
                    found.append(NearDuplicate(other_split, other_position, split, position, jaccard))
        for position in range(len(prompts)):
            index.insert((split, position), signatures[position], numbers[position])
    return found


@dataclass
class SplitPlan:
    """The split of every row, by position in the table, and what leak prevention changed."""

    assignments: list[Split]
    joined_eval_group: int = 0
    moved_to_train: int = 0


def plan_leak_free_splits(
    read_prompts: Callable[[], Iterable[list[tuple[str, str]]]],
    *,
    validation_fraction: float,
    test_fraction: float,
    salt: str = DEFAULT_SALT,
    threshold: float = NEAR_DUPLICATE_JACCARD,
) -> SplitPlan:
    """Assign rows by problem key, then keep near duplicates together. Two streaming passes over
    `read_prompts()` (batches of (row id, first user turn)); only evaluation rows are held in the index.

    Pass 1: split by `problem_key`; an evaluation row that is a near duplicate of an evaluation row of
    the other evaluation split joins that row's split. Pass 2: a train row that is a near duplicate of
    an evaluation row pulls that row (and its group) into train: the model never sees a test problem.
    Deterministic for a given dataset; adding rows can only move evaluation rows into train.

    Each prompt is normalized once a pass, and a batch's MinHash signatures are computed together
    (`minhash_signatures_of_normalized`); pass 2 asks the index only for rows `may_match` lets through.
    """
    validate_fractions(validation_fraction, test_fraction)
    assignments: list[Split] = []
    index = NearDuplicateIndex(threshold)
    group_of: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    plan = SplitPlan(assignments)
    for batch in read_prompts():
        start = len(assignments)
        normalized = [normalize_problem(prompt) for _row_id, prompt in batch]
        assignments.extend(
            _split_at(
                split_point(problem_key_of_normalized(text, row_id), salt),
                validation_fraction,
                test_fraction,
            )
            for (row_id, _prompt), text in zip(batch, normalized, strict=True)
        )
        evaluation = [i for i in range(len(batch)) if assignments[start + i] != "train"]
        signatures = minhash_signatures_of_normalized([normalized[i] for i in evaluation])
        for i, signature in zip(evaluation, signatures, strict=True):
            position = start + i
            numbers = numbers_of_normalized(normalized[i])
            matches = index.matches(signature, numbers)
            group = group_of[matches[0][0]] if matches else position
            if matches and assignments[matches[0][0]] != assignments[position]:
                assignments[position] = assignments[matches[0][0]]
                plan.joined_eval_group += 1
            group_of[position] = group
            members.setdefault(group, []).append(position)
            index.insert(position, signature, numbers)
    if not members:
        return plan
    position = 0
    for batch in read_prompts():
        train = [
            i
            for i in range(len(batch))
            if assignments[position + i] == "train" and position + i not in group_of
        ]
        normalized = [normalize_problem(batch[i][1]) for i in train]
        numbers = [numbers_of_normalized(text) for text in normalized]
        signatures = minhash_signatures_of_normalized(normalized)
        for j in np.flatnonzero(index.may_match(signatures, numbers)).tolist():
            for match, _ in index.matches(signatures[j], numbers[j]):
                for member in members.get(group_of[match], ()):
                    if assignments[member] != "train":
                        assignments[member] = "train"
                        plan.moved_to_train += 1
        position += len(batch)
    if position != len(assignments):
        raise ValueError(
            f"read_prompts gave {position} rows on the second pass, {len(assignments)} on the first"
        )
    return plan


def find_cross_split_overlap(hashes_by_split: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """key -> the splits it appears in, for every key (problem key, content hash) in more than one split."""
    splits_of: dict[str, set[str]] = {}
    for split, hashes in hashes_by_split.items():
        for value in hashes:
            splits_of.setdefault(value, set()).add(split)
    return {value: sorted(splits) for value, splits in splits_of.items() if len(splits) > 1}
