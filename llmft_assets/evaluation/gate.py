"""The promotion gate: may this adapter become the champion? (pure, no I/O)

The candidate, the base model and the current champion are scored on the same test rows. Every criterion
below must pass (a champion criterion is ``skipped`` when there is no champion yet):

==============================  ====================================================================
``accuracy_gain``               verified accuracy minus the base model's, on the rows both can be checked
                                on, is greater than ``min_accuracy_gain`` (0: strictly better)
``accuracy_significance``       one-sided exact McNemar test on those paired rows: p <= ``alpha``, so an
                                adapter that wins by noise (a few rows either way) is not promoted
``format_compliance``           at least ``min_format_compliance`` (closed ``<think>``, answer, end token)
``finish_rate``                 at least ``min_finish_rate`` stopped at the end token
``perplexity``                  at most the base model's x ``max_perplexity_ratio`` (assistant tokens)
``champion_accuracy``           at least the champion's - ``champion_tolerance``
``champion_format_compliance``  at least the champion's - ``champion_tolerance``
``champion_finish_rate``        at least the champion's - ``champion_tolerance``
``champion_perplexity``         at most the champion's x (1 + ``champion_perplexity_tolerance``)
``traffic_perplexity``          on the traffic slice (a drift retraining's held-out rows shaped like the
                                served traffic): below the reference's x (1 - ``traffic_min_perplexity_gain``)
``traffic_accuracy``            on the traffic slice: at least the reference's - ``champion_tolerance``
==============================  ====================================================================

The traffic criteria are only decided when a :class:`TrafficSliceScores` is given (an ordinary training
has no traffic slice, and its decision keeps exactly the criteria above). Their reference is the champion scored on the slice (the base model when there is
no champion yet). With the champion criteria, a drift retraining is promoted only if it is better on what
users now ask and not worse beyond tolerance on the standard test split.

A metric that is missing or not a finite number fails the criterion that needs it, with the reason; it
is never treated as zero. The thresholds live in :class:`GateThresholds` (defaults below); the Dagster
config of ``eval_report`` is derived from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from llmft_assets.evaluation.report import EvalReport

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
# Equal counts of correct answers must compare equal despite float rounding (0.1 + 0.2 != 0.3).
EPSILON = 1e-9
# The metric names of a model's scores (``ModelMetrics.as_dict()``) the gate reads.
ACCURACY, FORMAT, FINISH, PERPLEXITY = "accuracy", "format_compliance", "finished_rate", "perplexity"
CORRECT_BY_ROW = "correct_by_row"  # optional: {row id: True | False | None} for the paired test


class GateThresholds(BaseModel):
    """The gate's thresholds: the one home of their defaults (Dagster's eval_report config derives from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="significance level of the one-sided exact McNemar test (1: off)",
    )
    min_accuracy_gain: float = Field(
        default=0.0,
        ge=-1,
        le=1,
        description="accuracy the adapter must gain over the base, strictly (negative: may lose up to this)",
    )
    min_format_compliance: float = Field(default=0.8, ge=0, le=1, description="lowest format compliance")
    min_finish_rate: float = Field(
        default=0.8, ge=0, le=1, description="lowest fraction of answers stopped at the end token"
    )
    max_perplexity_ratio: float = Field(
        default=1.0, gt=0, description="adapter perplexity at most base perplexity x this"
    )
    champion_tolerance: float = Field(
        default=0.02, ge=0, le=1, description="largest drop below the champion on accuracy/format/finish rate"
    )
    champion_perplexity_tolerance: float = Field(
        default=0.05, ge=0, description="largest relative perplexity increase over the champion"
    )
    traffic_min_perplexity_gain: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="relative perplexity drop below the reference required on the traffic slice (0: lower)",
    )


Comparator = Literal[">", ">=", "<", "<="]


