"""Which dataset a training run reads (llmft_assets.training.training_data): files, tokenizer lineage."""

from pathlib import Path

import pytest

from llmft_assets.training.training_data import (
    TRAFFIC_SLICE_FILE,
    TrainingDataMissing,
    resolve_training_data,
    training_data_of,
)


def test_dataset_splits_take_the_tokenized_version_from_upstream_and_have_no_traffic_slice(
    tmp_path: Path,
) -> None:
    (tmp_path / TRAFFIC_SLICE_FILE).write_bytes(b"")  # even a stray file: splits are not judged on traffic
    data = training_data_of("dataset_splits", "s1", tmp_path, {"upstream": "tok-1", "pool_version": "x"})
    assert (data.asset, data.version, data.tokenized_version) == ("dataset_splits", "s1", "tok-1")
    assert data.split("train") == tmp_path / "train.parquet"
    assert data.traffic_slice is None


def test_a_retraining_dataset_takes_the_pool_version_and_has_its_traffic_slice(tmp_path: Path) -> None:
    data = training_data_of("retraining_dataset", "rd1", tmp_path, {"upstream": "x", "pool_version": "tok-2"})
    assert data.tokenized_version == "tok-2"
    assert data.traffic_slice is None  # not published (yet): none, not a path to nothing
    (tmp_path / TRAFFIC_SLICE_FILE).write_bytes(b"")
    assert data.traffic_slice == tmp_path / TRAFFIC_SLICE_FILE


def test_another_asset_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match="training data must be one of dataset_splits, retraining_dataset, sharded_dataset_splits, not 'x'",
    ):
        training_data_of("x", "v", tmp_path, {})


def test_sharded_splits_carry_their_own_max_seq_len_and_no_tokenized_version(tmp_path: Path) -> None:
    metadata = {"upstream": "a@t1,b@t2", "max_seq_len": 256, "dataset": {"source": "shards"}}
    data = training_data_of("sharded_dataset_splits", "sh1", tmp_path, metadata)
    assert (data.tokenized_version, data.max_seq_len, data.dataset) == (None, 256, {"source": "shards"})
    splits = training_data_of("dataset_splits", "s1", tmp_path, {"upstream": "tok-1", "max_seq_len": 9})
    assert splits.max_seq_len is None  # the splits' max_seq_len is the tokenized_dataset's


def test_the_resolver_fetches_the_version_it_is_given(tmp_path: Path) -> None:
    fetched: list[tuple[str, str]] = []

    def fetch(asset: str, version: str) -> tuple[str, Path, dict]:
        fetched.append((asset, version))
        return version, tmp_path / version, {"max_seq_len": 128}

    data = resolve_training_data("sharded_dataset_splits", "sh2", fetch)
    assert fetched == [("sharded_dataset_splits", "sh2")]
    assert (data.asset, data.version, data.split("test"), data.max_seq_len) == (
        "sharded_dataset_splits",
        "sh2",
        tmp_path / "sh2" / "test.parquet",
        128,
    )


def test_the_resolver_says_what_makes_a_source_that_has_no_version(tmp_path: Path) -> None:
    def fetch(asset: str, version: str) -> tuple[str, Path, dict]:
        raise AssertionError("nothing to fetch")

    with pytest.raises(TrainingDataMissing) as caught:
        resolve_training_data("retraining_dataset", None, fetch)
    assert str(caught.value) == (
        "training_data=retraining_dataset but no retraining_dataset is materialized; run "
        "retraining_dataset_job first"
    )
    with pytest.raises(ValueError, match="not 'tokenized_dataset'"):
        resolve_training_data("tokenized_dataset", "v", fetch)
