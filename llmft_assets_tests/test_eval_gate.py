"""The promotion gate: every criterion passing and failing, with the exact outcome (pure)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from llmft_assets.evaluation.gate import (
    GateDecision,
    GateThresholds,
    decide_gate,
    decide_gate_for_report,
    mcnemar_exact_p,
    paired_counts,
)

ALL_CRITERIA = [
    "accuracy_gain",
    "accuracy_significance",
    "format_compliance",
    "finish_rate",
    "perplexity",
    "champion_accuracy",
    "champion_format_compliance",
    "champion_finish_rate",
    "champion_perplexity",
]


def model(
    correct: list[bool | None] | None,
    *,
    format_compliance: float | None = 0.95,
    finished_rate: float | None = 0.95,
    perplexity: float | None = 5.0,
    accuracy: float | None = None,
) -> dict[str, Any]:
    """A model's scores; ``correct`` is its per-row verdict on rows r0, r1, ..."""
    scores: dict[str, Any] = {
        "format_compliance": format_compliance,
        "finished_rate": finished_rate,
        "perplexity": perplexity,
    }
    if correct is not None:
        checked = [c for c in correct if c is not None]
        scores["accuracy"] = sum(checked) / len(checked) if checked else None
        scores["correct_by_row"] = {f"r{i}": c for i, c in enumerate(correct)}
    if accuracy is not None:
        scores["accuracy"] = accuracy
    return scores


# 20 paired rows: the adapter alone is right on 8, the base alone on 0, both on 2 -> p = 2^-8 = 0.0039.
GOOD = model([True] * 10 + [False] * 10, perplexity=4.0)
BASE = model([True] * 2 + [False] * 18, format_compliance=0.1, finished_rate=0.1, perplexity=8.0)


def verdicts(decision: GateDecision) -> dict[str, str]:
    return {criterion.name: criterion.verdict for criterion in decision.criteria}


def test_good_adapter_without_champion_passes_every_criterion() -> None:
    decision = decide_gate(GOOD, BASE, None)
    assert decision.passed
    assert [c.name for c in decision.criteria] == ALL_CRITERIA
    assert verdicts(decision) == {
        **dict.fromkeys(ALL_CRITERIA[:5], "pass"),
        **dict.fromkeys(ALL_CRITERIA[5:], "skipped"),
    }
    assert decision.failed == []
    assert decision.reasons == [
        "accuracy_gain: 0.4 > 0 (adapter 0.5 - base 0.1 on 20 paired rows) -> pass",
        "accuracy_significance: 0.003906 <= 0.05 (exact McNemar, one-sided: adapter alone right on 8, "
        "base alone right on 0 of 20 rows) -> pass",
        "format_compliance: 0.95 >= 0.8 (minimum format compliance) -> pass",
        "finish_rate: 0.95 >= 0.8 (minimum share of answers stopped at the end token) -> pass",
        "perplexity: 4 <= 8 (base perplexity 8 x 1) -> pass",
        "champion_accuracy: no champion yet -> skipped",
        "champion_format_compliance: no champion yet -> skipped",
        "champion_finish_rate: no champion yet -> skipped",
        "champion_perplexity: no champion yet -> skipped",
    ]
    accuracy_gain = decision.criteria[0]
    assert (accuracy_gain.value, accuracy_gain.threshold, accuracy_gain.comparator) == (
        pytest.approx(0.4),
        0.0,
        ">",
    )


def test_accuracy_gain_fails_when_not_better_than_base() -> None:
    same = model([True] * 2 + [False] * 18, perplexity=4.0)
    decision = decide_gate(same, BASE, None)
    assert not decision.passed
    assert decision.failed == ["accuracy_gain", "accuracy_significance"]
    assert decision.reasons[0] == "accuracy_gain: 0 <= 0 (adapter 0.1 - base 0.1 on 20 paired rows) -> fail"
    assert decision.criteria[1].value == 1.0  # no discordant row: p = 1


def test_noise_cannot_promote_a_small_win() -> None:
    # Better on 3 rows, worse on 1: a real gain on paper, but p = 5/16 = 0.3125, so it is noise.
    candidate = model([True, True, True, False] + [False] * 16)
    base = model([False, False, False, True] + [False] * 16, perplexity=8.0)
    decision = decide_gate(candidate, base, None)
    assert verdicts(decision)["accuracy_gain"] == "pass"
    assert verdicts(decision)["accuracy_significance"] == "fail"
    assert decision.failed == ["accuracy_significance"]
    assert decision.criteria[1].value == pytest.approx(5 / 16)
    assert not decision.passed


