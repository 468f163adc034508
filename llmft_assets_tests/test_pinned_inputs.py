"""Pinned inputs: a step reads the upstream version its own run produced, else the one Dagster recorded
for the input, never a pointer another run moved in between; data versions are content hashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster._core.instance.ref import InstanceRef

from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.definitions import DATA_ASSETS, build_resources
from llmft_assets.storage import open_storage, publish_directory
from llmft_assets.storage.publish import fetch_artifact, latest_version

CHAIN = ["raw_dataset", "cleaned_dataset", "validated_dataset", "tokenized_dataset", "dataset_splits"]
SMALL = {
    "base_model": {"config": {"pretrain_steps": 0}},
    "tokenized_dataset": {"config": {"max_seq_len": 256, "workers": 1}},
    "dataset_splits": {"config": {"validation_fraction": 0.2, "test_fraction": 0.2}},
}


def _source(tmp_path: Path, name: str, seed: int, rows: int = 24) -> tuple[str, set[str]]:
    data = generate_rows(rows, schema="v0", seed=seed)
    for row in data:
        row["id"] = f"{name}-{row['id']}"  # ids say which source a row came from
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return str(path), {row["id"] for row in data}


def _run_config(source: str, without: tuple[str, ...] = ()) -> dict:
    ops = {**SMALL, "raw_dataset": {"config": {"source": source, "config": None}}}
    return {"ops": {op: config for op, config in ops.items() if op not in without}}


def _materialize(selection: list[str], source: str, instance: dg.DagsterInstance, assets=None):
    ops = {op: config for op, config in _run_config(source)["ops"].items() if op in selection}
    return dg.materialize(
        assets or DATA_ASSETS,
        resources=build_resources(),
        selection=dg.AssetSelection.assets(*selection),
        run_config={"ops": ops},
        instance=instance,
    )


def _split_ids(instance: dg.DagsterInstance, root: str) -> set[str]:
    event = instance.get_latest_materialization_event(dg.AssetKey("dataset_splits"))
    version = str(event.asset_materialization.metadata["version"].value)
    _, path = fetch_artifact(
        open_storage(root), "assets/dataset_splits", Path(root) / "cache", version=version
    )
    return {
        i
        for name in ("train", "validation", "test")
        for i in pq.read_table(path / f"{name}.parquet").column("id").to_pylist()
    }


def _pinned_by(result: dg.ExecuteInProcessResult, asset: str, input_key: str) -> str:
    for event in result.all_events:
        if event.event_type_value == "LOADED_INPUT" and event.step_key == asset:
            data = event.event_specific_data
            if data.input_name == input_key:
                return str(data.metadata["pinned_by"].value)
    raise AssertionError(f"no LOADED_INPUT of {input_key} in {asset}")


def test_steps_read_their_own_runs_version_and_the_recorded_one_not_the_moved_pointer(
    llmft_home: Path, tmp_path: Path
) -> None:
    root = str(llmft_home / "storage")
    source_a, ids_a = _source(tmp_path, "a", seed=1)
    source_b, _ = _source(tmp_path, "b", seed=2)
    instance = dg.DagsterInstance.ephemeral()
    first = _materialize(["base_model", *CHAIN], source_a, instance)
    assert first.success and _split_ids(instance, root) <= ids_a
    # Data versions are the content hashes storage publishes under.
    for asset in CHAIN:
        record = instance.get_latest_materialization_event(dg.AssetKey(asset))
        version = str(record.asset_materialization.metadata["version"].value)
        assert (asset, record.asset_materialization.tags["dagster/data_version"]) == (asset, version)

    # Another writer (a concurrent run elsewhere) publishes source B's raw_dataset: the pointer moves.
    other = _materialize(["raw_dataset"], source_b, dg.DagsterInstance.ephemeral())
    assert other.success
    backend = open_storage(root)
    b_version = latest_version(backend, "assets/raw_dataset")
    assert b_version != first.asset_materializations_for_node("raw_dataset")[0].metadata["version"].value

    # Across runs: cleaned_dataset reads the raw_dataset version Dagster recorded (source A), not LATEST (B).
    second = _materialize(CHAIN[1:], source_a, instance)
    assert second.success
    assert _pinned_by(second, "cleaned_dataset", "raw_dataset").startswith("input version Dagster recorded")
    assert _split_ids(instance, root) <= ids_a

    # In one run: the pointer moves between raw_dataset and cleaned_dataset (a hook publishes B's raw
    # artifact again right after raw_dataset succeeds); downstream still reads what this run produced.
    _, b_published = fetch_artifact(backend, "assets/raw_dataset", tmp_path / "cache", version=b_version)
    b_dir = tmp_path / "b_raw"
    b_dir.mkdir()
    for name in ("data.parquet", "quarantine.parquet"):
        shutil.copy(b_published / name, b_dir / name)

    @dg.success_hook
    def another_run_publishes(_context: dg.HookContext) -> None:
        publish_directory(open_storage(root), "assets/raw_dataset", b_dir)

    assets = [
        a.with_hooks({another_run_publishes}) if a.key.to_user_string() == "raw_dataset" else a
        for a in DATA_ASSETS
    ]
    source_c, ids_c = _source(tmp_path, "c", seed=3)
    third = _materialize(CHAIN, source_c, instance, assets=assets)
    assert third.success
    assert latest_version(backend, "assets/raw_dataset") == b_version  # the pointer did move
    assert _pinned_by(third, "cleaned_dataset", "raw_dataset").startswith("materialized by this run")
    assert _split_ids(instance, root) <= ids_c


CONCURRENT_RUN = """
import sys, dagster as dg
from dagster import DagsterInstance, execute_job, reconstructable
from llmft_assets_tests.test_pinned_inputs import chain_job
with DagsterInstance.get() as instance:
    result = execute_job(reconstructable(chain_job), instance=instance, run_config=__import__("json").loads(sys.argv[1]),
                         tags={"test/source": sys.argv[2]})
    print("RUN", result.run_id, result.success, flush=True)
    sys.exit(0 if result.success else 1)
