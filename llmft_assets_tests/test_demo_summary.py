"""The demo's closing summary: base -> adapter on every criterion, and the gate's decision with reasons."""

from __future__ import annotations

from typing import Any

from llmft_assets.demo import eval_summary_lines


def _report(passed: bool) -> dict[str, Any]:
    base = {
        "accuracy": 0.0,
        "format_compliance": 0.0,
        "finished_rate": 0.03125,
        "perplexity": 48.7,
        "mean_response_tokens": 256.0,
    }
    adapter = {
        "accuracy": 0.75,
        "format_compliance": 0.96875,
        "finished_rate": 1.0,
        "perplexity": 1.9,
        "mean_response_tokens": None,  # a missing score shows as n/a, not as 0
    }
    reasons = ["accuracy_gain: 0.75 > 0 (...) -> pass", "finish_rate: 1 >= 0.8 (...) -> pass"]
    return {
        "num_rows": 32,
        "models": {"base": base, "adapter": adapter},
        "gate": {"passed": passed, "reasons": reasons},
    }


def test_summary_shows_every_criterion_before_and_after_and_the_promotion() -> None:
    lines = eval_summary_lines(_report(passed=True))
    assert lines[0] == "  eval on 32 held-out test rows (base -> adapter):"
    assert [line.split()[-3:] for line in lines[1:6]] == [
        ["0.0%", "->", "75.0%"],
        ["0.0%", "->", "96.9%"],
        ["3.1%", "->", "100.0%"],
        ["48.7", "->", "1.9"],
        ["256.0", "->", "n/a"],
    ]
    assert lines[1].strip().startswith("verified accuracy")
    assert lines[3].strip().startswith("finish rate")
    assert lines[6:] == [
        "  gate: PROMOTED to champion",
        "    - accuracy_gain: 0.75 > 0 (...) -> pass",
        "    - finish_rate: 1 >= 0.8 (...) -> pass",
    ]


def test_summary_shows_a_refusal_and_a_missing_decision() -> None:
    assert eval_summary_lines(_report(passed=False))[6] == "  gate: REFUSED (not promoted)"
    report = _report(passed=True)
    del report["gate"]
    assert eval_summary_lines(report)[6:] == [
        "  gate: REFUSED (not promoted)",
        "    - no gate decision in the report",
    ]
