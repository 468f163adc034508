"""train_sensor and release_sensor through Dagster's own sensor test helpers."""

from __future__ import annotations

import dagster as dg

from llmft_assets.defs.evaluation.sensors import release_sensor
from llmft_assets.defs.training.sensors import train_sensor


def _record(instance: dg.DagsterInstance, asset: str, **metadata: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, metadata=metadata))


def test_train_sensor_one_run_per_input_pair() -> None:
    with dg.instance_for_test() as instance:
        assert isinstance(train_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)
        _record(instance, "dataset_splits", version="s1")
        _record(instance, "base_model", version="b1")
        result = train_sensor(dg.build_sensor_context(instance=instance))
        assert [r.run_key for r in result.run_requests] == ["splits-s1-base-b1"]
        assert result.run_requests[0].tags["llmft/splits"] == "s1"
        again = train_sensor(dg.build_sensor_context(instance=instance, cursor=result.cursor))
        assert isinstance(again, dg.SkipReason)
        # An adapter already trained on these inputs (e.g. by "materialize all") is not retrained.
        _record(instance, "lora_adapter", version="a1", dataset_version="s1", base_model_version="b1")
        assert isinstance(train_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)
        _record(instance, "dataset_splits", version="s2")
        fresh = train_sensor(dg.build_sensor_context(instance=instance, cursor=result.cursor))
        assert [r.run_key for r in fresh.run_requests] == ["splits-s2-base-b1"]


def test_release_sensor_evaluates_each_new_adapter_once() -> None:
    with dg.instance_for_test() as instance:
        assert isinstance(release_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)
        _record(instance, "lora_adapter", version="a1")
        result = release_sensor(dg.build_sensor_context(instance=instance))
        assert [r.run_key for r in result.run_requests] == ["adapter-a1"]
        assert isinstance(
            release_sensor(dg.build_sensor_context(instance=instance, cursor="a1")), dg.SkipReason
        )
        _record(instance, "eval_report", version="e1", adapter_version="a2")
        _record(instance, "lora_adapter", version="a2")
        assert isinstance(
            release_sensor(dg.build_sensor_context(instance=instance, cursor="a1")), dg.SkipReason
        )
