"""Stable train/validation/test assignment by hash, and the cross-split overlap check.

A row's split depends only on its id (and the salt), never on the other rows, so adding rows to the
dataset never moves an existing row to another split and evaluation numbers stay comparable.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
DEFAULT_SALT = "llmft-v1"
_HASH_SCALE = float(2**64)


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


def split_point(conversation_id: str, salt: str = DEFAULT_SALT) -> float:
    """The id's position in [0, 1): the first 8 bytes of sha256(salt:id)."""
    digest = hashlib.sha256(f"{salt}:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_SCALE


def assign_split(
    conversation_id: str,
    *,
    validation_fraction: float,
    test_fraction: float,
    salt: str = DEFAULT_SALT,
) -> Split:
    """'test' for the lowest test_fraction of hash space, then 'validation', the rest 'train'."""
    if not isinstance(conversation_id, str) or not conversation_id:
        raise ValueError(f"conversation_id must be a non-empty string, got {conversation_id!r}")
    validate_fractions(validation_fraction, test_fraction)
    point = split_point(conversation_id, salt)
    if point < test_fraction:
        return "test"
    if point < test_fraction + validation_fraction:
        return "validation"
    return "train"


def find_cross_split_overlap(hashes_by_split: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """content_hash -> the splits it appears in, for every hash found in more than one split."""
    splits_of: dict[str, set[str]] = {}
    for split, hashes in hashes_by_split.items():
        for value in hashes:
            splits_of.setdefault(value, set()).add(split)
    return {value: sorted(splits) for value, splits in splits_of.items() if len(splits) > 1}
