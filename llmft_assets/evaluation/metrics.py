"""Answer accuracy, format compliance, finish rate and response length of generated answers (pure Python).

Whether an answer is right is decided by :mod:`llmft_assets.evaluation.answer_check` (math-verify, with
the data pipeline's own ``\\boxed{}`` extraction); this module aggregates those verdicts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from llmft_assets.data.validation import THINK_CLOSE, THINK_OPEN, think_balance_problem
from llmft_assets.evaluation.answer_check import Verdict


@dataclass(frozen=True)
class Generation:
    """One generated answer: the text (special tokens removed), its length in tokens, and whether the
    model ended it with the end-of-turn token (False: it ran out of ``max_new_tokens``)."""

    text: str
    num_tokens: int
    finished: bool


@dataclass(frozen=True)
class AccuracyResult:
    accuracy: float  # correct / checkable; NaN when no row is checkable
    num_correct: int
    num_checkable: int
    num_rows: int


def answer_accuracy(verdicts: Sequence[Verdict]) -> AccuracyResult:
    """Verified accuracy over the rows that have a reference answer (``Verdict.correct`` not None).

    The verdicts come from :mod:`llmft_assets.evaluation.answer_check` (math-verify equivalence).
    """
    checked = [verdict.correct for verdict in verdicts if verdict.correct is not None]
    num_correct = sum(checked)
    return AccuracyResult(
        accuracy=num_correct / len(checked) if checked else math.nan,
        num_correct=num_correct,
        num_checkable=len(checked),
        num_rows=len(verdicts),
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


def finish_rate(generations: Sequence[Generation]) -> float:
    """Fraction of generations that stopped at the end token rather than at max_new_tokens (NaN if none)."""
    if not generations:
        return math.nan
    return sum(generation.finished for generation in generations) / len(generations)


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
        finished_rate=finish_rate(generations),
    )
