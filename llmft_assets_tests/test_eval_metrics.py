"""Accuracy, format compliance, response length and the eval report's JSON/HTML (pure, no model)."""

from __future__ import annotations

import json
import math

import pytest

from llmft_assets.evaluation.answer_check import Verdict
from llmft_assets.evaluation.metrics import (
    Generation,
    answer_accuracy,
    finish_rate,
    format_compliance,
    format_problem,
    response_length,
)
from llmft_assets.evaluation.report import EvalReport, ModelMetrics, RowOutcome, SampleComparison, row_problem

GOOD = "<think>\n3 + 4 = 7\n</think>\n\nThe answer is \\(\\boxed{7}\\)."


def test_answer_accuracy_counts_only_checkable_rows() -> None:
    verdicts = [
        Verdict(True, "1", "equal"),
        Verdict(False, "2", "not equal"),
        Verdict(None, "3", "no reference answer"),
        Verdict(False, None, "no boxed answer"),
    ]
    result = answer_accuracy(verdicts)
    assert (result.num_correct, result.num_checkable, result.num_rows) == (1, 3, 4)
    assert result.accuracy == pytest.approx(1 / 3)
    assert math.isnan(answer_accuracy([Verdict(None, "1", "no reference answer")]).accuracy)


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
    assert lengths.finished_rate == pytest.approx(0.75) == finish_rate(generations)
    assert math.isnan(finish_rate([]))
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
        rows=[
            RowOutcome(
                id="row-1",
                correct={"base": False, "adapter": True},
                format_ok={"base": False, "adapter": True},
                finished={"base": True, "adapter": True},
            )
        ],
        created_at="2025-01-01T00:00:00+00:00",
        eval_seconds=1.5,
    )


def test_report_headline_json_round_trip() -> None:
    report = _report()
    report.gate = {"passed": True, "reasons": ["ok"]}
    headline = report.headline()
    assert headline["adapter_accuracy"] == 0.75
    assert headline["accuracy_delta"] == pytest.approx(0.5)
    assert headline["perplexity_delta"] == pytest.approx(-8.0)
    assert headline["num_skipped"] == 1
    assert headline["adapter_finished_rate"] == 0.75 and headline["finished_rate_delta"] == 0.0
    assert report.correct_by_row("adapter") == {"row-1": True}
    assert report.correct_by_row("champion") is None
    parsed = json.loads(report.to_json())
    assert parsed["models"]["base"]["perplexity"] == 20.0
    assert EvalReport.from_json(report.to_json()) == report
    assert report.metrics_for("adapter")["accuracy"] == 0.75


def test_report_json_refuses_nan() -> None:
    report = _report()
    report.settings["bad"] = math.nan
    with pytest.raises(ValueError):
        report.to_json()


def test_report_is_not_written_without_a_gate_decision(tmp_path) -> None:
    with pytest.raises(ValueError, match="no gate decision"):
        _report().write(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_html_is_standalone_and_escaped(tmp_path) -> None:
    from llmft_assets.evaluation.gate import decide_gate_for_report

    report = _report()
    decision = decide_gate_for_report(report)
    report.gate = decision.as_dict()
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; 2?" in page
    assert "&lt;/pre&gt;&lt;b&gt;bold&lt;/b&gt;" in page
    assert "tiny &lt;base&gt;" in page
    # The decision and one row per criterion: its value, threshold, verdict and reason.
    assert "REFUSE" in page and "PROMOTE" not in page
    assert decision.failed == ["accuracy_significance", "format_compliance", "finish_rate"]
    assert (
        '<tr><td>finish_rate</td><td class="num">0.75</td><td class="num">&gt;= 0.8</td><td class="fail">fail</td>'
        in page
    )
    assert (
        '<tr><td>perplexity</td><td class="num">12</td><td class="num">&lt;= 20</td><td class="pass">pass</td>'
        in page
    )
    assert '<td class="meta">skipped</td><td>champion_accuracy: no champion yet -&gt; skipped</td>' in page
    assert "75.0%" in page and "+50.0%" in page  # adapter accuracy and its delta over the base
    assert "row-9" in page and "http" not in page  # nothing fetched from outside
    json_path, html_path = report.write(tmp_path / "out")
    written = json.loads(json_path.read_text())
    assert written["adapter"] == "adapter v1" and written["gate"]["passed"] is False
    assert written["rows"][0]["correct"] == {"base": False, "adapter": True}
    assert html_path.read_text() == page
