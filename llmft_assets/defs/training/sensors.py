"""train_sensor: new splits or a new base model start one training per input pair."""

import dagster as dg

from llmft_assets.defs.training.jobs import train_job


def latest_metadata(context: dg.SensorEvaluationContext, asset: str, key: str) -> str | None:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(key)
    return str(getattr(value, "value", value)) if value is not None else None


def latest_version(context: dg.SensorEvaluationContext, asset: str) -> str | None:
    return latest_metadata(context, asset, "version")


@dg.sensor(job=train_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def train_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """New splits or a new base model -> one training run per (splits, base model) pair (the run key)."""
    splits, base = latest_version(context, "dataset_splits"), latest_version(context, "base_model")
    if splits is None or base is None:
        return dg.SkipReason("waiting for dataset_splits and base_model to be materialized")
    run_key = f"splits-{splits}-base-{base}"
    trained_on = (
        latest_metadata(context, "lora_adapter", "dataset_version"),
        latest_metadata(context, "lora_adapter", "base_model_version"),
    )
    if context.cursor == run_key or trained_on == (splits, base):
        return dg.SkipReason(f"already trained on {run_key}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=run_key, tags={"llmft/splits": splits, "llmft/base_model": base})
        ],
        cursor=run_key,
    )