@dataclass(frozen=True)
class Criterion:
    """One criterion's outcome: ``value`` compared with ``threshold`` by ``comparator``."""

    name: str
    value: float | None
    threshold: float | None
    comparator: str
    verdict: str  # "pass" | "fail" | "skipped"
    reason: str

    @property
    def passed(self) -> bool:
        return self.verdict != FAIL


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per criterion, in order
    criteria: list[Criterion] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    champion: str | None = None  # which champion the candidate was compared with

    @property
    def failed(self) -> list[str]:
        return [criterion.name for criterion in self.criteria if criterion.verdict == FAIL]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        return cls(
            passed=bool(data["passed"]),
            reasons=list(data.get("reasons", [])),
            criteria=[Criterion(**criterion) for criterion in data.get("criteria", [])],
            thresholds=dict(data.get("thresholds", {})),
            champion=data.get("champion"),
        )


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """One-sided exact McNemar p-value: P(at least ``wins`` of the ``wins + losses`` discordant rows go
    the candidate's way when both models are equally good, i.e. each way with probability 1/2).

    ``wins``: rows the candidate gets right and the reference gets wrong; ``losses``: the reverse.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got {wins}, {losses}")
    discordant = wins + losses
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(wins, discordant + 1))
    return tail / 2**discordant


@dataclass(frozen=True)
class PairedCounts:
    rows: int  # rows where both verdicts are known
    both: int
    only_candidate: int  # candidate right, reference wrong
    only_reference: int
    neither: int

    @property
    def gain(self) -> float:
        return (self.only_candidate - self.only_reference) / self.rows if self.rows else math.nan


def paired_counts(candidate: Mapping[str, bool | None], reference: Mapping[str, bool | None]) -> PairedCounts:
    """The 2x2 table of two models' verdicts on the rows both have a verdict for (by row id)."""
    pairs = [
        (candidate[row], reference[row])
        for row in candidate
        if row in reference and candidate[row] is not None and reference[row] is not None
    ]
    return PairedCounts(
        rows=len(pairs),
        both=sum(ours and theirs for ours, theirs in pairs),
        only_candidate=sum(ours and not theirs for ours, theirs in pairs),
        only_reference=sum(theirs and not ours for ours, theirs in pairs),
        neither=sum(not ours and not theirs for ours, theirs in pairs),
    )


# --------------------------------------------------------------------------------------------------
# Criteria
# --------------------------------------------------------------------------------------------------


def _number(scores: Mapping[str, Any] | None, name: str) -> float | None:
    value = None if scores is None else scores.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _holds(value: float, comparator: str, threshold: float) -> bool:
    if comparator == ">":
        return value > threshold + EPSILON
    if comparator == ">=":
        return value >= threshold - EPSILON
    if comparator == "<":
        return value < threshold - EPSILON
    return value <= threshold + EPSILON


def _compare(
    name: str, value: float | None, comparator: Comparator, threshold: float | None, what: str
) -> Criterion:
    """A criterion ``value comparator threshold``; ``what`` says what the value and threshold are."""
    if value is None or threshold is None:
        missing = "the adapter's value" if value is None else "the value it is compared with"
        return Criterion(
            name, value, threshold, comparator, FAIL, f"{name}: {missing} is missing or not a number ({what})"
        )
    ok = _holds(value, comparator, threshold)
    sign = comparator if ok else {">": "<=", ">=": "<", "<": ">=", "<=": ">"}[comparator]
    return Criterion(
        name, value, threshold, comparator, PASS if ok else FAIL,
        f"{name}: {value:.4g} {sign} {threshold:.4g} ({what}) -> {PASS if ok else FAIL}",
    )  # fmt: skip


def _no_paired_test(reason: str, thresholds: GateThresholds) -> list[Criterion]:
    return [
        Criterion("accuracy_gain", None, thresholds.min_accuracy_gain, ">", FAIL, f"accuracy_gain: {reason}"),
        Criterion("accuracy_significance", None, thresholds.alpha, "<=", FAIL, f"accuracy_significance: {reason}"),
    ]  # fmt: skip


