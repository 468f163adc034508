"""Sensors that start training when its inputs change, and the release when a new adapter lands."""

import dagster as dg

from llmft_assets.defs.data.jobs import release_job, train_job


def _latest_metadata(context: dg.SensorEvaluationContext, asset: str, key: str) -> str | None:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(key)
    return str(getattr(value, "value", value)) if value is not None else None


def _latest_version(context: dg.SensorEvaluationContext, asset: str) -> str | None:
    return _latest_metadata(context, asset, "version")


@dg.sensor(job=train_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def train_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """New splits or a new base model -> one training run per (splits, base model) pair (the run key)."""
    splits, base = _latest_version(context, "dataset_splits"), _latest_version(context, "base_model")
    if splits is None or base is None:
        return dg.SkipReason("waiting for dataset_splits and base_model to be materialized")
    run_key = f"splits-{splits}-base-{base}"
    trained_on = (
        _latest_metadata(context, "lora_adapter", "dataset_version"),
        _latest_metadata(context, "lora_adapter", "base_model_version"),
    )
    if context.cursor == run_key or trained_on == (splits, base):
        return dg.SkipReason(f"already trained on {run_key}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=run_key, tags={"llmft/splits": splits, "llmft/base_model": base})
        ],
        cursor=run_key,
    )


@dg.sensor(job=release_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def release_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """A new lora_adapter version -> evaluate it (the gate) and package it if it passes."""
    adapter = _latest_version(context, "lora_adapter")
    if adapter is None:
        return dg.SkipReason("no lora_adapter yet")
    if context.cursor == adapter or _latest_metadata(context, "eval_report", "adapter_version") == adapter:
        return dg.SkipReason(f"adapter {adapter} already evaluated")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"adapter-{adapter}", tags={"llmft/adapter": adapter})],
        cursor=adapter,
    )
