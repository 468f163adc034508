"""The gate's traffic-slice criteria: a drift retraining is promoted only if it is better on the traffic
slice and not worse beyond tolerance on the standard split (pure, exact outcomes)."""

from __future__ import annotations

from llmft_assets.evaluation.gate import (
    GateThresholds,
    TrafficSliceScores,
    decide_gate,
    decide_gate_for_report,
    traffic_scores_from_report,
)
from llmft_assets_tests.test_eval_gate import BASE, CHAMPION, GOOD, _report, verdicts

# The champion on the traffic slice: the kind of problem it was not trained for.
CHAMPION_ON_SLICE = {"perplexity": 9.0, "accuracy": 0.2, "format_compliance": 0.9, "finished_rate": 0.9}
RETRAINED_ON_SLICE = {"perplexity": 6.0, "accuracy": 0.3, "format_compliance": 0.9, "finished_rate": 0.9}


def slice_scores(candidate: dict[str, float | None], rows: int = 40) -> TrafficSliceScores:
    return TrafficSliceScores(
        candidate=candidate, reference=CHAMPION_ON_SLICE, reference_name="champion", rows=rows
    )


def test_better_on_the_slice_and_level_on_the_standard_split_is_promoted() -> None:
    decision = decide_gate(GOOD, BASE, CHAMPION, traffic=slice_scores(RETRAINED_ON_SLICE))
    assert decision.passed
    assert verdicts(decision)["traffic_perplexity"] == verdicts(decision)["traffic_accuracy"] == "pass"
    assert decision.reasons[-2:] == [
        "traffic_perplexity: 6 < 9 (champion's perplexity 9 x (1 - 0) on 40 traffic-slice rows) -> pass",
        "traffic_accuracy: 0.3 >= 0.18 (champion's accuracy 0.2 - tolerance 0.02 on 40 traffic-slice rows) -> pass",
    ]


def test_not_better_on_the_slice_is_refused() -> None:
    same = {**RETRAINED_ON_SLICE, "perplexity": 9.0}
    decision = decide_gate(GOOD, BASE, CHAMPION, traffic=slice_scores(same))
    assert not decision.passed
    assert decision.failed == ["traffic_perplexity"]
    assert (
        "traffic_perplexity: 9 >= 9 (champion's perplexity 9 x (1 - 0) on 40 traffic-slice rows) -> fail"
        in (decision.reasons)
    )


def test_a_required_margin_on_the_slice_is_a_threshold() -> None:
    margin = GateThresholds(traffic_min_perplexity_gain=0.4)  # 6 is not below 9 x 0.6 = 5.4
    decision = decide_gate(GOOD, BASE, CHAMPION, thresholds=margin, traffic=slice_scores(RETRAINED_ON_SLICE))
    assert decision.failed == ["traffic_perplexity"]
    assert decision.reasons[-2] == (
        "traffic_perplexity: 6 >= 5.4 (champion's perplexity 9 x (1 - 0.4) on 40 traffic-slice rows) -> fail"
    )
    looser = GateThresholds(traffic_min_perplexity_gain=0.3)  # 6 < 6.3
    assert decide_gate(
        GOOD, BASE, CHAMPION, thresholds=looser, traffic=slice_scores(RETRAINED_ON_SLICE)
    ).passed


def test_worse_on_the_standard_split_beyond_tolerance_is_refused_despite_the_slice() -> None:
    # Better on what users now ask, but it forgot the standard split: perplexity 4 -> 4.5 > 4 x 1.05.
    forgetful = {**GOOD, "perplexity": 4.5}
    decision = decide_gate(forgetful, BASE, CHAMPION, traffic=slice_scores(RETRAINED_ON_SLICE))
    assert not decision.passed
    assert decision.failed == ["champion_perplexity"]
    assert "champion_perplexity: 4.5 > 4.2 (champion's perplexity 4 x (1 + 0.05)) -> fail" in decision.reasons
    assert verdicts(decision)["traffic_perplexity"] == "pass"


def test_lower_accuracy_on_the_slice_fails_and_missing_slice_metrics_fail() -> None:
    worse = {**RETRAINED_ON_SLICE, "accuracy": 0.1}
    decision = decide_gate(GOOD, BASE, CHAMPION, traffic=slice_scores(worse))
    assert decision.failed == ["traffic_accuracy"]
    assert decision.reasons[-1] == (
        "traffic_accuracy: 0.1 < 0.18 (champion's accuracy 0.2 - tolerance 0.02 on 40 traffic-slice rows) -> fail"
    )
    missing = decide_gate(GOOD, BASE, CHAMPION, traffic=slice_scores({"perplexity": None, "accuracy": 0.3}))
    assert missing.failed == ["traffic_perplexity"]
    assert missing.reasons[-2] == (
        "traffic_perplexity: the adapter's value is missing or not a number "
        "(champion's perplexity 9 x (1 - 0) on 40 traffic-slice rows)"
    )


def test_without_a_traffic_slice_the_decision_is_unchanged() -> None:
    with_slice = decide_gate(GOOD, BASE, CHAMPION, traffic=slice_scores(RETRAINED_ON_SLICE))
    without = decide_gate(GOOD, BASE, CHAMPION)
    assert [c.name for c in without.criteria] == [c.name for c in with_slice.criteria][:-2]
    assert without.passed


def test_traffic_scores_come_from_a_report_on_the_slice_against_the_champion_else_the_base() -> None:
    # _report: adapter perplexity 4.0, base 9.0 (and champion 4.0 when scored) on 10 rows.
    with_champion = traffic_scores_from_report(_report(champion=True))
    assert (with_champion.reference_name, with_champion.rows) == ("champion", 10)
    assert with_champion.reference["perplexity"] == with_champion.candidate["perplexity"] == 4.0
    standard = _report(champion=True)
    # The same report as the slice: level with the champion on perplexity (not better), below it on accuracy.
    refused = decide_gate_for_report(standard, traffic=with_champion)
    assert refused.failed == ["champion_accuracy", "traffic_perplexity", "traffic_accuracy"]
    assert refused.reasons[-2:] == [
        "traffic_perplexity: 4 >= 4 (champion's perplexity 4 x (1 - 0) on 10 traffic-slice rows) -> fail",
        "traffic_accuracy: 0.8 < 0.88 (champion's accuracy 0.9 - tolerance 0.02 on 10 traffic-slice rows) -> fail",
    ]
    without = traffic_scores_from_report(_report(champion=False))
    assert without.reference_name == "base" and without.reference["perplexity"] == 9.0
    promoted = decide_gate_for_report(_report(champion=False), traffic=without)
    assert promoted.passed
    assert promoted.reasons[-2] == (
        "traffic_perplexity: 4 < 9 (base's perplexity 9 x (1 - 0) on 10 traffic-slice rows) -> pass"
    )