def _accuracy_criteria(
    candidate: Mapping[str, Any], base: Mapping[str, Any], thresholds: GateThresholds
) -> list[Criterion]:
    ours, theirs = candidate.get(CORRECT_BY_ROW), base.get(CORRECT_BY_ROW)
    if not isinstance(ours, Mapping) or not isinstance(theirs, Mapping):
        return _no_paired_test(
            "no per-row correctness for the adapter and the base model: a paired test is impossible",
            thresholds,
        )
    counts = paired_counts(ours, theirs)
    if counts.rows == 0:
        return _no_paired_test(
            "no row has a checkable answer for both the adapter and the base model", thresholds
        )
    adapter_acc = (counts.both + counts.only_candidate) / counts.rows
    base_acc = (counts.both + counts.only_reference) / counts.rows
    gain = _compare(
        "accuracy_gain", counts.gain, ">", thresholds.min_accuracy_gain,
        f"adapter {adapter_acc:.4g} - base {base_acc:.4g} on {counts.rows} paired rows",
    )  # fmt: skip
    p_value = mcnemar_exact_p(counts.only_candidate, counts.only_reference)
    significance = _compare(
        "accuracy_significance", p_value, "<=", thresholds.alpha,
        f"exact McNemar, one-sided: adapter alone right on {counts.only_candidate}, "
        f"base alone right on {counts.only_reference} of {counts.rows} rows",
    )  # fmt: skip
    return [gain, significance]


def _champion_criteria(
    candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, thresholds: GateThresholds
) -> list[Criterion]:
    names = ("champion_accuracy", "champion_format_compliance", "champion_finish_rate", "champion_perplexity")
    if champion is None:
        return [
            Criterion(name, None, None, "", SKIPPED, f"{name}: no champion yet -> {SKIPPED}")
            for name in names
        ]
    tolerance, criteria = thresholds.champion_tolerance, []
    for name, metric, label in zip(
        names[:3], (ACCURACY, FORMAT, FINISH), ("accuracy", "format compliance", "finish rate"), strict=True
    ):
        reference = _number(champion, metric)
        threshold = None if reference is None else reference - tolerance
        what = f"champion's {label} {reference if reference is None else f'{reference:.4g}'} - tolerance {tolerance:g}"
        criteria.append(_compare(name, _number(candidate, metric), ">=", threshold, what))
    reference = _number(champion, PERPLEXITY)
    relative = thresholds.champion_perplexity_tolerance
    threshold = None if reference is None else reference * (1 + relative)
    what = (
        f"champion's perplexity {reference if reference is None else f'{reference:.4g}'} x (1 + {relative:g})"
    )
    criteria.append(_compare(names[3], _number(candidate, PERPLEXITY), "<=", threshold, what))
    return criteria


@dataclass(frozen=True)
class TrafficSliceScores:
    """The candidate's and the reference's metrics on the traffic slice (``ModelMetrics.as_dict()``)."""

    candidate: Mapping[str, Any]
    reference: Mapping[str, Any]
    reference_name: str = "champion"  # "base" when there is no champion yet
    rows: int = 0


def _traffic_criteria(traffic: TrafficSliceScores | None, thresholds: GateThresholds) -> list[Criterion]:
    if traffic is None:
        return []
    who, rows = traffic.reference_name, f"{traffic.rows} traffic-slice rows"
    reference_ppl = _number(traffic.reference, PERPLEXITY)
    gain = thresholds.traffic_min_perplexity_gain
    perplexity = _compare(
        "traffic_perplexity", _number(traffic.candidate, PERPLEXITY), "<",
        None if reference_ppl is None else reference_ppl * (1 - gain),
        f"{who}'s perplexity {reference_ppl if reference_ppl is None else f'{reference_ppl:.4g}'} "
        f"x (1 - {gain:g}) on {rows}",
    )  # fmt: skip
    reference_acc = _number(traffic.reference, ACCURACY)
    tolerance = thresholds.champion_tolerance
    accuracy = _compare(
        "traffic_accuracy", _number(traffic.candidate, ACCURACY), ">=",
        None if reference_acc is None else reference_acc - tolerance,
        f"{who}'s accuracy {reference_acc if reference_acc is None else f'{reference_acc:.4g}'} "
        f"- tolerance {tolerance:g} on {rows}",
    )  # fmt: skip
    return [perplexity, accuracy]


