"""The evaluation step: base model vs the candidate adapter (vs the champion) on the same test rows, the
gate's decision on every criterion, the report written, and both recorded in MLflow (run metrics and
artifacts; version tags the registry and the next evaluation read). No Dagster import.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmft_assets.evaluation.gate import GateThresholds
from llmft_assets.manifests import AdapterManifest, EvalManifest
from llmft_assets.training.registration import CHAMPION_ALIAS, Tracker

Log = Callable[[str], None]


class EmptyTestSplit(ValueError):
    """Nothing to evaluate (no retry can fix it)."""


TRAFFIC_REPORT_SUBDIR = "traffic_slice"


@dataclass(frozen=True)
class EvalSettings:
    max_rows: int
    max_new_tokens: int
    batch_size: int
    compare_champion: bool
    answer_timeout_s: float


@dataclass(frozen=True)
class Candidate:
    """The adapter under evaluation and the base model it was trained on."""

    adapter_dir: Path
    adapter_version: str
    adapter: AdapterManifest
    base_model_dir: Path
    base_model_name: str
    traffic_slice: tuple[str, Path | None] | None = None
    """(retraining_dataset version, its traffic slice) for an adapter trained on a retraining dataset."""


@dataclass
class EvalOutcome:
    report: Any  # EvalReport, with .gate set
    passed: bool
    reasons: list[str]
    manifest: EvalManifest
    traffic_report: Any = None  # the same adapter scored on its retraining dataset's traffic slice
    retraining_dataset_version: str | None = None


def gate_tags(gate: dict[str, Any]) -> dict[str, str]:
    """MLflow version tags: the decision and, per criterion, "verdict: value comparator threshold"."""
    tags = {
        "llmft.gate.passed": str(bool(gate["passed"])).lower(),
        "llmft.gate.champion": str(gate["champion"]),
    }
    for criterion in gate["criteria"]:
        value, threshold = criterion["value"], criterion["threshold"]
        shown = "n/a" if value is None else f"{value:.4g}"
        limit = "" if threshold is None else f" (needs {criterion['comparator']} {threshold:.4g})"
        tags[f"llmft.gate.{criterion['name']}"] = f"{criterion['verdict']}: {shown}{limit}"
    return tags


def evaluate_candidate(
    candidate: Candidate,
    test_split: Path,
    *,
    settings: EvalSettings,
    thresholds: GateThresholds,
    tracker: Tracker,
    champion_adapter_dir: Callable[[str], Path],
    staging: Path,
    log: Log,
) -> EvalOutcome:
    """Score, decide, write the report into `staging`, record it in MLflow."""
    from llmft_assets.evaluation.gate import decide_gate_for_report, traffic_scores_from_report
    from llmft_assets.evaluation.report import evaluate
    from llmft_assets.storage.tables import iter_parquet_rows

    rows = next(iter_parquet_rows(test_split, batch_size=settings.max_rows), [])
    if not rows:
        raise EmptyTestSplit("the test split is empty: nothing to evaluate")
    champion = tracker.get_version_by_alias(CHAMPION_ALIAS)
    champion_name = f"llmft-adapter v{champion.version}" if champion is not None else None
    champion_dir = None
    if settings.compare_champion and champion is not None:
        champion_artifact = (champion.tags or {}).get("llmft.adapter_version")
        if champion_artifact and champion_artifact != candidate.adapter_version:
            champion_dir = champion_adapter_dir(champion_artifact)
    log(f"evaluating on {len(rows)} test rows (champion: {champion_name or 'none'})")

    def evaluate_on(eval_rows: list[dict[str, Any]]) -> Any:
        return evaluate(
            candidate.base_model_dir,
            candidate.adapter_dir,
            eval_rows,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            answer_timeout_s=settings.answer_timeout_s,
            champion_adapter_dir=champion_dir,
            base_model_name=candidate.base_model_name,
            adapter_name=f"adapter {candidate.adapter_version}",
            champion_name=champion_name if champion_dir is not None else None,
        )

    report = evaluate_on(rows)
    traffic_rows = _traffic_slice_rows(candidate, settings.max_rows)
    traffic_report = None
    if traffic_rows is not None:
        log(f"evaluating on {len(traffic_rows)} traffic-slice rows of {candidate.traffic_slice[0]}")  # type: ignore[index]
        traffic_report = evaluate_on(traffic_rows)
    # The champion not scored on these rows (same adapter, or compare_champion off): its registry metrics;
    # none recorded fails the champion criteria (nothing to compare with) rather than skipping them.
    registry_metrics = None
    if champion is not None and champion_dir is None:
        registry_metrics = json.loads((champion.tags or {}).get("llmft.eval", "{}"))
    decision = decide_gate_for_report(
        report,
        thresholds=thresholds,
        champion=registry_metrics,
        champion_name=champion_name,
        traffic=None if traffic_report is None else traffic_scores_from_report(traffic_report),
    )
    report.gate = {**decision.as_dict(), "champion_version": str(champion.version) if champion else None}
    report.write(staging)
    if traffic_report is not None:  # the traffic slice's own report, with the same (whole) decision
        traffic_report.gate = report.gate
        traffic_report.write(staging / TRAFFIC_REPORT_SUBDIR)
    _record_in_mlflow(tracker, report, candidate, staging)
    log(f"gate: {'PROMOTE' if decision.passed else 'REFUSE'}; " + "; ".join(decision.reasons))
    manifest = EvalManifest(
        headline=report.headline(),
        adapter_version=candidate.adapter_version,
        registered_version=candidate.adapter.registered_version,
        gate_passed=decision.passed,
    )
    return EvalOutcome(
        report=report,
        passed=decision.passed,
        reasons=list(decision.reasons),
        manifest=manifest,
        traffic_report=traffic_report,
        retraining_dataset_version=None if candidate.traffic_slice is None else candidate.traffic_slice[0],
    )


def _traffic_slice_rows(candidate: Candidate, max_rows: int) -> list[dict[str, Any]] | None:
    """The first rows of the adapter's traffic slice; None for an adapter trained on dataset_splits.
    Raises EmptyTestSplit when a retrained adapter has no traffic rows: the gate would otherwise promote
    on the standard split alone."""
    from llmft_assets.storage.tables import iter_parquet_rows

    if candidate.traffic_slice is None:
        return None
    version, path = candidate.traffic_slice
    rows = [] if path is None else next(iter_parquet_rows(path, batch_size=max_rows), [])
    if not rows:
        raise EmptyTestSplit(
            f"retraining_dataset {version} has no traffic slice rows: the retrained adapter cannot be judged "
            "on the traffic it was trained for"
        )
    return rows


def _record_in_mlflow(tracker: Tracker, report: Any, candidate: Candidate, staging: Path) -> None:
    """Metrics and the report into the adapter's training run; the decision on its registry version."""
    run_id, version = candidate.adapter.mlflow_run_id, candidate.adapter.registered_version
    if run_id:
        headline = report.headline()
        metrics = {f"eval.{k}": float(v) for k, v in headline.items() if isinstance(v, int | float)}
        tracker.log_metrics(run_id, metrics, step=0)
        tracker.log_artifacts(run_id, staging, "eval_report")
    if version:
        tracker.set_version_tags(
            version,
            {
                "llmft.adapter_version": candidate.adapter_version,
                "llmft.eval": json.dumps(report.metrics_for("adapter")),
                **gate_tags(report.gate),
            },
        )
