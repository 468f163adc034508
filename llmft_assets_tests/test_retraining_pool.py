"""retraining_dataset over a raw candidate pool (a local folder, an S3 prefix on moto_server, the incoming/
drops): raw R1-Distill-SFT files of another problem kind than the training split are parsed, cleaned,
validated, selected and tokenized like the data chain's rows; what fails is counted with its reason and
kept in pool_quarantine.parquet; problems of the held-out splits are still never taken."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster._core.storage.dagster_run import DagsterRun

from llmft_assets.data.cleaning import to_conversation
from llmft_assets.data.sample_gen import generate_rows, write_parquet
from llmft_assets.data.tokenization import tokenize_batch
from llmft_assets.data.validation import ValidationLimits
from llmft_assets.definitions import build_resources
from llmft_assets.defs.monitoring.retraining import retraining_dataset
from llmft_assets.monitoring.retrain_pool import POOL_QUARANTINE_FILE
from llmft_assets.monitoring.retraining_step import SELECTION_FILE, TRAFFIC_SLICE_FILE
from llmft_assets.run_tags import TAG_INCOMING_DROP
from llmft_assets.storage import LocalBackend, open_storage
from llmft_assets.storage.incoming import DROP_READY_MARKER
from llmft_assets_tests.retraining_inputs import (
    HELD_OUT_WORD,
    UPSTREAM,
    conversations,
    instance_with_drift_report,
    publish_retraining_inputs,
    tokenized,
)

MAX_SEQ_LEN = 512
# min_similarity 0 and a target above the pool's size: every pool row is a candidate, so the counts are exact.
SELECTION = {"target_rows": 500, "mix_ratio": 0.5, "traffic_slice_fraction": 0.25, "min_similarity": 0.0}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmft_assets.modeling.tiny_model import build_tiny_tokenizer

    rows = generate_rows(150, schema="v0", seed=21, family="word")
    folder = tmp_path_factory.mktemp("base_model")
    build_tiny_tokenizer(
        [row["problem"] + "\n" + row["reannotated_assistant_content"] for row in rows], vocab_size=800
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def storage(llmft_home: Path, tmp_path: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """The splits are arithmetic (plus 4 word rows in train); the traffic is word problems."""
    from llmft_assets.storage.publish import publish_directory

    backend = open_storage(str(llmft_home / "storage"))
    assert isinstance(backend, LocalBackend)
    arithmetic = conversations(300, family="arithmetic", seed=1)
    word = conversations(80, family="word", seed=1)
    base_model = publish_directory(backend, "assets/base_model", tokenizer_dir).version
    publish_retraining_inputs(
        backend,
        tmp_path,
        arithmetic=arithmetic,
        word=word,
        pool=tokenized(arithmetic),
        counts={},
        max_seq_len=MAX_SEQ_LEN,
        base_model_version=base_model,
        dataset={"source": str(tmp_path / "pool"), "config": None},  # the data chain's source
    )
    return {
        "root": Path(str(backend.local_path(""))),
        "held_out_ids": {row["id"] for row in word[HELD_OUT_WORD]},
    }


def write_pool(folder: Path) -> dict[str, Any]:
    """Raw files of word problems (v1 and v0), the held-out splits' word problems, and a JSON lines file
    with one good row, one malformed line and one row without an id."""
    new_v1 = generate_rows(40, schema="v1", seed=5, family="word")
    new_v0 = generate_rows(20, schema="v0", seed=6, family="word")
    held_out = generate_rows(80, schema="v1", seed=1, family="word")[HELD_OUT_WORD]
    (good_jsonl,) = generate_rows(1, schema="v0", seed=7, family="word")
    no_id = {
        key: value
        for key, value in generate_rows(1, schema="v0", seed=8, family="word")[0].items()
        if key != "id"
    }
    write_parquet(new_v1, folder / "v1" / "word.parquet", "v1")
    write_parquet(new_v0, folder / "v0" / "word.parquet", "v0")
    write_parquet(held_out, folder / "held_out.parquet", "v1")
    lines = [json.dumps(good_jsonl), '{"id": "broken", "problem": ', json.dumps(no_id)]
    (folder / "extra.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    new = [*new_v1, *new_v0, good_jsonl]
    return {"new": new, "raw_rows": len(new) + len(held_out) + 2}


def readme_retraining_config() -> dict[str, Any]:
    """The README's retraining_dataset example (its pool setting)."""
    import re

    import yaml

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    (config,) = [b["ops"]["retraining_dataset"]["config"] for b in blocks if "retraining_dataset" in b["ops"]]
    return config


