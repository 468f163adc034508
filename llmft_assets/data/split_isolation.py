"""The cross-split leak check: every way a problem crosses splits, counted with the train split streamed.

Three ways are counted, each once: problem keys (`splits.problem_key_of_prompt`) in more than one split,
content hashes in more than one split, and near-duplicate prompts (`splits.NearDuplicateIndex`) in two
splits whose keys differ (a shared key is already counted).

Memory: only the held splits (every split but train: validation and test, ~10 % of the rows by default)
are kept: per held row its prompt, problem key, content hash and index entry, about 1.5 KB plus the
prompt. The train split streams through one batch at a time and is only checked against them, so the
memory does not grow with the train rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from llmft_assets.data.splits import (
    NEAR_DUPLICATE_JACCARD,
    NearDuplicateIndex,
    first_user_turn,
    minhash_signatures_of_normalized,
    normalize_problem,
    numbers_of_normalized,
    problem_key_of_normalized,
)

STREAMED_SPLIT = "train"
# A batch of a split: its rows' first user turns and their content hashes (either may be empty).
SplitBatch = tuple[Sequence[str], Sequence[str]]


def isolation_problems(
    read_split: Callable[[str], Iterable[SplitBatch]],
    splits: Sequence[str],
    *,
    threshold: float = NEAR_DUPLICATE_JACCARD,
    max_examples: int = 5,
) -> dict[str, Any]:
    """Counts and examples of the problems crossing `splits`; `read_split(name)` yields a split's batches.

    The held splits are read first (each checked against the ones before it), then the train split."""
    order = [name for name in splits if name != STREAMED_SPLIT] + [n for n in splits if n == STREAMED_SPLIT]
    bit = {name: 1 << i for i, name in enumerate(order)}
    splits_of_key: dict[str, int] = {}  # held keys -> the splits they are in (bit mask)
    splits_of_hash: dict[str, int] = {}
    held_prompts: dict[str, list[str]] = {}
    held_keys: dict[str, list[str]] = {}
    index = NearDuplicateIndex(threshold)
    near_duplicates = 0
    near_examples: list[dict[str, Any]] = []
    for split in order:
        held = split != STREAMED_SPLIT
        prompts_of, keys_of = held_prompts.setdefault(split, []), held_keys.setdefault(split, [])
        position = 0
        for prompts, hashes in read_split(split):
            normalized = [normalize_problem(prompt) for prompt in prompts]
            keys = [
                problem_key_of_normalized(text, f"{split}#{position + i}")
                for i, text in enumerate(normalized)
            ]
            for seen, values in ((splits_of_key, keys), (splits_of_hash, hashes)):
                for value in values:
                    if held:
                        seen[value] = seen.get(value, 0) | bit[split]
                    elif value in seen:
                        seen[value] |= bit[split]
            numbers = [numbers_of_normalized(text) for text in normalized]
            signatures = minhash_signatures_of_normalized(normalized)
            for j in np.flatnonzero(index.may_match(signatures, numbers)).tolist():
                for (other_split, other_position), jaccard in index.matches(signatures[j], numbers[j]):
                    if other_split == split or held_keys[other_split][other_position] == keys[j]:
                        continue
                    near_duplicates += 1
                    if len(near_examples) < max_examples:
                        near_examples.append(
                            {
                                "kind": "near_duplicate",
                                "splits": [other_split, split],
                                "jaccard": round(jaccard, 3),
                                "prompts": [
                                    held_prompts[other_split][other_position][:200],
                                    prompts[j][:200],
                                ],
                            }
                        )
            if held:
                for j in range(len(prompts)):
                    index.insert((split, position + j), signatures[j], numbers[j])
                prompts_of.extend(prompts)
                keys_of.extend(keys)
            position += len(prompts)
    shared_keys = {key: mask for key, mask in splits_of_key.items() if mask & (mask - 1)}
    shared_hashes = sum(1 for mask in splits_of_hash.values() if mask & (mask - 1))
    examples: list[dict[str, Any]] = []
    for key, mask in list(shared_keys.items())[:max_examples]:
        names = sorted(name for name in order if mask & bit[name])
        holder = next(name for name in order if mask & bit[name])  # a held split: it has the prompt
        examples.append(
            {
                "kind": "problem_key",
                "splits": names,
                "prompt": held_prompts[holder][held_keys[holder].index(key)][:200],
            }
        )
    return {
        "counts": {
            "shared_problem_keys": len(shared_keys),
            "shared_content_hashes": shared_hashes,
            "near_duplicates": near_duplicates,
        },
        "examples": examples + near_examples,
    }


def prompt_isolation_problems(
    prompts: Mapping[str, Sequence[str]],
    content_hashes_by_split: Mapping[str, Sequence[str]] | None = None,
    *,
    threshold: float = NEAR_DUPLICATE_JACCARD,
    max_examples: int = 5,
) -> dict[str, Any]:
    """`isolation_problems` of splits held in memory: each row's first user turn (`prompts`, per split)."""
    hashes = content_hashes_by_split or {}
    names = list(dict.fromkeys([*prompts, *hashes]))
    return isolation_problems(
        lambda split: [(prompts.get(split, []), hashes.get(split, []))],
        names,
        threshold=threshold,
        max_examples=max_examples,
    )


def split_isolation_problems(
    messages_by_split: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    content_hashes_by_split: Mapping[str, Sequence[str]] | None = None,
    *,
    threshold: float = NEAR_DUPLICATE_JACCARD,
    max_examples: int = 5,
) -> dict[str, Any]:
    """`isolation_problems` of conversations held in memory, per split."""
    prompts = {split: [first_user_turn(m) for m in rows] for split, rows in messages_by_split.items()}
    return prompt_isolation_problems(
        prompts, content_hashes_by_split, threshold=threshold, max_examples=max_examples
    )
