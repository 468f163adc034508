"""The data chain partitioned by source shard: a source's files become `source_shards` partitions, each
shard runs raw -> tokenized as its own run (here three runs in parallel processes), and
`sharded_dataset_splits` assembles them, removing exact duplicates and repeated ids across shards, into
the same splits the unpartitioned chain cuts from the same rows in one file."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest

from llmft_assets.data.raw_sources import SAMPLE_DIR, DataSourceError
from llmft_assets.data.shards import (
    SourceShard,
    UnknownShardError,
    list_source_shards,
    read_shard,
    register_shards,
    shard_key,
)
from llmft_assets.storage import open_storage
from llmft_assets.storage.publish import latest_version

SHARD_RUN_CONFIG = {
    "ops": {
        "shard_tokenized_dataset": {"config": {"max_seq_len": 512, "workers": 1}},
    }
}
SPLIT_CONFIG = {"validation_fraction": 0.2, "test_fraction": 0.2}


def _write_jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _sample_rows(count: int) -> list[dict[str, Any]]:
    return pq.read_table(SAMPLE_DIR / "r1_distill_sft_v0.parquet").slice(0, count).to_pylist()


def _multi_shard_source(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """Three jsonl files: b repeats a row of a exactly, c holds a broken line and a different row under
    an id a already uses."""
    rows = _sample_rows(60)
    collision = {**rows[45], "id": rows[10]["id"]}
    a = [json.dumps(row) for row in rows[:20]]
    b = [json.dumps(row) for row in rows[20:40]] + [json.dumps(rows[5])]
    c = [json.dumps(row) for row in rows[40:45]] + ["{not json"] + [json.dumps(collision)]
    c += [json.dumps(row) for row in rows[46:60]]
    folder.mkdir(parents=True)
    for name, lines in (("part-a", a), ("part-b", b), ("part-c", c)):
        _write_jsonl(folder / f"{name}.jsonl", lines)
    return a, b, c


def _materialize_shard(instance_ref: Any, key: str) -> tuple[str, bool]:
    """One shard's run in its own process (what a backfill's run per partition is)."""
    from llmft_assets.definitions import SHARDED_DATA_ASSETS, build_resources
    from llmft_assets.defs.data.shards import SHARD_ASSETS

    result = dg.materialize(
        SHARDED_DATA_ASSETS,
        selection=list(SHARD_ASSETS),
        partition_key=key,
        resources=build_resources(),
        run_config=SHARD_RUN_CONFIG,
        instance=dg.DagsterInstance.from_ref(instance_ref),
        raise_on_error=False,
    )
    return key, result.success


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    raise AssertionError(f"{asset} was not materialized")


def _splits(root: Path, asset: str) -> dict[str, list[dict[str, Any]]]:
    version = latest_version(open_storage(str(root)), f"assets/{asset}")
    tables = {name: pq.read_table(root / "assets" / asset / str(version) / f"{name}.parquet") for name in
              ("train", "validation", "test")}  # fmt: skip
    return {name: table.drop_columns(["origin"]).to_pylist() for name, table in tables.items()}


@pytest.mark.slow
def test_a_multi_shard_source_runs_per_shard_and_assembles_the_same_splits(
    llmft_home: Path, tmp_path: Path
) -> None:
    from llmft_assets.definitions import DATA_ASSETS, SHARDED_DATA_ASSETS, build_resources
    from llmft_assets.defs.data import assets, shards

    a, b, c = _multi_shard_source(tmp_path / "source")
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    resources = build_resources()
    keys = shards.register_source_shards(instance, resources["storage"], str(tmp_path / "source"), None)
    assert keys == [
        shard_key(str(tmp_path / "source" / f"{name}.jsonl"), None) for name in ("part-a", "part-b", "part-c")
    ]
    assert instance.get_dynamic_partitions("source_shards") == keys
    # Registering again adds nothing.
    assert (
        shards.register_source_shards(instance, resources["storage"], str(tmp_path / "source"), None) == keys
    )
    assert instance.get_dynamic_partitions("source_shards") == keys

    base = dg.materialize(
        [assets.base_model],
        resources=resources,
        run_config={"ops": {"base_model": {"config": {"pretrain_steps": 0}}}},
        instance=instance,
    )
    assert base.success
    # The three shards as three runs at once, each in its own process (a backfill's run per partition).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        done = dict(pool.map(_materialize_shard, [instance.get_ref()] * 3, keys))
    assert done == dict.fromkeys(keys, True)
    partition_runs = [
        run.tags["dagster/partition"] for run in instance.get_runs() if "dagster/partition" in run.tags
    ]
    assert sorted(partition_runs) == keys  # one run per shard
    raw_rows = {}
    for key in keys:
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("shard_raw_dataset"), asset_partitions=[key]), limit=1
        ).records[0]
        raw_rows[key] = record.asset_materialization.metadata["rows_in"].value
        # Each partition is published under its own prefix with its own LATEST pointer.
        assert (llmft_home / "storage" / "assets" / "shard_tokenized_dataset" / key / "LATEST.json").is_file()
    assert list(raw_rows.values()) == [len(a), len(b), len(c)]

    assembled = dg.materialize(
        SHARDED_DATA_ASSETS,
        selection=["sharded_dataset_splits"],
        resources=resources,
        run_config={"ops": {"sharded_dataset_splits": {"config": SPLIT_CONFIG}}},
        instance=instance,
    )
    assert assembled.success
    meta = _metadata(assembled, "sharded_dataset_splits")
    assert meta["shards"] == 3
    # The exact duplicate (b repeats a row of a) and the repeated id (c) are caught across shards.
    assert (meta["cross_shard_duplicates"], meta["repeated_ids_quarantined"]) == (1, 1)
    # 20 + 21 + 20 tokenized rows (c's broken line is quarantined in its shard) = 59 split + 1 + 1.
    assert (meta["rows_in"], meta["rows_out"]) == (61, 59)
    assert (meta["train_rows"], meta["validation_rows"], meta["test_rows"]) == (39, 8, 12)

    # The same rows as one file through the unpartitioned chain: the same splits, row for row.
    single = tmp_path / "single.jsonl"
    _write_jsonl(single, a + b + c)
    whole = dg.materialize(
        DATA_ASSETS,
        selection=[
            "raw_dataset",
            "cleaned_dataset",
            "validated_dataset",
            "tokenized_dataset",
            "dataset_splits",
        ],
        resources=resources,
        run_config={
            "ops": {
                "raw_dataset": {"config": {"source": str(single), "config": None}},
                "tokenized_dataset": {"config": {"max_seq_len": 512, "workers": 1}},
                "dataset_splits": {"config": SPLIT_CONFIG},
            }
        },
        instance=instance,
    )
    assert whole.success
    assert _metadata(whole, "cleaned_dataset")["duplicates_dropped"] == 1
    assert _metadata(whole, "dataset_splits")["rows_in"] == meta["rows_out"]
    root = llmft_home / "storage"
    sharded, unsharded = _splits(root, "sharded_dataset_splits"), _splits(root, "dataset_splits")
    assert {name: len(rows) for name, rows in sharded.items()} == {
        name: meta[f"{name}_rows"] for name in ("train", "validation", "test")
    }
    assert sharded == unsharded
    version = latest_version(open_storage(str(root)), "assets/sharded_dataset_splits")
    quarantine = pq.read_table(
        root / "assets" / "sharded_dataset_splits" / str(version) / "quarantine.parquet"
    )
    (reason,) = quarantine.column("reason").to_pylist()
    assert (
        reason
        == f"duplicate_id: {json.loads(c[6])['id']!r} (shard {keys[2]}) is already the id of a different, kept row"
    )


def test_sample_shards_are_its_configs_and_a_folder_its_files(tmp_path: Path) -> None:
    assert [(s.key, s.source, s.config) for s in list_source_shards("sample", "all")] == [
        ("sample-v0", "sample", "v0"),
        ("sample-v1", "sample", "v1"),
    ]
    assert [s.key for s in list_source_shards("sample", "v1")] == ["sample-v1"]
    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.parquet", "sub/c d.json", "notes.txt"):
        (folder / name).write_text("")
    listed = list_source_shards(str(folder))
    assert [Path(s.source).relative_to(folder).as_posix() for s in listed] == [
        "a.parquet",
        "b.jsonl",
        "sub/c d.json",
    ]
    assert [s.key.rsplit("-", 1)[0] for s in listed] == ["a", "b", "c_d"]
    assert {s.listed_from for s in listed} == {str(folder)}
    # Same stem, other folder: another key.
    assert shard_key(str(folder / "b.jsonl"), None) != shard_key(str(tmp_path / "b.jsonl"), None)
    with pytest.raises(DataSourceError, match="Hugging Face dataset id"):
        list_source_shards("ServiceNow-AI/R1-Distill-SFT")


def test_registering_a_source_that_cannot_be_listed_fails_without_retry(tmp_path: Path) -> None:
    from llmft_assets.definitions import defs

    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("register_shards_job").execute_in_process(
            run_config={"ops": {"register_source_shards_op": {"config": {"source": str(tmp_path / "nope")}}}},
            instance=instance,
            raise_on_error=False,
        )
        assert instance.get_dynamic_partitions("source_shards") == []
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    error = failure.event_specific_data.error
    assert (
        error is not None
        and f"register_shards_job: no such file or directory: {tmp_path / 'nope'}" in error.message
    )


def test_a_shard_reads_back_from_its_key_and_an_unknown_key_fails(tmp_path: Path) -> None:
    backend = open_storage(str(tmp_path / "storage"))
    shard = SourceShard(
        key="sample-v1", source="sample", config="v1", listed_from="sample", listed_config="all"
    )
    assert register_shards(backend, [shard]) == ["sample-v1"]
    assert read_shard(backend, "sample-v1") == shard
    with pytest.raises(UnknownShardError, match="'sample-v0' is not registered"):
        read_shard(backend, "sample-v0")
    with pytest.raises(UnknownShardError, match="is not a shard key"):
        read_shard(backend, "../etc")


@pytest.mark.parametrize("registered", [False, True])
def test_assembly_without_every_shard_fails_clearly(llmft_home: Path, registered: bool) -> None:
    from llmft_assets.definitions import SHARDED_DATA_ASSETS, build_resources
    from llmft_assets.defs.data.shards import register_source_shards

    resources = build_resources()
    with dg.instance_for_test() as instance:
        if registered:  # registered, never materialized
            register_source_shards(instance, resources["storage"], "sample", "all")
        result = dg.materialize(
            SHARDED_DATA_ASSETS,
            selection=["sharded_dataset_splits"],
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    expected = (
        "shard_tokenized_dataset[sample-v0] was never materialized"
        if registered
        else "no tokenized shard to assemble"
    )
    assert expected in str(failure.event_specific_data.error)


@pytest.mark.parametrize("sharded", [True, False])
def test_an_incoming_drop_becomes_shard_partitions_when_sharded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded: bool
) -> None:
    from dagster_aws.s3 import S3Resource

    from llmft_assets.definitions import defs
    from llmft_assets.defs.data.sensors import incoming_data_sensor
    from llmft_assets.defs.storage_resources import StorageResource

    monkeypatch.setenv("LLMFT_INCOMING_SHARDED", str(sharded).lower())
    root = tmp_path / "storage"
    drop = root / "incoming" / "2026-12-01"
    drop.mkdir(parents=True)
    for name in ("part-0.jsonl", "part-1.jsonl"):
        (drop / name).write_text('{"id": "a"}\n')
    (drop / "_SUCCESS").write_text("")
    storage = StorageResource(root=str(root), s3=S3Resource())
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(
            instance=instance,
            instance_ref=instance.get_ref(),  # as the daemon evaluates it: partition keys resolve
            repository_def=defs.get_repository_def(),
            resources={"storage": storage},
        ) as context,
    ):
        result = incoming_data_sensor.evaluate_tick(context)
    requests = list(result.run_requests or [])
    if not sharded:
        (request,) = requests
        assert (request.job_name, request.partition_key, request.tags["llmft/trigger"]) == (
            "data_job",
            None,
            "incoming",
        )
        assert result.dynamic_partitions_requests == []
        return
    keys = [shard_key(str(drop / name), None) for name in ("part-0.jsonl", "part-1.jsonl")]
    (added,) = result.dynamic_partitions_requests
    assert (added.partitions_def_name, list(added.partition_keys)) == ("source_shards", keys)
    assert [(r.job_name, r.partition_key, r.tags["llmft/trigger"]) for r in requests] == [
        ("shard_job", key, "incoming_shard") for key in keys
    ]
    assert {r.tags["llmft/incoming_drop"] for r in requests} == {"2026-12-01"}
    assert [read_shard(storage.backend(), key).source for key in keys] == [
        str(drop / "part-0.jsonl"),
        str(drop / "part-1.jsonl"),
    ]


@pytest.mark.slow
def test_the_sample_as_two_shards_assembles_todays_pinned_splits(llmft_home: Path, tmp_path: Path) -> None:
    """The bundled sample registered from the UI's register_shards_job is two shards (v0, v1); assembled,
    they give byte-for-byte the rows, ids, tokens and splits dataset_splits gives today (the pinned
    fingerprints of test_data_outputs_unchanged.py)."""
    from llmft_assets.definitions import SHARDED_DATA_ASSETS, build_resources, defs
    from llmft_assets.defs.data.shards import SHARD_ASSETS
    from llmft_assets_tests.data_fingerprints import SAMPLE_RUN_CONFIG, table_fingerprint
    from llmft_assets_tests.test_data_outputs_unchanged import FIXTURE

    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    registered = defs.resolve_job_def("register_shards_job").execute_in_process(
        run_config={"ops": {"register_source_shards_op": {"config": {"source": "sample", "config": "all"}}}},
        instance=instance,
    )
    assert registered.success
    assert instance.get_dynamic_partitions("source_shards") == ["sample-v0", "sample-v1"]
    ops = SAMPLE_RUN_CONFIG["ops"]
    configs = {
        "base_model": ops["base_model"],
        "shard_raw_dataset": {"config": {"batch_size": 500}},
        "shard_tokenized_dataset": ops["tokenized_dataset"],
        "sharded_dataset_splits": ops["dataset_splits"],
    }

    def run(selection: list[str], partition_key: str | None = None) -> bool:
        return dg.materialize(
            SHARDED_DATA_ASSETS,
            selection=selection,
            partition_key=partition_key,
            resources=build_resources(),
            run_config={"ops": {name: configs[name] for name in selection if name in configs}},
            instance=instance,
        ).success

    assert run(["base_model"])
    for key in ("sample-v0", "sample-v1"):
        assert run(list(SHARD_ASSETS), key)
    assert run(["sharded_dataset_splits"])
    expected = json.loads(FIXTURE.read_text())
    root = llmft_home / "storage"
    version = latest_version(open_storage(str(root)), "assets/sharded_dataset_splits")
    for name in ("train", "validation", "test"):
        got = table_fingerprint(root / "assets" / "sharded_dataset_splits" / str(version) / f"{name}.parquet")
        assert got == expected[f"dataset_splits/{name}.parquet"], (
            f"{name} differs from today's dataset_splits"
        )


@pytest.mark.parametrize(("value", "executor"), [("k8s", "k8s"), ("", "multiprocess")])
def test_shard_job_executor_is_chosen_by_setting(
    monkeypatch: pytest.MonkeyPatch, value: str, executor: str
) -> None:
    from llmft_assets.defs.data.shards import _shard_executor

    monkeypatch.setenv("LLMFT_SHARD_EXECUTOR", value)
    assert _shard_executor().name == executor


def test_shards_of_an_s3_prefix_run_and_assemble_on_s3_storage(
    llmft_home: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source and storage on S3: one shard per object, each partition published under its own prefix."""
    import boto3

    from llmft_assets.definitions import SHARDED_DATA_ASSETS, build_resources
    from llmft_assets.defs.data.shards import SHARD_ASSETS, register_source_shards

    monkeypatch.setenv("LLMFT_STORAGE", f"s3://{s3_bucket}/llmft")
    client = boto3.client("s3")
    rows = _sample_rows(24)
    for name, part in (("x.jsonl", rows[:12]), ("y.jsonl", rows[12:])):
        body = "".join(json.dumps(row) + "\n" for row in part).encode()
        client.put_object(Bucket=s3_bucket, Key=f"raw/{name}", Body=body)
    resources = build_resources()
    with dg.instance_for_test() as instance:
        keys = register_source_shards(instance, resources["storage"], f"s3://{s3_bucket}/raw/")
        assert [key.rsplit("-", 1)[0] for key in keys] == ["x", "y"]
        assert read_shard(resources["storage"].backend(), keys[1]).source == f"s3://{s3_bucket}/raw/y.jsonl"

        def run(selection: list[str], partition_key: str | None = None) -> dg.ExecuteInProcessResult:
            configs = {
                "base_model": {"config": {"pretrain_steps": 0}},
                "shard_tokenized_dataset": {"config": {"max_seq_len": 512, "workers": 1}},
            }
            return dg.materialize(
                SHARDED_DATA_ASSETS,
                selection=selection,
                partition_key=partition_key,
                resources=resources,
                run_config={"ops": {name: configs[name] for name in selection if name in configs}},
                instance=instance,
            )

        assert run(["base_model"]).success
        for key in keys:
            assert run(list(SHARD_ASSETS), key).success
        assembled = run(["sharded_dataset_splits"])
    assert assembled.success
    meta = _metadata(assembled, "sharded_dataset_splits")
    assert (meta["rows_in"], meta["rows_out"], meta["cross_shard_duplicates"]) == (24, 24, 0)
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="llmft/assets/shard_tokenized_dataset/")
    pointers = sorted(item["Key"] for item in listed["Contents"] if item["Key"].endswith("LATEST.json"))
    assert pointers == [f"llmft/assets/shard_tokenized_dataset/{key}/LATEST.json" for key in keys]