def materialize_result(
    config: dict[str, Any], instance: dg.DagsterInstance | None = None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [*UPSTREAM, retraining_dataset],
        selection=dg.AssetSelection.assets(retraining_dataset),
        resources=build_resources(),
        run_config={"ops": {"retraining_dataset": {"config": config}}},
        instance=instance or instance_with_drift_report(),
        raise_on_error=False,
    )


def materialize(pool: str, config: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path]:
    result = materialize_result(config or {**SELECTION, "pool": pool})
    assert result.success
    (materialization,) = result.asset_materializations_for_node("retraining_dataset")
    metadata = {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}
    return metadata, Path(str(metadata["version"]))


def check_selected_from_pool(
    storage: dict[str, Any],
    pool: dict[str, Any],
    metadata: dict[str, Any],
    version: Path,
    tokenizer_dir: Path,
) -> None:
    folder = storage["root"] / "assets" / "retraining_dataset" / str(version)
    new_ids = {row["id"] for row in pool["new"]}
    assert len(new_ids) == 61
    stats = json.loads((folder / SELECTION_FILE).read_text())
    preparation = stats["pool_preparation"]
    assert preparation["raw_rows"] == pool["raw_rows"] == 69
    assert preparation["rejected_rows"] == 2 and preparation["duplicate_rows"] == 0
    assert preparation["reject_reasons"] == {"raw.malformed_json": 1, "cleaned.missing_column": 1}
    assert preparation["rows_to_selection"] == 67 == metadata["pool_rows"] == stats["pool_rows"]
    # The tokenized_dataset published here records no preparation: the data chain's defaults.
    assert preparation["prepared_with"] == {
        "prefer_reannotated": True,
        "validation": asdict(ValidationLimits()),
    }
    assert metadata["pool_rejected_rows"] == 2 and metadata["pool_raw_rows"] == 69
    # The held-out splits' 6 word problems were in the pool and are not taken; every new row is.
    assert metadata["dropped_in_held_out_splits"] == 6
    assert metadata["selected_rows"] == 61
    train = pq.read_table(folder / "train.parquet")
    traffic_slice = pq.read_table(folder / TRAFFIC_SLICE_FILE)
    selected = (set(train.column("id").to_pylist()) | set(traffic_slice.column("id").to_pylist())) & (
        new_ids | storage["held_out_ids"]
    )
    assert selected == new_ids
    assert traffic_slice.num_rows == metadata["traffic_slice_rows"] > 0
    assert set(traffic_slice.column("id").to_pylist()) <= new_ids
    # Rendered and tokenized as tokenized_dataset does: the base model's template, assistant-only labels.
    from transformers import AutoTokenizer

    raw = {row["id"]: row for row in pool["new"]}
    row = next(r for r in train.to_pylist() if r["id"] in new_ids)
    (expected,) = tokenize_batch(
        [to_conversation(raw[row["id"]], prefer_reannotated=True)],
        AutoTokenizer.from_pretrained(tokenizer_dir),
        max_seq_len=MAX_SEQ_LEN,
    )
    assert (row["input_ids"], row["labels"]) == (expected["input_ids"], expected["labels"])
    quarantine = pq.read_table(folder / POOL_QUARANTINE_FILE).to_pylist()
    assert [(q["stage"], q["reason"].split(":")[0]) for q in quarantine] == [
        ("raw", "malformed_json"),
        ("cleaned", "missing_column"),
    ]
    assert all(q["origin"].endswith(("extra.jsonl#1", "extra.jsonl#2")) for q in quarantine)


def test_a_folder_pool_of_another_kind_is_selected_from(
    storage: dict[str, Any], tmp_path: Path, tokenizer_dir: Path
) -> None:
    pool = write_pool(tmp_path / "pool")
    metadata, version = materialize(str(tmp_path / "pool"))
    assert metadata["pool_version"] == f"location:{tmp_path / 'pool'}"
    check_selected_from_pool(storage, pool, metadata, version, tokenizer_dir)


def test_the_data_chains_source_at_full_size_is_a_pool(
    storage: dict[str, Any], tmp_path: Path, tokenizer_dir: Path
) -> None:
    pool = write_pool(tmp_path / "pool")  # tokenized_dataset holds none of its rows: it read a slice
    metadata, version = materialize("source")
    assert metadata["pool_version"] == f"source:{tmp_path / 'pool'}"
    check_selected_from_pool(storage, pool, metadata, version, tokenizer_dir)


