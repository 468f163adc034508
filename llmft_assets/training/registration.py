"""The MLflow lifecycle of an adapter version: log the run's artifacts and register it as `candidate`;
later the gate promotes a candidate to `champion`.

`Tracker` is what these steps need from MLflow (the Dagster layer passes its MLflow resource, which has
exactly these methods); no Dagster import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"


class Tracker(Protocol):
    registered_model_name: str

    def resolved_tracking_uri(self) -> str: ...
    def start_training_run(self, run_name: str, params: Any, tags: Any = None) -> str: ...
    def training_callback(self, run_id: str) -> Any: ...
    def finish_run(self, run_id: str, status: str = "FINISHED") -> None: ...
    def run_url(self, run_id: str) -> str | None: ...
    def log_metrics(self, run_id: str, metrics: Any, step: int = 0) -> None: ...
    def log_adapter(self, run_id: str, adapter_dir: Any, artifact_path: str = "adapter") -> str: ...
    def log_bill_of_materials(self, run_id: str, bom: Any) -> None: ...
    def register_adapter_version(
        self, run_id: str, artifact_path: str = "adapter", tags: Any = None
    ) -> str: ...
    def set_alias(self, alias: str, version: str | int) -> None: ...
    def get_version_by_alias(self, alias: str) -> Any: ...
    def set_version_tags(self, version: str | int, tags: Any) -> None: ...
    def log_artifacts(self, run_id: str, local_dir: Any, artifact_path: str) -> None: ...


@dataclass(frozen=True)
class RegisteredAdapter:
    version: str
    loss_png: bytes | None


def register_candidate(
    tracker: Tracker,
    run_id: str,
    adapter_dir: Path,
    *,
    bom: dict[str, Any],
    result: Any,
    run_key: str,
    dataset_version: str,
) -> RegisteredAdapter:
    """Loss curve, adapter and bill of materials into the run; a new registered version aliased
    `candidate`; the run finished. Returns the version and the loss curve PNG (for the Dagster UI)."""
    from llmft_assets.training.tracking import log_loss_curve, render_loss_curve_png

    loss_png = render_loss_curve_png(result.loss_history)
    log_loss_curve(run_id, result.loss_history, tracking_uri=tracker.resolved_tracking_uri(), png=loss_png)
    tracker.log_adapter(run_id, adapter_dir)
    tracker.log_bill_of_materials(run_id, bom)
    if result.eval_loss is not None:
        tracker.log_metrics(run_id, {"eval_loss": result.eval_loss}, step=result.global_step)
    version = tracker.register_adapter_version(
        run_id, tags={"llmft.run_key": run_key, "llmft.dataset_version": dataset_version}
    )
    tracker.set_alias(CANDIDATE_ALIAS, version)
    tracker.finish_run(run_id)
    return RegisteredAdapter(version=str(version), loss_png=loss_png)


@dataclass(frozen=True)
class Promotion:
    passed: bool
    reasons: list[str]
    candidate: str | None
    previous_champion: str | None
    promoted: bool


def promote_if_passed(tracker: Tracker, gate: dict[str, Any], candidate: str | None) -> Promotion:
    """The gate's decision, re-checked against the registry: a pass whose champion changed since the
    evaluation is refused (its comparison is stale); otherwise a pass makes `candidate` the champion."""
    champion = tracker.get_version_by_alias(CHAMPION_ALIAS)
    current = str(champion.version) if champion else None
    passed = bool(gate["passed"])
    reasons = list(gate["reasons"])
    if passed and current != gate.get("champion_version"):
        passed = False
        reasons.append(
            f"champion changed from {gate.get('champion_version')} to {current} since the evaluation; re-evaluate"
        )
    promoted = bool(passed and candidate)
    if promoted:
        tracker.set_alias(CHAMPION_ALIAS, str(candidate))
    return Promotion(
        passed=passed, reasons=reasons, candidate=candidate, previous_champion=current, promoted=promoted
    )