"""


def chain_job() -> dg.JobDefinition:
    """data_job without base_model, resolved for execute_job in a child process."""
    defs = dg.Definitions(
        assets=DATA_ASSETS,
        jobs=[
            dg.define_asset_job(
                "chain_job", selection=dg.AssetSelection.assets(*CHAIN), executor_def=dg.in_process_executor
            )
        ],
        resources=build_resources(),
    )
    return defs.resolve_job_def("chain_job")


@pytest.mark.slow
def test_two_concurrent_data_runs_on_different_sources_each_split_their_own_source(
    llmft_home: Path, tmp_path: Path
) -> None:
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PYTHONPATH": os.pathsep.join(sys.path)}
    sources = {name: _source(tmp_path, name, seed=seed, rows=60) for name, seed in (("a", 11), ("b", 12))}
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        base = _materialize(["base_model"], sources["a"][0], instance)
        assert base.success
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                CONCURRENT_RUN,
                json.dumps(_run_config(source, without=("base_model",))),
                name,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, (source, _) in sources.items()
    }
    outputs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, outputs[name][-3000:]
    root = str(llmft_home / "storage")
    backend = open_storage(root)
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        spans = []
        for name in sources:
            (record,) = instance.get_run_records(filters=dg.RunsFilter(tags={"test/source": name}))
            spans.append((record.start_time, record.end_time))
        (start_a, end_a), (start_b, end_b) = spans
        assert start_a < end_b and start_b < end_a, "the two runs did not overlap in time"
        for name, (_, ids) in sources.items():
            (run,) = instance.get_runs(filters=dg.RunsFilter(tags={"test/source": name}))
            records = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            ).records
            versions = {
                r.event_log_entry.asset_materialization.asset_key.to_user_string(): str(
                    r.event_log_entry.asset_materialization.metadata["version"].value
                )
                for r in records
            }
            _, path = fetch_artifact(
                backend, "assets/dataset_splits", tmp_path / "cache", version=versions["dataset_splits"]
            )
            split_ids = {
                i
                for split in ("train", "validation", "test")
                for i in pq.read_table(path / f"{split}.parquet").column("id").to_pylist()
            }
            assert split_ids and split_ids <= ids, f"run on source {name} split rows of another source"
            # Lineage: each step's recorded upstream is the version its own run produced.
            _, splits_meta = fetch_artifact(
                backend, "assets/dataset_splits", tmp_path / "cache", version=versions["dataset_splits"]
            )
            assert (
                json.loads((splits_meta / "_MANIFEST.json").read_text())["metadata"]["upstream"]
                == versions["tokenized_dataset"]
            )