def test_the_incoming_drops_are_a_pool_as_the_readme_configures_it(
    storage: dict[str, Any], tokenizer_dir: Path
) -> None:
    config = readme_retraining_config()
    assert config == {"pool": "incoming", "target_rows": 2000}
    incoming = storage["root"] / "incoming"
    pool = write_pool(incoming / "drop-1")
    (incoming / "drop-1" / DROP_READY_MARKER).write_text("")  # complete
    # A drop still being written (no marker, not taken by incoming_data_sensor) is left out, and named.
    (incoming / "drop-2").mkdir()
    (incoming / "drop-2" / "part-0.jsonl").write_text('{"id": "half-written"')
    metadata, version = materialize("incoming", config)
    assert metadata["pool_version"] == f"incoming:{incoming / 'drop-1'}"
    check_selected_from_pool(storage, pool, metadata, version, tokenizer_dir)
    stats = json.loads(
        (storage["root"] / "assets" / "retraining_dataset" / str(version) / SELECTION_FILE).read_text()
    )
    assert stats["pool_preparation"]["drops_left_out_still_written"] == ["drop-2"]


def test_an_incoming_drop_the_sensor_took_is_complete_and_a_pool_of_unfinished_drops_fails(
    storage: dict[str, Any],
) -> None:
    incoming = storage["root"] / "incoming"
    write_pool(incoming / "drop-1")  # no marker
    result = materialize_result({"pool": "incoming"})
    assert not result.success
    (failure,) = [event for event in result.all_events if event.is_step_failure]
    assert "no complete drop yet (drop-1 may still be being written" in str(
        failure.step_failure_data.error.message
    )
    # incoming_data_sensor took drop-1 (a run tagged with it): it was seen unchanged, so it is complete.
    instance = instance_with_drift_report()
    instance.add_run(
        DagsterRun(job_name="data_job", run_id="took-drop-1", tags={TAG_INCOMING_DROP: "drop-1"})
    )
    result = materialize_result({"pool": "incoming", "target_rows": 2000}, instance)
    assert result.success
    (materialization,) = result.asset_materializations_for_node("retraining_dataset")
    assert materialization.metadata["pool_version"].value == f"incoming:{incoming / 'drop-1'}"


def test_a_raw_pool_is_prepared_with_the_rules_the_data_chain_recorded() -> None:
    from llmft_assets.monitoring.retrain_pool import preparation_of

    said: list[str] = []
    recorded = {"prefer_reannotated": False, "validation": {**asdict(ValidationLimits()), "max_chars": 900}}
    prepared = preparation_of({"source": "s", "preparation": recorded}, log=said.append)
    assert prepared == {"prefer_reannotated": False, "limits": ValidationLimits(max_chars=900)} and said == []
    # Data prepared before the record existed: the defaults, said once.
    assert preparation_of({"source": "s"}, log=said.append) == {
        "prefer_reannotated": True,
        "limits": ValidationLimits(),
    }
    assert said == [
        "the dataset description records no prefer_reannotated / validation settings: the pool uses the defaults"
    ]


def test_an_s3_prefix_pool_on_moto_server(
    storage: dict[str, Any], s3_bucket: str, tmp_path: Path, tokenizer_dir: Path
) -> None:
    import boto3

    pool = write_pool(tmp_path / "pool")
    client = boto3.client("s3")  # AWS_ENDPOINT_URL: the test's moto_server
    for path in sorted((tmp_path / "pool").rglob("*.*")):
        client.upload_file(str(path), s3_bucket, f"raw/pool/{path.relative_to(tmp_path / 'pool')}")
    client.put_object(Bucket=s3_bucket, Key="raw/other/ignored.parquet", Body=b"not under the prefix")
    metadata, version = materialize(f"s3://{s3_bucket}/raw/pool/")
    assert metadata["pool_version"] == f"location:s3://{s3_bucket}/raw/pool/"
    check_selected_from_pool(storage, pool, metadata, version, tokenizer_dir)


def test_a_pool_that_names_nothing_fails_with_a_clear_reason(storage: dict[str, Any], tmp_path: Path) -> None:
    for pool, reason in [
        (str(tmp_path / "missing"), "no such file or directory"),
        ("incoming", "incoming/ holds no .parquet/.jsonl/.json drop"),
    ]:
        result = dg.materialize(
            [*UPSTREAM, retraining_dataset],
            selection=dg.AssetSelection.assets(retraining_dataset),
            resources=build_resources(),
            run_config={"ops": {"retraining_dataset": {"config": {"pool": pool}}}},
            instance=instance_with_drift_report(),
            raise_on_error=False,
        )
        assert not result.success
        (failure,) = [event for event in result.all_events if event.is_step_failure]
        assert reason in str(failure.step_failure_data.error.message)
