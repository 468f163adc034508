"""Training, evaluating (and so releasing) from the sharded splits alone: a two-file folder source as two
`source_shards` partitions, `sharded_dataset_splits`, then `lora_adapter` with
`training_data: sharded_dataset_splits` (max_seq_len from the splits' manifest) and `eval_report` on
that version's test split, with no dataset_splits ever materialized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from llmft_assets.data.raw_sources import SAMPLE_DIR
from llmft_assets.data.shards import ShardInput, assemble_shards
from llmft_assets.data.splits import SplitSettings
from llmft_assets.storage import open_storage
from llmft_assets.storage.publish import latest_version

MAX_SEQ_LEN = 256
TRAIN_CONFIG = {"max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1}
EVAL_CONFIG = {"max_rows": 2, "max_new_tokens": 8, "batch_size": 2, "compare_champion": False}


def _assets() -> list[Any]:
    from llmft_assets.definitions import DATA_ASSETS, SHARDED_DATA_ASSETS, TRAINING_ASSETS

    return [*DATA_ASSETS, *[a for a in SHARDED_DATA_ASSETS if a not in DATA_ASSETS], *TRAINING_ASSETS]


def _run(instance: dg.DagsterInstance, selection: list[str], ops: dict, partition: str | None = None):
    from llmft_assets.definitions import build_resources

    return dg.materialize(
        _assets(),
        selection=selection,
        partition_key=partition,
        resources=build_resources(),
        run_config={"ops": ops},
        instance=instance,
        raise_on_error=False,
    )


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    raise AssertionError(f"{asset} was not materialized")


def _failure(result: dg.ExecuteInProcessResult) -> str:
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    data = failure.event_specific_data  # a dg.Failure's description, with no retry asked for
    assert data.user_failure_data is not None and data.error.cls_name == "Failure", data.error.message
    return data.user_failure_data.description


def _two_file_source(folder: Path) -> None:
    rows = pq.read_table(SAMPLE_DIR / "r1_distill_sft_v0.parquet").slice(0, 40).to_pylist()
    folder.mkdir()
    for name, part in (("part-a", rows[:20]), ("part-b", rows[20:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))


def test_lora_adapter_trains_on_sharded_splits_and_eval_reads_their_test_split(
    llmft_home: Path, tmp_path: Path
) -> None:
    from llmft_assets.definitions import build_resources
    from llmft_assets.defs.data.shards import SHARD_ASSETS, register_source_shards

    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    assert _run(instance, ["base_model"], {"base_model": {"config": {"pretrain_steps": 0}}}).success
    sharded_training = {
        "lora_adapter": {"config": {**TRAIN_CONFIG, "training_data": "sharded_dataset_splits"}}
    }
    # No sharded_dataset_splits yet: a clear failure, no retry (and no dataset_splits needed to say so).
    refused = _run(instance, ["lora_adapter"], sharded_training)
    assert not refused.success
    assert _failure(refused) == (
        "lora_adapter: training_data=sharded_dataset_splits but no sharded_dataset_splits is materialized; "
        "register the source's shards (register_shards_job), backfill shard_job over source_shards, then "
        "materialize sharded_dataset_splits"
    )
    default = _run(instance, ["lora_adapter"], {"lora_adapter": {"config": TRAIN_CONFIG}})
    assert _failure(default) == (
        "lora_adapter: training_data=dataset_splits but no dataset_splits is materialized; materialize the "
        "data chain (data_job) first"
    )

    _two_file_source(tmp_path / "source")
    keys = register_source_shards(instance, build_resources()["storage"], str(tmp_path / "source"), None)
    assert len(keys) == 2
    tokenize = {"shard_tokenized_dataset": {"config": {"max_seq_len": MAX_SEQ_LEN, "workers": 1}}}
    for key in keys:
        assert _run(instance, list(SHARD_ASSETS), tokenize, partition=key).success
    split = {"validation_fraction": 0.2, "test_fraction": 0.2}
    assembled = _run(instance, ["sharded_dataset_splits"], {"sharded_dataset_splits": {"config": split}})
    assert assembled.success
    sharded_version = str(_metadata(assembled, "sharded_dataset_splits")["version"])
    root = llmft_home / "storage"
    manifest = json.loads(
        (root / "assets/sharded_dataset_splits" / sharded_version / "_MANIFEST.json").read_text()
    )
    base_version = latest_version(open_storage(str(root)), "assets/base_model")
    assert (manifest["metadata"]["max_seq_len"], manifest["metadata"]["base_model_version"]) == (
        MAX_SEQ_LEN,
        base_version,
    )

    longer = {"lora_adapter": {"config": {**sharded_training["lora_adapter"]["config"], "max_seq_len": 512}}}
    assert _failure(_run(instance, ["lora_adapter"], longer)) == (
        "lora_adapter config is invalid: max_seq_len: the training config asks for 512 but "
        f"shard_tokenized_dataset was built with max_seq_len {MAX_SEQ_LEN}; set it on tokenized_dataset (where "
        "rows are truncated) and leave it unset for training"
    )
    trained = _run(instance, ["lora_adapter"], sharded_training)
    assert trained.success, _failure(trained)
    adapter = _metadata(trained, "lora_adapter")
    assert (adapter["training_data"], adapter["dataset_version"]) == (
        "sharded_dataset_splits",
        sharded_version,
    )
    bom = adapter["bill_of_materials"]
    assert (bom["dataset"]["asset"], bom["dataset"]["version"]) == ("sharded_dataset_splits", sharded_version)
    assert bom["training_config"]["max_seq_len"] == MAX_SEQ_LEN  # from the sharded splits' manifest

    # A newer assembly (another split): the adapter is still judged on the test split it was trained with.
    other = {"validation_fraction": 0.1, "test_fraction": 0.3}
    newer = _run(instance, ["sharded_dataset_splits"], {"sharded_dataset_splits": {"config": other}})
    assert str(_metadata(newer, "sharded_dataset_splits")["version"]) != sharded_version
    evaluated = _run(instance, ["eval_report"], {"eval_report": {"config": EVAL_CONFIG}})
    assert evaluated.success, _failure(evaluated)
    report = _metadata(evaluated, "eval_report")
    assert (report["test_data"], report["test_data_version"]) == ("sharded_dataset_splits", sharded_version)
    assert report["adapter_version"] == str(adapter["version"])


def test_shards_tokenized_differently_are_not_assembled(tmp_path: Path) -> None:
    shards = [
        ShardInput("a", tmp_path / "a.parquet", "v1", None, max_seq_len=256, base_model_version="b1"),
        ShardInput("b", tmp_path / "b.parquet", "v1", None, max_seq_len=512, base_model_version="b1"),
        ShardInput("c", tmp_path / "c.parquet", "v1", None, max_seq_len=256, base_model_version="b1"),
    ]
    with pytest.raises(ValueError) as caught:
        assemble_shards(shards, rule=SplitSettings(), staging=tmp_path, log=print)
    assert str(caught.value) == (
        "the shards were tokenized with different max_seq_len: 256 in a, c; 512 in b; re-materialize "
        "shard_tokenized_dataset for those shards with one base_model and one max_seq_len"
    )
    mixed = [shards[0], ShardInput("d", tmp_path / "d.parquet", "v1", None, max_seq_len=256)]
    with pytest.raises(ValueError, match="different base_model_version: b1 in a; not recorded in d;"):
        assemble_shards(mixed, rule=SplitSettings(), staging=tmp_path, log=print)


def test_eval_report_refuses_an_adapter_that_records_no_training_data_version(llmft_home: Path) -> None:
    from llmft_assets.definitions import build_resources
    from llmft_assets.defs.evaluation.assets import _trained_on
    from llmft_assets.manifests import AdapterManifest

    storage = build_resources()["storage"]
    with pytest.raises(dg.Failure) as caught:
        _trained_on(storage, AdapterManifest(training_data="sharded_dataset_splits"))  # type: ignore[arg-type]
    assert caught.value.description == (
        "eval_report: the lora_adapter records no dataset_version, so there is no test split of the data it "
        "was trained on to score it on"
    )
    assert caught.value.allow_retries is False