def test_a_larger_alpha_lets_the_same_win_through() -> None:
    candidate = model([True] * 4 + [False] * 16)
    base = model([False] * 20, perplexity=8.0)  # 4 wins, 0 losses: p = 1/16 = 0.0625
    assert decide_gate(candidate, base, None).failed == ["accuracy_significance"]
    assert decide_gate(candidate, base, None, thresholds=GateThresholds(alpha=0.1)).passed


def test_min_accuracy_gain_is_a_threshold() -> None:
    thresholds = GateThresholds(min_accuracy_gain=0.5)
    decision = decide_gate(GOOD, BASE, None, thresholds=thresholds)
    assert decision.failed == ["accuracy_gain"]
    assert (
        decision.reasons[0] == "accuracy_gain: 0.4 <= 0.5 (adapter 0.5 - base 0.1 on 20 paired rows) -> fail"
    )


def test_paired_test_uses_only_rows_both_can_be_checked_on() -> None:
    # r20 has no reference for the base, r21 is missing from the base: both are left out of the pairs.
    candidate = model([True] * 10 + [False] * 10 + [True, True], perplexity=4.0)
    base = dict(BASE)
    base["correct_by_row"] = {**BASE["correct_by_row"], "r20": None}
    counts = paired_counts(candidate["correct_by_row"], base["correct_by_row"])
    assert (counts.rows, counts.both, counts.only_candidate, counts.only_reference, counts.neither) == (
        20,
        2,
        8,
        0,
        10,
    )


def test_without_per_row_verdicts_there_is_no_paired_test() -> None:
    decision = decide_gate(model(None, accuracy=0.9), model(None, accuracy=0.1, perplexity=8.0), None)
    assert decision.failed == ["accuracy_gain", "accuracy_significance"]
    assert decision.reasons[0] == (
        "accuracy_gain: no per-row correctness for the adapter and the base model: a paired test is impossible"
    )
    nothing_checkable = decide_gate(model([None, None]), model([None, None], perplexity=8.0), None)
    assert nothing_checkable.reasons[1] == (
        "accuracy_significance: no row has a checkable answer for both the adapter and the base model"
    )


@pytest.mark.parametrize(
    ("field", "value", "criterion", "reason"),
    [
        ("format_compliance", 0.5, "format_compliance", "format_compliance: 0.5 < 0.8 (minimum format compliance) -> fail"),
        ("finished_rate", 0.0, "finish_rate", "finish_rate: 0 < 0.8 (minimum share of answers stopped at the end token) -> fail"),
        ("perplexity", 9.0, "perplexity", "perplexity: 9 > 8 (base perplexity 8 x 1) -> fail"),
        ("finished_rate", None, "finish_rate", "finish_rate: the adapter's value is missing or not a number (minimum share of answers stopped at the end token)"),
        ("format_compliance", math.nan, "format_compliance", "format_compliance: the adapter's value is missing or not a number (minimum format compliance)"),
        ("perplexity", math.inf, "perplexity", "perplexity: the adapter's value is missing or not a number (base perplexity 8 x 1)"),
    ],
)  # fmt: skip
def test_each_absolute_criterion_fails_alone(field: str, value: object, criterion: str, reason: str) -> None:
    decision = decide_gate({**GOOD, field: value}, BASE, None)
    assert not decision.passed
    assert decision.failed == [criterion]
    assert reason in decision.reasons


def test_format_and_finish_at_exactly_the_threshold_pass() -> None:
    decision = decide_gate({**GOOD, "format_compliance": 0.8, "finished_rate": 0.7 + 0.1}, BASE, None)
    assert decision.passed


def test_a_base_without_perplexity_fails_the_perplexity_criterion() -> None:
    decision = decide_gate(GOOD, {**BASE, "perplexity": None}, None)
    assert decision.failed == ["perplexity"]
    assert decision.reasons[4] == (
        "perplexity: the value it is compared with is missing or not a number (base perplexity None x 1)"
    )


