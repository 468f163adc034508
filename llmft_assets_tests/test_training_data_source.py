"""Which dataset a training run reads (llmft_assets.training.training_data): files, tokenizer lineage."""

from pathlib import Path

import pytest

from llmft_assets.training.training_data import TRAFFIC_SLICE_FILE, training_data_of


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
