"""Offline, vectorized text features of prompts and responses for drift monitoring.

Every feature is computed with pyarrow compute kernels (RE2 regular expressions in C++), so 100k
logged requests take seconds and nothing needs a download (unlike Evidently's OOV / sentiment /
hub-model descriptors, which fail offline). No Dagster import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import pandas as pd

# Inputs accepted wherever a column of texts is expected.
TextColumn = Sequence[str | None] | pa.Array | pa.ChunkedArray | Any

SENTENCE_TERMINATORS = ".!?。！？"  # noqa: RUF001 (full-width CJK punctuation on purpose)
# A run of terminators followed by whitespace or the end ("3.14" is not a sentence break); full-width
# CJK terminators end a sentence on their own, since CJK text puts no space after them.
_SENTENCE_END_PATTERN = r"[.!?]+(?:\s|$)|[。！？]+"  # noqa: RUF001
_ENDS_WITH_TERMINATOR_PATTERN = f"[{SENTENCE_TERMINATORS}]\\s*$"
_THINK_BLOCK_PATTERN = r"(?s)<think>(?P<think>.*?)(?:</think>|\z)"  # an unclosed block runs to the end
_BOXED_PATTERN = r"\\boxed\s*\{"

# Phrases a model uses to decline. Kept specific on purpose: a bare "I cannot" also occurs in
# ordinary reasoning ("I cannot simplify further"), which would inflate the refusal rate.
# Typographic apostrophes (U+2019) are matched on purpose: models emit both forms.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI(?: am|'m|’m)? (?:sorry,? (?:but )?)?(?:can'?t|can’t|cannot|can not|won'?t|won’t|"  # noqa: RUF001
    r"am unable to|'m unable to|’m unable to|am not able to|'m not able to|’m not able to|"  # noqa: RUF001
    r"unable to) (?:help|assist|provide|comply|fulfil|fulfill|support|share|create|generate|"
    r"engage|answer that|do that|continue)",
    r"\bAs an AI\b",
    r"\bI (?:must|have to|need to) (?:respectfully )?decline\b",
    r"\b(?:this|that|your) request (?:violates|goes against|is against)\b",
    r"\bI'?m not (?:allowed|permitted) to\b",
)
_REFUSAL_PATTERN = "|".join(f"(?:{pattern})" for pattern in REFUSAL_PATTERNS)

# Scripts told apart by the language guess (RE2 character-class bodies); any other letter is "other".
_SCRIPT_CHARACTER_CLASSES: dict[str, str] = {
    "latin": r"\p{Latin}",
    "cjk": r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}",
    "cyrillic": r"\p{Cyrillic}",
    "arabic": r"\p{Arabic}",
}
SCRIPT_LABELS: tuple[str, ...] = (*_SCRIPT_CHARACTER_CLASSES, "other", "mixed", "none")
# Share of a text's letters one script needs to name the text; below it the text is "mixed".
DOMINANT_SCRIPT_SHARE = 0.6

GENERIC_FEATURES: tuple[str, ...] = (
    "chars",
    "words",
    "sentences",
    "non_letter_share",
    "digit_share",
    "script",
)
FEATURE_SLICE_ROWS = 16_384
RESPONSE_ONLY_FEATURES: tuple[str, ...] = ("has_think", "think_chars", "has_boxed", "is_refusal")


def to_text_array(texts: TextColumn, *, name: str) -> pa.ChunkedArray:
    """Turn a list / pandas Series / pyarrow array of strings into a large_string ChunkedArray.

    large_string because real R1 rows are ~15 KB: 100k+ of them overflow 32-bit string offsets.
    Raises TypeError with the column name when the values are not strings.
    """
    if isinstance(texts, pa.ChunkedArray | pa.Array):
        array = texts
    elif isinstance(texts, str | bytes):
        raise TypeError(f"{name}: expected a sequence of strings, got a single {type(texts).__name__}")
    else:
        values = texts.tolist() if hasattr(texts, "tolist") else list(texts)
        try:
            array = pa.array(values, type=pa.large_string(), from_pandas=True)
        except (pa.ArrowTypeError, pa.ArrowInvalid) as error:
            raise TypeError(f"{name}: every value must be a string or None ({error})") from error
    if isinstance(array, pa.Array):
        array = pa.chunked_array([array], type=array.type)
    if pa.types.is_null(array.type):  # all-None input from pyarrow has the null type
        array = array.cast(pa.large_string())
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise TypeError(f"{name}: expected a string column, got pyarrow type {array.type}")
    if pa.types.is_string(array.type):
        array = array.cast(pa.large_string())
    return array


def _count(texts: pa.ChunkedArray, pattern: str) -> np.ndarray:
    return pc.count_substring_regex(texts, pattern).to_numpy(zero_copy_only=False).astype(np.int64)


def _count_chars(texts: pa.ChunkedArray, excluded_run_pattern: str) -> np.ndarray:
    """Characters left after deleting runs of `excluded_run_pattern`.

    Deleting runs (e.g. `\\P{L}+`) is ~5x faster in RE2 than counting single-character matches.
    """
    kept = pc.replace_substring_regex(texts, excluded_run_pattern, "")
    return pc.utf8_length(kept).to_numpy(zero_copy_only=False).astype(np.int64)


def _count_words(texts: pa.ChunkedArray) -> np.ndarray:
    """Whitespace-separated words; splitting is ~2x faster than counting \\S+ matches in RE2."""
    # Trimmed first: the split yields "" around leading/trailing whitespace and for an empty text.
    trimmed = pc.utf8_trim_whitespace(texts)
    words = pc.list_value_length(pc.utf8_split_whitespace(trimmed)).to_numpy(zero_copy_only=False)
    is_blank = pc.equal(pc.binary_length(trimmed), 0).to_numpy(zero_copy_only=False)
    return np.where(is_blank, 0, words).astype(np.int64)


def _matches(texts: pa.ChunkedArray, pattern: str, *, ignore_case: bool = False) -> np.ndarray:
    return pc.match_substring_regex(texts, pattern, ignore_case=ignore_case).to_numpy(zero_copy_only=False)


def _non_ascii_rows(texts: pa.ChunkedArray) -> np.ndarray:
    return np.flatnonzero(~pc.string_is_ascii(texts).to_numpy(zero_copy_only=False))


def _safe_share(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # Empty text has no characters: report 0.0 rather than NaN, which Evidently would drop.
    return np.divide(
        numerator, denominator, out=np.zeros(len(numerator), dtype=np.float64), where=denominator > 0
    )


def guess_script(letter_counts: dict[str, np.ndarray], total_letters: np.ndarray) -> np.ndarray:
    """Per text: the script holding >= DOMINANT_SCRIPT_SHARE of its letters, else mixed / none."""
    named_counts = np.stack([letter_counts[script] for script in _SCRIPT_CHARACTER_CLASSES], axis=1)
    other_letters = np.maximum(total_letters - named_counts.sum(axis=1), 0)
    all_counts = np.concatenate([named_counts, other_letters[:, None]], axis=1)
    labels = np.array([*_SCRIPT_CHARACTER_CLASSES, "other"], dtype=object)
    top = all_counts.argmax(axis=1)
    top_share = _safe_share(all_counts.max(axis=1).astype(np.float64), total_letters.astype(np.float64))
    scripts = labels[top]
    scripts = np.where(top_share >= DOMINANT_SCRIPT_SHARE, scripts, "mixed")
    return np.where(total_letters > 0, scripts, "none").astype(object)


def _letters_by_script(
    texts: pa.ChunkedArray, letters: np.ndarray, non_ascii_rows: np.ndarray
) -> dict[str, np.ndarray]:
    """Letters per script. An ASCII text's letters are all Latin, so only the (usually few)
    non-ASCII texts go through the script regexes."""
    counts = {script: np.zeros(len(texts), dtype=np.int64) for script in _SCRIPT_CHARACTER_CLASSES}
    counts["latin"] = letters.copy()
    if len(non_ascii_rows):
        non_ascii_texts = texts.take(pa.array(non_ascii_rows))
        for script, character_class in _SCRIPT_CHARACTER_CLASSES.items():
            counts[script][non_ascii_rows] = _count_chars(non_ascii_texts, f"[^{character_class}]+")
    return counts


def _generic_features(texts: pa.ChunkedArray, prefix: str) -> dict[str, np.ndarray]:
    chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    letters = _count_chars(texts, r"\P{L}+")
    digits = _count_chars(texts, r"\P{Nd}+")
    words = _count_words(texts)
    # A non-empty text that does not end in a terminator still holds one last sentence.
    unterminated_tail = (words > 0) & ~_matches(texts, _ENDS_WITH_TERMINATOR_PATTERN)
    sentences = _count(texts, _SENTENCE_END_PATTERN) + unterminated_tail.astype(np.int64)
    letter_counts = _letters_by_script(texts, letters, _non_ascii_rows(texts))
    return {
        f"{prefix}_chars": chars,
        f"{prefix}_words": words,
        f"{prefix}_sentences": sentences,
        f"{prefix}_non_letter_share": _safe_share((chars - letters).astype(np.float64), chars),
        f"{prefix}_digit_share": _safe_share(digits.astype(np.float64), chars),
        f"{prefix}_script": guess_script(letter_counts, letters),
    }


def _think_chars(texts: pa.ChunkedArray) -> np.ndarray:
    """Characters inside the first <think> block (an unclosed block runs to the end), 0 without one."""
    opening = pc.find_substring(texts, "<think>").to_numpy(zero_copy_only=False).astype(np.int64)
    closing = pc.find_substring(texts, "</think>").to_numpy(zero_copy_only=False).astype(np.int64)
    # Byte offsets equal character offsets in ASCII text; non-ASCII texts take the regex path below.
    byte_lengths = pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    block_start = opening + len("<think>")
    block_end = np.where(closing >= block_start, closing, byte_lengths)
    think_chars = np.where(opening >= 0, block_end - block_start, 0)
    rows_to_redo = np.intersect1d(_non_ascii_rows(texts), np.flatnonzero(opening >= 0))
    if len(rows_to_redo):
        blocks = pc.struct_field(
            pc.extract_regex(texts.take(pa.array(rows_to_redo)), _THINK_BLOCK_PATTERN), "think"
        )
        think_chars[rows_to_redo] = pc.fill_null(pc.utf8_length(blocks), 0).to_numpy(zero_copy_only=False)
    return think_chars


def _response_features(texts: pa.ChunkedArray) -> dict[str, np.ndarray]:
    return {
        "response_has_think": _matches(texts, "<think>"),
        "response_think_chars": _think_chars(texts),
        "response_has_boxed": _matches(texts, _BOXED_PATTERN),
        "response_is_refusal": _matches(texts, _REFUSAL_PATTERN, ignore_case=True),
    }


def compute_text_features(prompts: TextColumn, responses: TextColumn | None = None) -> pd.DataFrame:
    """Numeric and categorical features of each prompt (and response), one row per input row.

    Columns: prompt_{chars, words, sentences, non_letter_share, digit_share, script}; with responses
    also the same response_* columns plus response_{has_think, think_chars, has_boxed, is_refusal}.
    `*_script` is categorical (see SCRIPT_LABELS), `has_*`/`is_*` are bool, the rest numeric.
    None texts count as empty strings.
    """
    import pandas as pd

    prompt_texts = pc.fill_null(to_text_array(prompts, name="prompts"), "")
    response_texts = None
    if responses is not None:
        response_texts = pc.fill_null(to_text_array(responses, name="responses"), "")
        if len(response_texts) != len(prompt_texts):
            raise ValueError(
                f"prompts and responses differ in length ({len(prompt_texts)} vs {len(response_texts)})"
            )
    # Slices of rows keep the kernels' temporaries (split words, rewritten strings) small and
    # memory linear in the row count.
    slices: list[dict[str, np.ndarray]] = []
    for start in range(0, max(len(prompt_texts), 1), FEATURE_SLICE_ROWS):
        features = _generic_features(prompt_texts.slice(start, FEATURE_SLICE_ROWS), "prompt")
        if response_texts is not None:
            response_slice = response_texts.slice(start, FEATURE_SLICE_ROWS)
            features |= _generic_features(response_slice, "response")
            features |= _response_features(response_slice)
        slices.append(features)
    return pd.DataFrame({column: np.concatenate([part[column] for part in slices]) for column in slices[0]})


def categorical_feature_columns(features: pd.DataFrame) -> list[str]:
    """Feature columns to compare as categories (script labels and flags), not as numbers."""
    return [
        column
        for column in features.columns
        if features[column].dtype == bool or features[column].dtype == object
    ]


def numerical_feature_columns(features: pd.DataFrame) -> list[str]:
    categorical = set(categorical_feature_columns(features))
    return [column for column in features.columns if column not in categorical]