CHAMPION = model([True] * 10 + [False] * 10, format_compliance=0.9, finished_rate=0.9, perplexity=4.0)


def test_keeps_up_with_the_champion_passes() -> None:
    decision = decide_gate(GOOD, BASE, CHAMPION, champion_name="llmft-adapter v1")
    assert decision.passed
    assert decision.champion == "llmft-adapter v1"
    assert decision.reasons[5:] == [
        "champion_accuracy: 0.5 >= 0.48 (champion's accuracy 0.5 - tolerance 0.02) -> pass",
        "champion_format_compliance: 0.95 >= 0.88 (champion's format compliance 0.9 - tolerance 0.02) -> pass",
        "champion_finish_rate: 0.95 >= 0.88 (champion's finish rate 0.9 - tolerance 0.02) -> pass",
        "champion_perplexity: 4 <= 4.2 (champion's perplexity 4 x (1 + 0.05)) -> pass",
    ]


@pytest.mark.parametrize(
    ("field", "value", "criterion", "reason"),
    [
        ("accuracy", 0.7, "champion_accuracy", "champion_accuracy: 0.5 < 0.68 (champion's accuracy 0.7 - tolerance 0.02) -> fail"),
        ("format_compliance", 1.0, "champion_format_compliance", "champion_format_compliance: 0.95 < 0.98 (champion's format compliance 1 - tolerance 0.02) -> fail"),
        ("finished_rate", 1.0, "champion_finish_rate", "champion_finish_rate: 0.95 < 0.98 (champion's finish rate 1 - tolerance 0.02) -> fail"),
        ("perplexity", 3.0, "champion_perplexity", "champion_perplexity: 4 > 3.15 (champion's perplexity 3 x (1 + 0.05)) -> fail"),
        ("accuracy", None, "champion_accuracy", "champion_accuracy: the value it is compared with is missing or not a number (champion's accuracy None - tolerance 0.02)"),
    ],
)  # fmt: skip
def test_regression_against_the_champion_fails_each_criterion(
    field: str, value: object, criterion: str, reason: str
) -> None:
    decision = decide_gate(GOOD, BASE, {**CHAMPION, field: value})
    assert not decision.passed
    assert decision.failed == [criterion]
    assert reason in decision.reasons


def test_champion_tolerance_is_a_threshold() -> None:
    champion = {**CHAMPION, "accuracy": 0.55}
    assert decide_gate(GOOD, BASE, champion).failed == ["champion_accuracy"]  # 0.5 < 0.55 - 0.02
    # 0.5 >= 0.55 - 0.05 exactly, despite 0.55 - 0.05 being 0.5000000000000001 in floating point.
    assert decide_gate(GOOD, BASE, champion, thresholds=GateThresholds(champion_tolerance=0.05)).passed
    strict = decide_gate(GOOD, BASE, champion, thresholds=GateThresholds(champion_tolerance=0.0))
    assert strict.failed == ["champion_accuracy"]


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(8, 0) == 1 / 256
    assert mcnemar_exact_p(3, 1) == pytest.approx(5 / 16)
    assert mcnemar_exact_p(0, 5) == 1.0
    assert mcnemar_exact_p(10, 2) == pytest.approx(79 / 4096)
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 2)


def test_thresholds_are_validated() -> None:
    assert GateThresholds().model_dump() == {
        "alpha": 0.05,
        "min_accuracy_gain": 0.0,
        "min_format_compliance": 0.8,
        "min_finish_rate": 0.8,
        "max_perplexity_ratio": 1.0,
        "champion_tolerance": 0.02,
        "champion_perplexity_tolerance": 0.05,
        "traffic_min_perplexity_gain": 0.0,
    }
    for bad in ({"alpha": 0}, {"champion_tolerance": -0.1}, {"min_finish_rate": 1.5}, {"typo": 1}):
        with pytest.raises(ValidationError):
            GateThresholds(**bad)


def test_decision_round_trips_through_a_dict() -> None:
    decision = decide_gate(GOOD, BASE, CHAMPION, champion_name="v1")
    data = decision.as_dict()
    assert data["passed"] is True and data["thresholds"]["alpha"] == 0.05 and data["champion"] == "v1"
    assert data["criteria"][0] == {
        "name": "accuracy_gain",
        "value": pytest.approx(0.4),
        "threshold": 0.0,
        "comparator": ">",
        "verdict": "pass",
        "reason": decision.reasons[0],
    }
    assert GateDecision.from_dict(data) == decision