def test_a_partition_without_a_registered_shard_fails_without_retry(llmft_home: Path) -> None:
    from llmft_assets.definitions import SHARDED_DATA_ASSETS, build_resources

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("source_shards", ["ghost"])  # added by hand, never registered
        result = dg.materialize(
            SHARDED_DATA_ASSETS,
            selection=["shard_raw_dataset"],
            partition_key="ghost",
            resources=build_resources(),
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    error = failure.event_specific_data.error
    assert error is not None and "shard_raw_dataset[ghost]: shard 'ghost' is not registered" in error.message
    assert not list(llmft_home.glob("storage/assets/shard_raw_dataset/*"))


@pytest.mark.parametrize("done", [["a", "b"], ["a"]])
def test_the_assembly_starts_itself_once_every_shard_is_tokenized(done: list[str]) -> None:
    from llmft_assets.definitions import defs

    selection = dg.AssetSelection.assets("sharded_dataset_splits")
    with dg.instance_for_test() as instance:
        # No shard registered: nothing to assemble, nothing requested.
        first = dg.evaluate_automation_conditions(defs, instance, asset_selection=selection)
        assert first.get_num_requested(dg.AssetKey("sharded_dataset_splits")) == 0
        instance.add_dynamic_partitions("source_shards", ["a", "b"])
        for key in done:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key="shard_tokenized_dataset", partition=key)
            )
        second = dg.evaluate_automation_conditions(
            defs, instance, asset_selection=selection, cursor=first.cursor
        )
        requested = second.get_num_requested(dg.AssetKey("sharded_dataset_splits"))
        assert requested == (1 if done == ["a", "b"] else 0)
        if requested:  # assembled: the next evaluation asks for nothing more
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="sharded_dataset_splits"))
            third = dg.evaluate_automation_conditions(
                defs, instance, asset_selection=selection, cursor=second.cursor
            )
            assert third.get_num_requested(dg.AssetKey("sharded_dataset_splits")) == 0
