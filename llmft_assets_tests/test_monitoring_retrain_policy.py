"""The drift retraining state machine and the incoming-drop plan as pure functions (no Dagster instance):
each decision's outcomes, exactly. The sensors that translate them are tested in test_monitoring_automation."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmft_assets.monitoring.retrain_policy import (
    PENDING_RUN_TIMEOUT_S,
    CheckEvaluation,
    DataRun,
    RetrainCursor,
    on_check,
    on_pending,
)
from llmft_assets.storage import LocalBackend
from llmft_assets.storage.incoming import plan_incoming_runs

DAY = 24 * 3600.0


def _drift(
    record_id: int = 7, report: str = "r1", day: str | None = None, newest_day: str | None = None
) -> CheckEvaluation:
    return CheckEvaluation(
        record_id=record_id,
        passed=False,
        status="drift",
        report_version=report,
        day=day,
        newest_day=newest_day,
    )


def test_a_drift_verdict_starts_the_retraining_dataset_stage_and_remembers_it() -> None:
    cursor = RetrainCursor()
    decision = on_check(cursor, _drift(day="2025-03-10", newest_day="2025-03-10"), now=1000.0, cooldown_s=DAY)
    assert (decision.start, decision.report_version, decision.report_day, decision.skip_reason) == (
        "retraining_dataset",
        "r1",
        "2025-03-10",
        None,
    )
    assert RetrainCursor.parse(decision.cursor) == RetrainCursor(
        handled_check_id=7,
        last_retrain_at=1000.0,
        pending={"report_version": "r1", "report_day": "2025-03-10", "requested_at": 1000.0},
    )


def test_drift_in_a_backfilled_old_day_is_history_not_a_retraining() -> None:
    old = on_check(
        RetrainCursor(), _drift(8, "r-old", "2025-03-02", "2025-03-10"), now=1000.0, cooldown_s=DAY
    )
    assert (old.start, old.skip_reason) == (
        None,
        "drift in report r-old for 2025-03-02, a day older than the newest report's (2025-03-10): a backfill "
        "of past traffic, not a live drift event",
    )
    cursor = RetrainCursor.parse(old.cursor)
    assert (cursor.handled_check_id, cursor.last_retrain_at, cursor.pending) == (8, None, None)
    # The newest day's drift, evaluated next, starts the retraining (the old day did not use the cooldown).
    newest = on_check(cursor, _drift(9, "r-new", "2025-03-10", "2025-03-10"), now=1001.0, cooldown_s=DAY)
    assert (newest.start, newest.report_version, newest.report_day) == (
        "retraining_dataset",
        "r-new",
        "2025-03-10",
    )


def test_check_outcomes_that_start_nothing() -> None:
    assert on_check(RetrainCursor(), None, now=0, cooldown_s=DAY).skip_reason == (
        "drift_check has not run yet"
    )
    handled = on_check(RetrainCursor(handled_check_id=7), _drift(7), now=0, cooldown_s=DAY)
    assert (handled.start, handled.cursor, handled.skip_reason) == (
        None,
        None,
        "no drift_check evaluation since #7",
    )
    passed = on_check(RetrainCursor(), CheckEvaluation(8, True, "ok", "r2"), now=0, cooldown_s=DAY)
    assert (passed.start, passed.skip_reason) == (None, "the latest drift_check passed")
    assert RetrainCursor.parse(passed.cursor).handled_check_id == 8
    unreadable = on_check(
        RetrainCursor(),
        CheckEvaluation(9, False, "missing", "r3"),
        now=0,
        cooldown_s=DAY,
    )
    assert unreadable.start is None and "without a drift verdict (status 'missing')" in str(
        unreadable.skip_reason
    )


def test_the_cooldown_spaces_retrainings_out() -> None:
    cursor = RetrainCursor(handled_check_id=1, last_retrain_at=0.0)
    cooling = on_check(cursor, _drift(2, "r2"), now=DAY - 1, cooldown_s=DAY)
    assert cooling.start is None
    assert cooling.skip_reason == (
        "drift in report r2, but retraining is cooling down until 1970-01-02T00:00:00+00:00"
    )
    after = on_check(RetrainCursor.parse(cooling.cursor), _drift(3, "r3"), now=DAY, cooldown_s=DAY)
    assert (after.start, after.report_version) == ("retraining_dataset", "r3")


def _pending(requested_at: float = 0.0) -> RetrainCursor:
    return RetrainCursor(
        handled_check_id=7,
        last_retrain_at=requested_at,
        pending={"report_version": "r1", "requested_at": requested_at},
    )


def _follow(cursor: RetrainCursor, run: DataRun | None, **observed):
    values = {"now": 10.0, "dataset_version": "d1", "base_model_version": "b1", "trained_on": ("s0", "b1")}
    return on_pending(cursor, run, **{**values, **observed})


DONE = DataRun(run_id="run-1", finished=True, succeeded=True, status="SUCCESS")


def test_a_successful_retraining_dataset_run_starts_training_on_it() -> None:
    decision = _follow(_pending(), DONE)
    assert (decision.start, decision.report_version, decision.data_run_id, decision.dataset_version) == (
        "train",
        "r1",
        "run-1",
        "d1",
    )
    assert RetrainCursor.parse(decision.cursor).pending is None


def test_pending_outcomes_that_start_no_training() -> None:
    waiting = _follow(_pending(), None)
    assert (waiting.start, waiting.cursor) == (None, None)
    assert waiting.skip_reason == "waiting for the retraining_dataset run of drift report r1"
    dropped = _follow(_pending(), None, now=PENDING_RUN_TIMEOUT_S + 1)
    assert (
        dropped.skip_reason == "retraining_dataset run for drift report r1 never appeared; retraining dropped"
    )
    assert RetrainCursor.parse(dropped.cursor).pending is None
    running = _follow(_pending(), DataRun("run-1", finished=False, succeeded=False, status="STARTED"))
    assert (running.cursor, running.skip_reason) == (
        None,
        "waiting for retraining_dataset run run-1 (STARTED)",
    )
    failed = _follow(_pending(), DataRun("run-1", finished=True, succeeded=False, status="FAILURE"))
    assert failed.start is None and str(failed.skip_reason).startswith(
        "retraining_dataset run run-1 ended FAILURE"
    )
    same_inputs = _follow(_pending(), DONE, trained_on=("d1", "b1"))
    assert same_inputs.start is None and "retraining would reproduce it" in str(same_inputs.skip_reason)
    carried = _follow(_pending(), DONE, carried_over="no served traffic")
    assert (carried.start, carried.skip_reason) == (
        None,
        "drift report r1: retraining_dataset d1 selected nothing (no served traffic); retraining on it "
        "would reproduce the current adapter. Nothing to retrain.",
    )
    assert RetrainCursor.parse(carried.cursor).pending is None


def _drop(root: Path, name: str, rows: int) -> Path:
    path = root / "incoming" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(rows)))
    return path


def test_incoming_plan_waits_for_a_drop_to_settle_then_runs_it_once(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    drop = _drop(tmp_path, "a.jsonl", 3)
    first = plan_incoming_runs(backend, None, free_slots=2)
    assert (first.runs, list(first.pending), first.settling) == ([], ["a.jsonl"], ["a.jsonl"])
    second = plan_incoming_runs(backend, first.cursor(), free_slots=2)
    assert [(run.drop.name, run.source) for run in second.runs] == [("a.jsonl", str(drop))]
    third = plan_incoming_runs(backend, second.cursor(), free_slots=2)
    assert (third.runs, third.pending) == ([], {})
    os.utime(drop, ns=(1, 1))  # the content changed (a new mtime): settled again, then read again
    changed = plan_incoming_runs(
        backend, plan_incoming_runs(backend, third.cursor(), free_slots=2).cursor(), free_slots=2
    )
    assert [run.drop.name for run in changed.runs] == ["a.jsonl"]


def test_incoming_plan_respects_free_slots_and_skips_non_data(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        _drop(tmp_path, name, 2)
    (tmp_path / "incoming" / "notes.txt").write_text("not data")
    (tmp_path / "incoming" / "d.jsonl.part").write_text("in progress")
    settled = plan_incoming_runs(backend, None, free_slots=1).cursor()
    plan = plan_incoming_runs(backend, settled, free_slots=1)
    assert [run.drop.name for run in plan.runs] == ["a.jsonl"]
    assert plan.waiting_for_slot == ["b.jsonl", "c.jsonl"] and plan.settling == []
    assert plan.not_data == ["notes.txt"]
    assert "d.jsonl.part" not in json.loads(plan.cursor())["pending"]