def decide_gate(
    candidate: Mapping[str, Any],
    base: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    *,
    thresholds: GateThresholds | None = None,
    champion_name: str | None = None,
    traffic: TrafficSliceScores | None = None,
) -> GateDecision:
    """Decide whether ``candidate`` may be promoted (see the module docstring for the criteria).

    ``candidate``, ``base`` and ``champion`` are metric dicts (``ModelMetrics.as_dict()``) with, for the
    paired accuracy test, ``correct_by_row``: {row id: verdict}; ``champion=None`` when there is none.
    ``traffic``: the scores on a drift retraining's traffic slice (None: no traffic criteria).
    """
    thresholds = thresholds or GateThresholds()
    base_ppl = _number(base, PERPLEXITY)
    criteria = [
        *_accuracy_criteria(candidate, base, thresholds),
        _compare(
            "format_compliance", _number(candidate, FORMAT), ">=", thresholds.min_format_compliance,
            "minimum format compliance",
        ),
        _compare(
            "finish_rate", _number(candidate, FINISH), ">=", thresholds.min_finish_rate,
            "minimum share of answers stopped at the end token",
        ),
        _compare(
            "perplexity", _number(candidate, PERPLEXITY), "<=",
            None if base_ppl is None else base_ppl * thresholds.max_perplexity_ratio,
            f"base perplexity {base_ppl if base_ppl is None else f'{base_ppl:.4g}'} "
            f"x {thresholds.max_perplexity_ratio:g}",
        ),
        *_champion_criteria(candidate, champion, thresholds),
        *_traffic_criteria(traffic, thresholds),
    ]  # fmt: skip
    return GateDecision(
        passed=all(criterion.passed for criterion in criteria),
        reasons=[criterion.reason for criterion in criteria],
        criteria=criteria,
        thresholds=thresholds.model_dump(),
        champion=champion_name if champion is not None else None,
    )


def _with_rows(scores: Mapping[str, Any], correct_by_row: Mapping[str, bool | None] | None) -> dict[str, Any]:
    return {**scores, CORRECT_BY_ROW: dict(correct_by_row)} if correct_by_row is not None else dict(scores)


def decide_gate_for_report(
    report: EvalReport,
    *,
    thresholds: GateThresholds | None = None,
    champion: Mapping[str, Any] | None = None,
    champion_name: str | None = None,
    traffic: TrafficSliceScores | None = None,
) -> GateDecision:
    """:func:`decide_gate` on an eval report: adapter vs base on the same rows, and vs the champion.

    The champion's metrics come from the report when it scored the champion on the same rows (the
    fair comparison); otherwise from ``champion`` (e.g. the metrics recorded on the champion's registry
    version), or there is no champion.
    """
    from llmft_assets.evaluation.report import ADAPTER, BASE, CHAMPION

    if CHAMPION in report.models:
        champion_metrics: Mapping[str, Any] | None = report.metrics_for(CHAMPION)
        champion_name = report.champion or champion_name
    else:
        champion_metrics = champion
    return decide_gate(
        _with_rows(report.metrics_for(ADAPTER), report.correct_by_row(ADAPTER)),
        _with_rows(report.metrics_for(BASE), report.correct_by_row(BASE)),
        champion_metrics,
        thresholds=thresholds,
        champion_name=champion_name,
        traffic=traffic,
    )


def traffic_scores_from_report(report: EvalReport) -> TrafficSliceScores:
    """The traffic criteria's input from an eval report run on the traffic slice: the adapter against the
    champion scored on the same rows, or against the base model when the report scored no champion."""
    from llmft_assets.evaluation.report import ADAPTER, BASE, CHAMPION

    reference = CHAMPION if CHAMPION in report.models else BASE
    return TrafficSliceScores(
        candidate=report.metrics_for(ADAPTER),
        reference=report.metrics_for(reference),
        reference_name=CHAMPION if reference == CHAMPION else "base",
        rows=report.num_rows,
    )


def criteria_table(criteria: Sequence[Criterion]) -> list[dict[str, Any]]:
    """Rows for a table (HTML, markdown, model card): name, value, comparator + threshold, verdict."""
    return [
        {
            "criterion": criterion.name,
            "value": criterion.value,
            "threshold": ""
            if criterion.threshold is None
            else f"{criterion.comparator} {criterion.threshold:.4g}",
            "verdict": criterion.verdict,
        }
        for criterion in criteria
    ]
