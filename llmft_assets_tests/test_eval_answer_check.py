"""Answer equivalence with math-verify: a table of equal and unequal answers, and the hard deadline."""

from __future__ import annotations

import threading
import time

import pytest

from llmft_assets.evaluation.answer_check import AnswerChecker, Verdict, check_answers

# (generation, reference, correct) — the generation's LAST boxed answer is the one that counts.
TABLE: list[tuple[str, str, bool]] = [
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{5}}", "0.6", True),
    ("\\boxed{\\tfrac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{-0.75}", "-\\frac{3}{4}", True),
    ("\\boxed{1\\frac{1}{2}}", "1.5", True),
    ("\\boxed{1/2}", "\\frac12", True),
    ("\\boxed{3.0}", "3", True),
    ("\\boxed{0.50}", ".5", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    ("\\boxed{1.2}", "12", False),
    ("\\boxed{-\\frac{3}{4}}", "\\frac{3}{4}", False),
    # surds and constants
    ("\\boxed{\\sqrt8}", "2\\sqrt2", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt{2}}", "1.41421356", True),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", True),
    ("\\boxed{\\sqrt{2}}", "1.414", False),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    ("\\boxed{2\\pi}", "\\pi \\cdot 2", True),
    ("\\boxed{3.14159}", "\\pi", False),
    # sets and intervals
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),
    ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", False),
    ("\\boxed{2, 3}", "3, 2", True),
    ("\\boxed{(1,2]}", "(1, 2]", True),
    ("\\boxed{[1,2]}", "(1,2]", False),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3]", False),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty, 3)", True),
    ("\\boxed{\\emptyset}", "\\{\\}", True),
    # percentages
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{50\\%}", "0.5", True),
    ("\\boxed{25\\%}", "50", False),
    # units, degrees, currency, \text{} wrappers, thousands separators
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{5 \\text{ dollars}}", "5", True),
    ("\\boxed{\\$5}", "5", True),
    ("\\boxed{45^\\circ}", "45", True),
    ("\\boxed{\\text{5}}", "5", True),
    ("\\boxed{6\\text{ cm}}", "5", False),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{10^{3}}", "1000", True),
    ("\\boxed{1001}", "1000", False),
    # equations, expressions and word answers
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{x^2+1}", "x^2+2x+1", False),
    ("\\boxed{\\text{(B)}}", "B", True),
    ("\\boxed{A}", "B", False),
    ("\\boxed{\\text{Yes}}", "\\text{No}", False),
    ("\\boxed{\\infty}", "\\infty", True),
    # multiple boxed answers: the last one counts, whatever came before
    ("First \\boxed{3}, then corrected: \\boxed{\\frac{5}{2}}", "2.5", True),
    ("First \\boxed{2.5}, then changed to \\boxed{3}", "\\frac{5}{2}", False),
    # reasoning text around the box, as the model writes it
    ("<think>\n3 + 4 = 7\n</think>\n\nThe answer is \\(\\boxed{7}\\).", "7", True),
    ("The answer is 7.", "7", False),  # no box: wrong, not skipped
]


def test_table_has_enough_pairs_of_both_kinds() -> None:
    assert len(TABLE) >= 40
    assert sum(correct for *_, correct in TABLE) >= 15 and sum(not c for *_, c in TABLE) >= 15


def test_equivalence_table_exact_verdicts() -> None:
    verdicts = check_answers([g for g, _, _ in TABLE], [r for _, r, _ in TABLE])
    wrong = [
        (generated, reference, expected, verdict.reason)
        for (generated, reference, expected), verdict in zip(TABLE, verdicts, strict=True)
        if verdict.correct is not expected
    ]
    assert wrong == []


def test_verdict_reasons() -> None:
    with AnswerChecker() as checker:
        assert checker.check("\\boxed{7}", None) == Verdict(None, "7", "no reference answer")
        assert checker.check("\\boxed{7}", "  ") == Verdict(None, "7", "no reference answer")
        assert checker.check("seven", "7") == Verdict(False, None, "no boxed answer")
        assert checker.check("\\boxed{7}", "7") == Verdict(True, "7", "equal")
        assert checker.check("\\boxed{\\frac{14}{2}}", "7") == Verdict(True, "\\frac{14}{2}", "equal")
        assert checker.check("\\boxed{8}", "7") == Verdict(False, "8", "not equal")
    with pytest.raises(ValueError, match="2 generations but 1 references"):
        check_answers(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="positive"):
        AnswerChecker(timeout_s=0)


# 9^(9^(9^9)) is a big-integer power that sympy evaluates in one C call for minutes: no signal can stop it.
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"


def test_deadline_bounds_a_pathological_answer_in_a_non_main_thread() -> None:
    """Like a Dagster step thread or a server thread: signals are unavailable there, the deadline still holds."""
    results: dict[str, object] = {}

    def run() -> None:
        with AnswerChecker(timeout_s=2.0) as checker:
            started = time.monotonic()
            results["slow"] = checker.check(PATHOLOGICAL, "1")
            results["slow_seconds"] = time.monotonic() - started
            # The checker recovers with a fresh worker for the next answers.
            results["after"] = checker.check_many(["\\boxed{\\frac12}", "\\boxed{3}"], ["0.5", "4"])
            results["timeouts"] = checker.timeouts

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    slow = results["slow"]
    assert isinstance(slow, Verdict) and slow.correct is False and slow.reason.startswith("timed out after")
    assert 2.0 <= float(results["slow_seconds"]) < 10.0  # type: ignore[arg-type]
    assert [v.correct for v in results["after"]] == [True, False]  # type: ignore[union-attr]
    assert results["timeouts"] == 1
