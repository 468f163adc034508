"""Boxed-answer extraction, answer normalization and the token-length histogram."""

from __future__ import annotations

import pytest

from llmft_assets.data.answers import extract_boxed_answer, normalize_answer
from llmft_assets.data.stats import token_length_histogram


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5}.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{ \\{1, 2\\} }", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
        ("last is broken \\boxed{7} and \\boxed{8", "7"),  # falls back to the last well-formed one
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed 42 is it", "42"),
        ("\\boxedfoo{3}", None),
        ("\\boxed{}", None),
        ("no box", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed_answer(text: str | None, expected: str | None) -> None:
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("$5$", "5"),
        ("5.0", "5"),
        ("0.50", ".5"),
        ("1,000", "1000"),
        ("x = 3", "3"),
        ("90^\\circ", "90"),
        ("\\text{Paris}", "paris"),
        ("\\boxed{12}", "12"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("25\\%", "25"),
    ],
)
def test_normalize_answer_equivalences(left: str, right: str) -> None:
    assert normalize_answer(left) == normalize_answer(right)


def test_normalize_answer_keeps_different_answers_apart() -> None:
    assert normalize_answer("\\frac{1}{2}") != normalize_answer("\\frac{1}{3}")
    assert normalize_answer("12") != normalize_answer("1.2")
    assert normalize_answer(None) == ""


def test_token_length_histogram() -> None:
    result = token_length_histogram([1, 2, 2, 3, 10], bins=3)
    assert result["count"] == 5 and result["min"] == 1 and result["max"] == 10
    assert sum(result["counts"]) == 5 and len(result["edges"]) == 4
    assert result["p50"] == 2.0
    edges = token_length_histogram([5, 50, 500], bins=[0, 64, 256, 1024])
    assert edges["counts"] == [2, 0, 1]
    empty = token_length_histogram([], bins=4)
    assert empty["count"] == 0 and empty["counts"] == []
    with pytest.raises(ValueError, match="bins"):
        token_length_histogram([1], bins=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        token_length_histogram([1], bins=[3, 1])
    with pytest.raises(ValueError, match=">= 0"):
        token_length_histogram([-1], bins=2)
