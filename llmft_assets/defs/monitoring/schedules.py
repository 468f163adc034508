"""drift_schedule: the daily drift report over the request log window ending at the tick time."""

from datetime import UTC, datetime

import dagster as dg

from llmft_assets import settings
from llmft_assets.defs.monitoring.assets import DRIFT_REPORT
from llmft_assets.defs.monitoring.jobs import drift_job
from llmft_assets.run_tags import TAG_TRIGGER


@dg.schedule(
    job=drift_job,
    cron_schedule=settings.get().drift_schedule_cron,  # a schedule's cron is fixed when the code loads
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily drift report over the request log window ending at the tick time.",
)
def drift_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    if context.instance.get_latest_materialization_event(dg.AssetKey("dataset_splits")) is None:
        return dg.SkipReason("no dataset_splits materialized yet: nothing to compare served traffic with")
    tick = context.scheduled_execution_time or datetime.now(UTC)
    tick_iso = tick.astimezone(UTC).isoformat()
    return dg.RunRequest(
        run_key=f"drift-{tick_iso}",
        run_config={"ops": {DRIFT_REPORT: {"config": {"end_time": tick_iso}}}},
        tags={TAG_TRIGGER: "schedule"},
    )
