"""Accuracy, format compliance, response length and the eval report's JSON/HTML (pure, no model)."""

from __future__ import annotations

import json
import math

import pytest

from llmft_assets.evaluation.metrics import (
    Generation,
    answer_accuracy,
    answer_is_correct,
    format_compliance,
    format_problem,
    response_length,
)
from llmft_assets.evaluation.report import EvalReport, ModelMetrics, SampleComparison, row_problem

GOOD = "<think>\n3 + 4 = 7\n</think>\n\nThe answer is \\(\\boxed{7}\\)."


def test_answer_is_correct_uses_last_box_and_normalisation() -> None:
    assert answer_is_correct(GOOD, "7")
    assert answer_is_correct("first \\boxed{3}, finally \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")
    assert answer_is_correct("\\boxed{0.50}", ".5")
    assert answer_is_correct("\\boxed{x = 5}", "5")
    assert answer_is_correct("\\boxed{8}", "7") is False
    assert answer_is_correct("The answer is 7.", "7") is False  # no box: wrong, not skipped
    assert answer_is_correct("\\boxed{7}", None) is None  # no reference: not checkable
    assert answer_is_correct("\\boxed{7}", "  ") is None


def test_answer_accuracy_counts_only_checkable_rows() -> None:
    result = answer_accuracy(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "no answer"], ["1", "5", None, "4"])
    assert (result.num_correct, result.num_checkable, result.num_rows) == (1, 3, 4)
    assert result.accuracy == pytest.approx(1 / 3)
    assert math.isnan(answer_accuracy(["\\boxed{1}"], [None]).accuracy)
    with pytest.raises(ValueError, match="2 generations but 1 references"):
        answer_accuracy(["a", "b"], ["a"])


@pytest.mark.parametrize(
    ("text", "finished", "problem"),
    [
        (GOOD, True, None),
        (GOOD, False, "ran out of max_new_tokens"),
        ("The answer is \\boxed{7}", True, "no <think> block"),
        ("<think> still thinking", True, "<think> never closed"),
        ("<think>a</think> b </think> c", True, "</think> without <think>"),
        ("<think> a <think> b </think></think> 7", True, "nested <think>"),
        ("<think>reasoning</think>\n  ", True, "nothing after </think>"),
    ],
)
def test_format_problem(text: str, finished: bool, problem: str | None) -> None:
    found = format_problem(Generation(text=text, num_tokens=10, finished=finished))
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_format_compliance_and_lengths() -> None:
    generations = [
        Generation(GOOD, 20, True),
        Generation(GOOD, 64, False),
        Generation("\\boxed{7}", 4, True),
        Generation("<think>x</think>\\boxed{1}", 8, True),
    ]
    assert format_compliance(generations) == pytest.approx(0.5)
    lengths = response_length(generations)
    assert lengths.mean_tokens == pytest.approx((20 + 64 + 4 + 8) / 4)
    assert lengths.mean_chars == pytest.approx(sum(len(g.text) for g in generations) / 4)
    assert lengths.finished_rate == pytest.approx(0.75)
    assert math.isnan(format_compliance([]))
    assert math.isnan(response_length([]).mean_tokens)


def test_row_problem_names_each_defect() -> None:
    good = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "input_ids": [1, 2, 3],
        "labels": [-100, -100, 3],
    }
    assert row_problem(good) is None
    assert row_problem({**good, "messages": []}) == "messages missing or empty"
    assert (
        row_problem({**good, "messages": [{"role": "assistant", "content": "a"}]}) == "no user turn to answer"
    )
    assert row_problem({**good, "messages": [{"role": "user", "content": None}]}) is not None
    assert "different lengths" in (row_problem({**good, "labels": [-100, 3]}) or "")
    assert row_problem({**good, "labels": [-100, -100, -100]}) == "no assistant tokens in labels"


def _report() -> EvalReport:
    def model_metrics(accuracy: float | None, perplexity: float) -> ModelMetrics:
        return ModelMetrics(
            perplexity=perplexity,
            accuracy=accuracy,
            num_correct=0 if accuracy is None else round(accuracy * 4),
            num_checkable=4,
            format_compliance=0.5,
            mean_response_tokens=12.5,
            mean_response_chars=40.0,
            finished_rate=0.75,
        )

    return EvalReport(
        base_model="tiny <base>",
        adapter="adapter v1",
        champion=None,
        num_rows=4,
        settings={"max_new_tokens": 32, "seed": 0},
        models={"base": model_metrics(0.25, 20.0), "adapter": model_metrics(0.75, 12.0)},
        samples=[
            SampleComparison(
                id="row-1",
                prompt="What is <script>alert('x')</script> & 2?",
                reference_answer="7",
                outputs={"base": "</pre><b>bold</b>", "adapter": GOOD},
                correct={"base": False, "adapter": True},
            )
        ],
        skipped=[{"id": "row-9", "reason": "no user turn to answer"}],
        created_at="2025-01-01T00:00:00+00:00",
        eval_seconds=1.5,
    )


def test_report_headline_json_round_trip() -> None:
    report = _report()
    headline = report.headline()
    assert headline["adapter_accuracy"] == 0.75
    assert headline["accuracy_delta"] == pytest.approx(0.5)
    assert headline["perplexity_delta"] == pytest.approx(-8.0)
    assert headline["num_skipped"] == 1
    parsed = json.loads(report.to_json())
    assert parsed["models"]["base"]["perplexity"] == 20.0
    assert EvalReport.from_json(report.to_json()) == report
    assert report.metrics_for("adapter")["accuracy"] == 0.75


def test_report_json_refuses_nan() -> None:
    report = _report()
    report.settings["bad"] = math.nan
    with pytest.raises(ValueError):
        report.to_json()


def test_report_html_is_standalone_and_escaped(tmp_path) -> None:
    report = _report()
    report.gate = {"passed": False, "reasons": ["base: <accuracy> did not beat"]}
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; 2?" in page
    assert "&lt;/pre&gt;&lt;b&gt;bold&lt;/b&gt;" in page
    assert "tiny &lt;base&gt;" in page
    assert "&lt;accuracy&gt; did not beat" in page and "FAILED" in page
    assert "75.0%" in page and "+50.0%" in page  # adapter accuracy and its delta over the base
    assert "row-9" in page and "http" not in page  # nothing fetched from outside
    json_path, html_path = report.write(tmp_path / "out")
    assert json.loads(json_path.read_text())["adapter"] == "adapter v1"
    assert html_path.read_text() == page
