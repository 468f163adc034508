"""`drift_retrain_sensor`: a failed drift_check starts a drift-targeted retraining (retraining_dataset_job,
then train_job on that dataset; release_sensor then evaluates and releases).

The state machine is `llmft_assets.monitoring.retrain_policy`; this sensor gathers what it needs from
the instance and turns its decision into run requests.
"""

import time

import dagster as dg

from llmft_assets import settings
from llmft_assets.defs.monitoring.assets import DRIFT_REPORT
from llmft_assets.defs.monitoring.checks import DRIFT_CHECK
from llmft_assets.defs.monitoring.retraining import retraining_dataset_job, retraining_run_config
from llmft_assets.defs.training.jobs import DRIFT_TRAIN_RUN_CONFIG, train_job
from llmft_assets.defs.training.sensors import latest_metadata, latest_version
from llmft_assets.monitoring.retrain_policy import (
    CheckEvaluation,
    DataRun,
    RetrainCursor,
    RetrainDecision,
    on_check,
    on_pending,
    retrain_cooldown_s,
)
from llmft_assets.run_tags import TAG_DRIFT_REPORT, TAG_RETRAIN_STAGE, TAG_RETRAINING_DATASET, TAG_TRIGGER
from llmft_assets.training.training_data import RETRAINING_DATASET


def _latest_check(instance: dg.DagsterInstance) -> CheckEvaluation | None:
    check_key = dg.AssetCheckKey(dg.AssetKey(DRIFT_REPORT), DRIFT_CHECK)
    record = instance.get_latest_asset_check_evaluation_record(check_key)
    if record is None or record.event is None or record.event.dagster_event is None:
        return None
    evaluation = record.event.dagster_event.event_specific_data
    passed = getattr(evaluation, "passed", None)
    check_metadata = dict(evaluation.metadata) if passed is not None else {}
    status = check_metadata.get("status")
    report = check_metadata.get("report_version")
    days = instance.get_materialized_partitions(dg.AssetKey(DRIFT_REPORT))
    return CheckEvaluation(
        record_id=record.id,
        passed=passed,
        status=None if status is None else str(getattr(status, "value", status)),
        report_version=str(getattr(report, "value", report)) if report is not None else record.run_id,
        day=record.partition,
        newest_day=max(days) if days else None,
    )


def _dataset_run(instance: dg.DagsterInstance, report_version: str) -> DataRun | None:
    tags = {TAG_DRIFT_REPORT: report_version, TAG_RETRAIN_STAGE: RETRAINING_DATASET}
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=retraining_dataset_job.name, tags=tags), limit=1)
    if not runs:
        return None
    run = runs[0]
    succeeded = run.status == dg.DagsterRunStatus.SUCCESS
    return DataRun(run_id=run.run_id, finished=run.is_finished, succeeded=succeeded, status=run.status.value)


def _decide(context: dg.SensorEvaluationContext, cursor: RetrainCursor) -> RetrainDecision:
    instance, now = context.instance, time.time()
    if not cursor.pending:
        return on_check(cursor, _latest_check(instance), now=now, cooldown_s=retrain_cooldown_s())
    trained_on = None
    if instance.get_latest_materialization_event(dg.AssetKey("lora_adapter")) is not None:
        trained_on = (
            latest_metadata(context, "lora_adapter", "dataset_version"),
            latest_metadata(context, "lora_adapter", "base_model_version"),
        )
    return on_pending(
        cursor,
        _dataset_run(instance, str(cursor.pending["report_version"])),
        now=now,
        dataset_version=latest_version(context, RETRAINING_DATASET),
        base_model_version=latest_version(context, "base_model"),
        trained_on=trained_on,
        carried_over=latest_metadata(context, RETRAINING_DATASET, "carried_over"),
    )


def _run_request(decision: RetrainDecision) -> dg.RunRequest:
    report = str(decision.report_version)
    tags = {TAG_TRIGGER: "drift", TAG_DRIFT_REPORT: report, TAG_RETRAIN_STAGE: str(decision.start)}
    if decision.start == RETRAINING_DATASET:
        return dg.RunRequest(
            job_name=retraining_dataset_job.name,
            run_key=f"drift-{report}-retraining-dataset",
            run_config=retraining_run_config(decision.report_day),
            tags=tags,
        )
    return dg.RunRequest(
        job_name=train_job.name,
        run_key=f"drift-{report}-train",
        run_config=DRIFT_TRAIN_RUN_CONFIG,
        tags={
            **tags,
            TAG_RETRAINING_DATASET: str(decision.dataset_version),
            "llmft/retraining_dataset_run": str(decision.data_run_id),
        },
    )


@dg.sensor(
    jobs=[retraining_dataset_job, train_job],
    minimum_interval_seconds=settings.get().drift_sensor_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A failed drift_check starts a drift-targeted retraining: retraining_dataset_job (the rows "
    "nearest to the drifted traffic), then train_job on that dataset; release_sensor evaluates (traffic "
    "slice included) and releases. One drift report starts one retraining (run keys); retrainings are "
    "spaced by $LLMFT_RETRAIN_COOLDOWN_HOURS (default 24 h).",
)
def drift_retrain_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    decision = _decide(context, RetrainCursor.parse(context.cursor))
    if decision.log:
        context.log.info(decision.log)
    if decision.start:
        return dg.SensorResult(run_requests=[_run_request(decision)], cursor=decision.cursor)
    if decision.cursor is None:
        return dg.SkipReason(decision.skip_reason)
    return dg.SensorResult(skip_reason=decision.skip_reason, cursor=decision.cursor)
