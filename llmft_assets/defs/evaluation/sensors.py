"""release_sensor: a new lora_adapter version starts release_job (evaluate, gate, package)."""

import dagster as dg

from llmft_assets.defs.evaluation.jobs import release_job
from llmft_assets.defs.training.sensors import latest_metadata, latest_version


@dg.sensor(job=release_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def release_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """A new lora_adapter version -> evaluate it (the gate) and package it if it passes."""
    adapter = latest_version(context, "lora_adapter")
    if adapter is None:
        return dg.SkipReason("no lora_adapter yet")
    if context.cursor == adapter or latest_metadata(context, "eval_report", "adapter_version") == adapter:
        return dg.SkipReason(f"adapter {adapter} already evaluated")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"adapter-{adapter}", tags={"llmft/adapter": adapter})],
        cursor=adapter,
    )
