"""The promotion gate's rules on their edge cases (pure)."""

from __future__ import annotations

import math

import pytest

from llmft_assets.evaluation.gate import GateDecision, decide_gate


def scores(accuracy: float | None, perplexity: float | None = 10.0) -> dict[str, float | None]:
    return {"accuracy": accuracy, "perplexity": perplexity, "format_compliance": 0.9}


def test_beats_base_without_champion_passes() -> None:
    decision = decide_gate(scores(0.6), scores(0.4), None, tolerance=0.02)
    assert decision.passed
    assert decision.reasons[0].startswith("base: accuracy 0.6 beats")
    assert "none registered" in decision.reasons[1]


def test_worse_than_base_fails_even_without_champion() -> None:
    decision = decide_gate(scores(0.3), scores(0.4), None, tolerance=0.5)
    assert not decision.passed
    assert "does not beat" in decision.reasons[0]


def test_accuracy_tie_is_broken_by_lower_perplexity() -> None:
    assert decide_gate(scores(0.5, 8.0), scores(0.5, 9.0), None, tolerance=0.0).passed
    worse = decide_gate(scores(0.5, 9.5), scores(0.5, 9.0), None, tolerance=0.0)
    assert not worse.passed and "ties at 0.5" in worse.reasons[0]


def test_tie_on_both_metrics_fails() -> None:
    decision = decide_gate(scores(0.5, 9.0), scores(0.5, 9.0), None, tolerance=0.1)
    assert not decision.passed


def test_tie_within_float_noise_counts_as_tie() -> None:
    # 0.1 + 0.2 != 0.3 in floating point; the same count of correct answers must still tie.
    decision = decide_gate(scores(0.1 + 0.2, 12.0), scores(0.3, 9.0), None, tolerance=0.0)
    assert not decision.passed
    assert "ties" in decision.reasons[0]


def test_zero_accuracy_tie_uses_perplexity() -> None:
    # Early adapters often score 0 like the base: lower perplexity is then the only signal.
    assert decide_gate(scores(0.0, 50.0), scores(0.0, 80.0), None, tolerance=0.0).passed


def test_champion_within_tolerance_passes_and_beyond_fails() -> None:
    champion = scores(0.70)
    assert decide_gate(scores(0.69), scores(0.4), champion, tolerance=0.02).passed
    # Exactly at the limit passes despite 0.7 - 0.1 being 0.59999... in floating point.
    assert decide_gate(scores(0.6), scores(0.4), champion, tolerance=0.1).passed
    behind = decide_gate(scores(0.65), scores(0.4), champion, tolerance=0.02)
    assert not behind.passed
    assert "falls behind the champion's 0.7 by more than 0.02" in behind.reasons[1]


def test_better_than_champion_passes_with_zero_tolerance() -> None:
    assert decide_gate(scores(0.8), scores(0.4), scores(0.7), tolerance=0.0).passed


def test_must_pass_both_rules() -> None:
    # Keeps up with the champion but does not beat the base model.
    decision = decide_gate(scores(0.4, 10.0), scores(0.5, 10.0), scores(0.41), tolerance=0.02)
    assert not decision.passed
    assert decision.reasons[1].startswith("champion: accuracy 0.4 is within tolerance")


@pytest.mark.parametrize("missing", [None, math.nan, math.inf, "0.5", True])
def test_missing_or_non_numeric_candidate_metric_fails_with_reason(missing: object) -> None:
    candidate = {"accuracy": missing, "perplexity": 5.0}
    decision = decide_gate(candidate, scores(0.1), None, tolerance=0.0)
    assert not decision.passed
    assert "missing or not a number" in decision.reasons[0]


def test_missing_champion_metric_fails_rather_than_silently_passing() -> None:
    decision = decide_gate(scores(0.6), scores(0.4), {"perplexity": 3.0}, tolerance=0.1)
    assert not decision.passed
    assert "champion's accuracy is missing" in decision.reasons[1]


def test_tie_without_perplexity_fails() -> None:
    decision = decide_gate(scores(0.5, None), scores(0.5, None), None, tolerance=0.0)
    assert not decision.passed
    assert "no tie-breaker" in decision.reasons[0]


def test_perplexity_as_primary_metric_is_lower_is_better() -> None:
    candidate, base, champion = scores(0.0, 8.0), scores(0.0, 9.0), scores(0.0, 7.5)
    assert decide_gate(candidate, base, champion, tolerance=0.5, primary_metric="perplexity").passed
    decision = decide_gate(candidate, base, champion, tolerance=0.4, primary_metric="perplexity")
    assert not decision.passed and "at most 7.9" in decision.reasons[1]
    tie = decide_gate(scores(0.9, 9.0), base, None, tolerance=0.0, primary_metric="perplexity")
    assert not tie.passed


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="primary_metric"):
        decide_gate(scores(0.5), scores(0.4), None, tolerance=0.0, primary_metric="bleu")
    with pytest.raises(ValueError, match=">= 0"):
        decide_gate(scores(0.5), scores(0.4), None, tolerance=-0.1)
    with pytest.raises(ValueError, match="finite"):
        decide_gate(scores(0.5), scores(0.4), None, tolerance=math.nan)


def test_decision_serialises() -> None:
    decision = decide_gate(scores(0.6), scores(0.4), scores(0.6), tolerance=0.0)
    assert decision == GateDecision(passed=True, reasons=decision.reasons)
    assert decision.as_dict() == {"passed": True, "reasons": decision.reasons}
    assert len(decision.reasons) == 2


def test_gate_for_report_prefers_the_champion_scored_on_the_same_rows() -> None:
    from llmft_assets.evaluation.gate import decide_gate_for_report
    from llmft_assets.evaluation.report import EvalReport, ModelMetrics

    def model_metrics(accuracy: float) -> ModelMetrics:
        return ModelMetrics(
            perplexity=10.0,
            accuracy=accuracy,
            num_correct=0,
            num_checkable=10,
            format_compliance=1.0,
            mean_response_tokens=5.0,
            mean_response_chars=20.0,
            finished_rate=1.0,
        )

    report = EvalReport(
        base_model="base",
        adapter="v2",
        champion=None,
        num_rows=10,
        settings={},
        models={"base": model_metrics(0.2), "adapter": model_metrics(0.5)},
        samples=[],
    )
    assert decide_gate_for_report(report, tolerance=0.0).passed
    # A champion recorded elsewhere (registry tags) is used when the report did not score one...
    assert not decide_gate_for_report(report, tolerance=0.0, champion={"accuracy": 0.6}).passed
    # ...and the champion scored on the same rows wins over it.
    report.models["champion"] = model_metrics(0.45)
    report.champion = "v1"
    decision = decide_gate_for_report(report, tolerance=0.0, champion={"accuracy": 0.9})
    assert decision.passed and "champion's 0.45" in decision.reasons[1]
