"""The promotion gate: may this adapter become the champion? (pure, no I/O)

Rules, with ``primary_metric = "accuracy"`` (the default):

1. **Beat the base model.** The candidate's accuracy must be strictly higher than the base model's.
   When the two accuracies are equal (within ``1e-9``: the same count of correct answers on the same
   rows), the tie is broken by perplexity on the assistant tokens: the candidate passes only if its
   perplexity is strictly lower. Equal on both counts fails: the adapter adds nothing.
2. **Do not fall behind the champion.** When there is a champion, the candidate's accuracy must be at
   least ``champion accuracy - tolerance`` (``tolerance`` in the metric's own units: 0.02 = two
   accuracy points). With no champion, rule 2 passes.

With ``primary_metric = "perplexity"`` (lower is better) rule 1 is "perplexity strictly lower than the
base model's" and rule 2 is "perplexity at most ``champion perplexity + tolerance``".
A metric that is missing or not a finite number fails the rule that needs it, with the reason; it is
never treated as zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmft_assets.evaluation.report import EvalReport

HIGHER_IS_BETTER: dict[str, bool] = {"accuracy": True, "format_compliance": True, "perplexity": False}
TIE_BREAKER = "perplexity"
TIE_EPSILON = 1e-9


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _metric(metrics: Mapping[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _better(candidate: float, reference: float, higher_is_better: bool) -> bool:
    return candidate > reference if higher_is_better else candidate < reference


def _beats_base(
    candidate: Mapping[str, Any], base: Mapping[str, Any], primary_metric: str
) -> tuple[bool, str]:
    higher = HIGHER_IS_BETTER[primary_metric]
    ours, theirs = _metric(candidate, primary_metric), _metric(base, primary_metric)
    if ours is None or theirs is None:
        missing = "candidate" if ours is None else "base model"
        return False, f"base: {primary_metric} of the {missing} is missing or not a number"
    if abs(ours - theirs) > TIE_EPSILON:
        if _better(ours, theirs, higher):
            return True, f"base: {primary_metric} {ours:.4g} beats the base model's {theirs:.4g}"
        return False, f"base: {primary_metric} {ours:.4g} does not beat the base model's {theirs:.4g}"
    if primary_metric == TIE_BREAKER:
        return False, f"base: {primary_metric} {ours:.4g} only ties the base model's {theirs:.4g}"
    # Equal primary metric: the tie-breaker decides.
    ours_tb, theirs_tb = _metric(candidate, TIE_BREAKER), _metric(base, TIE_BREAKER)
    if ours_tb is None or theirs_tb is None:
        return False, (
            f"base: {primary_metric} ties at {ours:.4g} and {TIE_BREAKER} is missing, so there is no tie-breaker"
        )
    if _better(ours_tb, theirs_tb, HIGHER_IS_BETTER[TIE_BREAKER]):
        return True, (
            f"base: {primary_metric} ties at {ours:.4g}; {TIE_BREAKER} {ours_tb:.4g} beats the base model's "
            f"{theirs_tb:.4g}"
        )
    return False, (
        f"base: {primary_metric} ties at {ours:.4g} and {TIE_BREAKER} {ours_tb:.4g} does not beat the base "
        f"model's {theirs_tb:.4g}"
    )


def _keeps_up_with_champion(
    candidate: Mapping[str, Any], champion: Mapping[str, Any], primary_metric: str, tolerance: float
) -> tuple[bool, str]:
    higher = HIGHER_IS_BETTER[primary_metric]
    ours, theirs = _metric(candidate, primary_metric), _metric(champion, primary_metric)
    if ours is None:
        return False, f"champion: {primary_metric} of the candidate is missing or not a number"
    if theirs is None:
        return False, f"champion: the champion's {primary_metric} is missing or not a number; cannot compare"
    limit = theirs - tolerance if higher else theirs + tolerance
    # A tiny epsilon so that "exactly at the limit" passes despite float rounding (0.7 - 0.1 != 0.6).
    within = ours >= limit - TIE_EPSILON if higher else ours <= limit + TIE_EPSILON
    bound = "at least" if higher else "at most"
    if within:
        return True, (
            f"champion: {primary_metric} {ours:.4g} is within tolerance {tolerance:g} of the champion's "
            f"{theirs:.4g} ({bound} {limit:.4g})"
        )
    return False, (
        f"champion: {primary_metric} {ours:.4g} falls behind the champion's {theirs:.4g} by more than "
        f"{tolerance:g} (needs {bound} {limit:.4g})"
    )


def decide_gate(
    candidate: Mapping[str, Any],
    base: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    *,
    tolerance: float,
    primary_metric: str = "accuracy",
) -> GateDecision:
    """Decide whether ``candidate`` may be promoted (see the module docstring for the exact rules).

    ``candidate``, ``base`` and ``champion`` are metric dicts (``ModelMetrics.as_dict()`` or the
    report's JSON); ``champion=None`` when no champion exists yet. Every rule adds one reason line.
    """
    if primary_metric not in HIGHER_IS_BETTER:
        raise ValueError(f"primary_metric must be one of {sorted(HIGHER_IS_BETTER)}, got {primary_metric!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number, got {tolerance!r}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")

    beats_base, base_reason = _beats_base(candidate, base, primary_metric)
    reasons = [base_reason]
    passed = beats_base
    if champion is None:
        reasons.append("champion: none registered yet, compared with the base model only")
    else:
        keeps_up, champion_reason = _keeps_up_with_champion(candidate, champion, primary_metric, tolerance)
        reasons.append(champion_reason)
        passed = passed and keeps_up
    return GateDecision(passed=passed, reasons=reasons)


def decide_gate_for_report(
    report: EvalReport,
    *,
    tolerance: float,
    primary_metric: str = "accuracy",
    champion: Mapping[str, Any] | None = None,
) -> GateDecision:
    """:func:`decide_gate` on an eval report: adapter vs base, and vs the champion.

    The champion's metrics come from the report when it scored the champion on the same rows (the
    fair comparison); otherwise from ``champion`` (e.g. the metrics recorded on the champion's registry
    version), or there is no champion.
    """
    from llmft_assets.evaluation.report import ADAPTER, BASE, CHAMPION

    champion_metrics = report.metrics_for(CHAMPION) if CHAMPION in report.models else champion
    return decide_gate(
        report.metrics_for(ADAPTER),
        report.metrics_for(BASE),
        champion_metrics,
        tolerance=tolerance,
        primary_metric=primary_metric,
    )
