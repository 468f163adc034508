"""When drift starts a retraining, as a pure state machine the drift retraining sensor only translates.

A failed drift_check (status `drift`) starts a drift-targeted retraining in two stages: a
retraining_dataset run (the rows nearest to the drifted traffic), then, once it succeeded, a training run
on that dataset (release_sensor then evaluates, traffic slice included, and releases). One drift report starts one retraining (the run keys name the
report), and a cooldown spaces retrainings out. The state between sensor evaluations is a
`RetrainCursor` (JSON in the sensor's cursor). No Dagster import: the sensor gathers the observations,
calls `on_check` or `on_pending`, and turns the `RetrainDecision` into run requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llmft_assets import settings
from llmft_assets.training.training_data import RETRAINING_DATASET

# A drift retraining's data run that never shows up (e.g. deleted) is given up after this long.
PENDING_RUN_TIMEOUT_S = 6 * 3600


def retrain_cooldown_s() -> float:
    return settings.get().retrain_cooldown_hours * 3600


@dataclass
class RetrainCursor:
    """What the drift sensor remembers between evaluations (JSON in the sensor's cursor)."""

    handled_check_id: int = -1
    last_retrain_at: float | None = None
    pending: dict[str, Any] | None = None  # the drift retraining whose data run we wait for

    @classmethod
    def parse(cls, raw: str | None) -> RetrainCursor:
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return cls()  # an unreadable cursor starts over; run keys still prevent duplicates
        return cls(
            handled_check_id=int(data.get("handled_check_id", -1)),
            last_retrain_at=data.get("last_retrain_at"),
            pending=data.get("pending"),
        )

    def dump(self) -> str:
        return json.dumps(
            {
                "handled_check_id": self.handled_check_id,
                "last_retrain_at": self.last_retrain_at,
                "pending": self.pending,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class CheckEvaluation:
    """The latest drift_check evaluation: its record id, verdict (None while planned) and report; the day
    (drift_report partition) it judged and the newest day any report exists for."""

    record_id: int
    passed: bool | None
    status: str | None
    report_version: str
    day: str | None = None
    newest_day: str | None = None


@dataclass(frozen=True)
class DataRun:
    """The retraining_dataset run a pending retraining waits for."""

    run_id: str
    finished: bool
    succeeded: bool
    status: str


@dataclass(frozen=True)
class RetrainDecision:
    """What the sensor does: start the data run, start training, or skip (with or without a new cursor)."""

    start: str | None = None  # "retraining_dataset" or "train"
    report_version: str | None = None
    report_day: str | None = None  # the drift_report partition the retraining follows
    data_run_id: str | None = None
    dataset_version: str | None = None  # the retraining_dataset a training run trains on
    skip_reason: str | None = None
    cursor: str | None = None  # None: keep the cursor as it is
    log: str | None = None


def on_check(
    cursor: RetrainCursor,
    check: CheckEvaluation | None,
    *,
    now: float,
    cooldown_s: float,
) -> RetrainDecision:
    """No retraining pending: does the latest drift_check start one?"""
    if check is None:
        return RetrainDecision(skip_reason="drift_check has not run yet")
    if check.record_id <= cursor.handled_check_id:
        return RetrainDecision(skip_reason=f"no drift_check evaluation since #{cursor.handled_check_id}")
    if check.passed is None:  # planned, not evaluated yet: look again next time
        return RetrainDecision(skip_reason="the latest drift_check is still running")
    cursor.handled_check_id = check.record_id
    if check.passed:
        return RetrainDecision(skip_reason="the latest drift_check passed", cursor=cursor.dump())
    if check.status not in (None, "drift"):  # e.g. an unreadable report: worth a look, not a retraining
        return RetrainDecision(
            skip_reason=f"the latest drift_check failed without a drift verdict (status {check.status!r})",
            cursor=cursor.dump(),
        )
    report = check.report_version
    if check.day and check.newest_day and check.day < check.newest_day:
        # A backfilled old day: its traffic is history; what users ask now is in the newest day's report.
        return RetrainDecision(
            skip_reason=f"drift in report {report} for {check.day}, a day older than the newest report's "
            f"({check.newest_day}): a backfill of past traffic, not a live drift event",
            cursor=cursor.dump(),
        )
    if cursor.last_retrain_at is not None and now - cursor.last_retrain_at < cooldown_s:
        until = datetime.fromtimestamp(cursor.last_retrain_at + cooldown_s, UTC).isoformat()
        return RetrainDecision(
            skip_reason=f"drift in report {report}, but retraining is cooling down until {until}",
            cursor=cursor.dump(),
        )
    cursor.last_retrain_at = now
    cursor.pending = {"report_version": report, "report_day": check.day, "requested_at": now}
    return RetrainDecision(
        start=RETRAINING_DATASET,
        report_version=report,
        report_day=check.day,
        cursor=cursor.dump(),
        log=f"drift in report {report}: building its retraining dataset, then training",
    )


def on_pending(
    cursor: RetrainCursor,
    dataset_run: DataRun | None,
    *,
    now: float,
    dataset_version: str | None,
    base_model_version: str | None,
    trained_on: tuple[str | None, str | None] | None,
    carried_over: str | None = None,
) -> RetrainDecision:
    """Second stage: once the drift's retraining_dataset run succeeded, train on that dataset.

    ``carried_over``: why that dataset holds the current splits unchanged (no served traffic in its
    window): training on it would reproduce the current adapter, so the retraining ends there."""
    pending = dict(cursor.pending or {})
    report = str(pending["report_version"])
    if dataset_run is None:
        if now - float(pending.get("requested_at", 0)) > PENDING_RUN_TIMEOUT_S:
            cursor.pending = None
            return RetrainDecision(
                skip_reason=f"{RETRAINING_DATASET} run for drift report {report} never appeared; retraining dropped",
                cursor=cursor.dump(),
            )
        return RetrainDecision(
            skip_reason=f"waiting for the {RETRAINING_DATASET} run of drift report {report}"
        )
    if not dataset_run.finished:
        return RetrainDecision(
            skip_reason=f"waiting for {RETRAINING_DATASET} run {dataset_run.run_id} ({dataset_run.status})"
        )
    cursor.pending = None
    if not dataset_run.succeeded:
        return RetrainDecision(
            skip_reason=f"{RETRAINING_DATASET} run {dataset_run.run_id} ended {dataset_run.status}: no retraining "
            f"for drift report {report} (the next drift event after the cooldown tries again)",
            cursor=cursor.dump(),
        )
    if carried_over:
        reason = (
            f"drift report {report}: {RETRAINING_DATASET} {dataset_version} selected nothing ({carried_over}); "
            "retraining on it would reproduce the current adapter. Nothing to retrain."
        )
        return RetrainDecision(skip_reason=reason, cursor=cursor.dump(), log=reason)
    if trained_on == (dataset_version, base_model_version):
        reason = (
            f"drift report {report}: {RETRAINING_DATASET} {dataset_version} is the one the current "
            f"lora_adapter was trained on, with the same base model ({base_model_version}); retraining would "
            "reproduce it. Nothing to retrain."
        )
        return RetrainDecision(skip_reason=reason, cursor=cursor.dump(), log=reason)
    return RetrainDecision(
        start="train",
        report_version=report,
        data_run_id=dataset_run.run_id,
        dataset_version=dataset_version,
        cursor=cursor.dump(),
    )
