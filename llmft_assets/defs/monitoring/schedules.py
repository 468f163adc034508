"""drift_schedule: each tick reports the last complete day of served traffic (drift_report's partition)."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from llmft_assets import settings
from llmft_assets.defs.monitoring.assets import DRIFT_PARTITIONS
from llmft_assets.defs.monitoring.jobs import drift_job
from llmft_assets.run_tags import TAG_TRIGGER


def last_complete_day(tick: datetime) -> str:
    """The partition of the day before the tick's day (UTC): a whole day of traffic, not the day begun."""
    return DRIFT_PARTITIONS.get_partition_key_for_timestamp((tick - timedelta(days=1)).timestamp())


# Not build_schedule_from_partitioned_job: that asks for the last partition at the tick, which with
# end_offset=1 is the day just begun, and its cron would be the partitions' (midnight), not
# $LLMFT_DRIFT_SCHEDULE_CRON. This is the same partitioned request, for the last complete day.
@dg.schedule(
    job=drift_job,
    cron_schedule=settings.get().drift_schedule_cron,  # a schedule's cron is fixed when the code loads
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily drift report of the last complete day of served traffic (drift_report's partition).",
)
def drift_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    if context.instance.get_latest_materialization_event(dg.AssetKey("dataset_splits")) is None:
        return dg.SkipReason("no dataset_splits materialized yet: nothing to compare served traffic with")
    day = last_complete_day(context.scheduled_execution_time or datetime.now(UTC))
    return drift_job.run_request_for_partition(
        partition_key=day, run_key=f"drift-{day}", tags={TAG_TRIGGER: "schedule"}
    )