def _report(champion: bool) -> Any:
    from llmft_assets.evaluation.report import EvalReport, ModelMetrics, RowOutcome

    def metrics(accuracy: float, perplexity: float) -> ModelMetrics:
        return ModelMetrics(
            perplexity=perplexity,
            accuracy=accuracy,
            num_correct=round(accuracy * 10),
            num_checkable=10,
            format_compliance=1.0,
            mean_response_tokens=5.0,
            mean_response_chars=20.0,
            finished_rate=1.0,
        )

    models = {"base": metrics(0.0, 9.0), "adapter": metrics(0.8, 4.0)}
    correct: dict[str, list[bool]] = {"base": [False] * 10, "adapter": [True] * 8 + [False] * 2}
    if champion:
        models["champion"] = metrics(0.9, 4.0)
        correct["champion"] = [True] * 9 + [False]
    rows = [
        RowOutcome(
            id=f"r{i}",
            correct={name: values[i] for name, values in correct.items()},
            format_ok=dict.fromkeys(models, True),
            finished=dict.fromkeys(models, True),
        )
        for i in range(10)
    ]
    return EvalReport(
        base_model="base", adapter="v2", champion="v1" if champion else None, num_rows=10, settings={},
        models=models, samples=[], rows=rows,
    )  # fmt: skip


def test_gate_for_report_pairs_rows_and_prefers_the_champion_scored_on_the_same_rows() -> None:
    report = _report(champion=False)
    decision = decide_gate_for_report(report)
    assert decision.passed
    assert decision.reasons[1].startswith("accuracy_significance: 0.003906 <= 0.05")
    # A champion recorded elsewhere (registry tags) is used when the report did not score one...
    registry_champion = {"accuracy": 0.95, "format_compliance": 1.0, "finished_rate": 1.0, "perplexity": 4.0}
    from_registry = decide_gate_for_report(report, champion=registry_champion, champion_name="v0")
    assert from_registry.failed == ["champion_accuracy"] and from_registry.champion == "v0"
    # ...and the champion scored on the same rows wins over it.
    report = _report(champion=True)
    decision = decide_gate_for_report(report, champion={"accuracy": 0.1})
    assert decision.failed == ["champion_accuracy"]
    assert decision.champion == "v1"
    assert (
        "champion_accuracy: 0.8 < 0.88 (champion's accuracy 0.9 - tolerance 0.02) -> fail" in decision.reasons
    )


def test_p_value_equal_to_alpha_passes_and_wide_open_thresholds_admit_a_no_gain_adapter() -> None:
    candidate = model([True] * 5 + [False] * 15)
    base = model([False] * 20, perplexity=8.0)  # 5 wins, 0 losses: p = 1/32
    assert decide_gate(candidate, base, None, thresholds=GateThresholds(alpha=1 / 32)).passed
    assert decide_gate(candidate, base, None, thresholds=GateThresholds(alpha=1 / 33)).failed == [
        "accuracy_significance"
    ]
    # What a plumbing smoke test configures: no gain needed, the paired test off, no format or finish floor.
    smoke = GateThresholds(alpha=1.0, min_accuracy_gain=-1.0, min_format_compliance=0.0, min_finish_rate=0.0)
    nothing_learned = model([False] * 20, format_compliance=0.0, finished_rate=0.0, perplexity=8.0)
    assert decide_gate(nothing_learned, base, None).failed == [
        "accuracy_gain",
        "accuracy_significance",
        "format_compliance",
        "finish_rate",
    ]
    assert decide_gate(nothing_learned, base, None, thresholds=smoke).passed


def test_a_champion_without_recorded_metrics_fails_the_champion_criteria() -> None:
    decision = decide_gate(GOOD, BASE, {}, champion_name="llmft-adapter v3")
    assert decision.failed == [
        "champion_accuracy",
        "champion_format_compliance",
        "champion_finish_rate",
        "champion_perplexity",
    ]
    assert decision.reasons[5] == (
        "champion_accuracy: the value it is compared with is missing or not a number "
        "(champion's accuracy None - tolerance 0.02)"
    )
