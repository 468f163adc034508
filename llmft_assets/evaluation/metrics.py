"""Answer accuracy, format compliance and response length of generated answers (pure Python).

Answer extraction and normalisation are the data pipeline's (``llmft_assets.data.answers``), so the
eval scores answers exactly the way the reference answers were extracted from the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from llmft_assets.data.answers import extract_boxed_answer, normalize_answer
from llmft_assets.data.validation import THINK_CLOSE, THINK_OPEN, think_balance_problem


@dataclass(frozen=True)
class Generation:
    """One generated answer: the text (special tokens removed), its length in tokens, and whether the
    model ended it with the end-of-turn token (False: it ran out of ``max_new_tokens``)."""

    text: str
    num_tokens: int
    finished: bool


def answer_is_correct(generated: str, reference: str | None) -> bool | None:
    """Whether the last ``\\boxed{}`` of ``generated`` equals ``reference`` after normalisation.

    None when the row has no checkable reference (it is left out of accuracy, not counted wrong);
    False when the generation has no boxed answer.
    """
    if reference is None or not normalize_answer(reference):
        return None
    predicted = extract_boxed_answer(generated)
    if predicted is None:
        return False
    return normalize_answer(predicted) == normalize_answer(reference)


@dataclass(frozen=True)
class AccuracyResult:
    accuracy: float  # correct / checkable; NaN when no row is checkable
    num_correct: int
    num_checkable: int
    num_rows: int


def answer_accuracy(generated: Sequence[str], references: Sequence[str | None]) -> AccuracyResult:
    """Exact-match accuracy of boxed answers over the rows that have a reference answer."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations but {len(references)} references")
    verdicts = [
        answer_is_correct(text, reference) for text, reference in zip(generated, references, strict=True)
    ]
    checked = [verdict for verdict in verdicts if verdict is not None]
    num_correct = sum(checked)
    return AccuracyResult(
        accuracy=num_correct / len(checked) if checked else math.nan,
        num_correct=num_correct,
        num_checkable=len(checked),
        num_rows=len(generated),
    )


def format_problem(generation: Generation) -> str | None:
    """Why a generation breaks the expected format; None when it complies.

    The format: a reasoning block opened with ``<think>`` and closed with ``</think>`` (balanced, not
    nested), then the answer, and the turn ended by the end token rather than cut at max_new_tokens.
    """
    if not generation.finished:
        return "ran out of max_new_tokens before the end token"
    if THINK_OPEN not in generation.text:
        return f"no {THINK_OPEN} block"
    unbalanced = think_balance_problem(generation.text)
    if unbalanced is not None:
        return unbalanced
    if not generation.text.rsplit(THINK_CLOSE, 1)[-1].strip():
        return f"nothing after {THINK_CLOSE}"
    return None


def format_compliance(generations: Sequence[Generation]) -> float:
    """Fraction of generations with a closed think block that ended with the end token (NaN if none)."""
    if not generations:
        return math.nan
    return sum(format_problem(generation) is None for generation in generations) / len(generations)


@dataclass(frozen=True)
class LengthStats:
    mean_tokens: float
    mean_chars: float
    finished_rate: float  # fraction that ended with the end token

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def response_length(generations: Sequence[Generation]) -> LengthStats:
    """Mean response length in tokens and characters, and the fraction that stopped on their own."""
    if not generations:
        return LengthStats(mean_tokens=math.nan, mean_chars=math.nan, finished_rate=math.nan)
    count = len(generations)
    return LengthStats(
        mean_tokens=sum(generation.num_tokens for generation in generations) / count,
        mean_chars=sum(len(generation.text) for generation in generations) / count,
        finished_rate=sum(generation.finished for generation in generations) / count,
    )
