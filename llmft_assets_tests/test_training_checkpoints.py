"""LocalCheckpointStore: atomic publish, only complete checkpoints are visible, retention."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmft_assets.training.checkpoints import (
    COMPLETE_MARKER,
    CheckpointStore,
    LocalCheckpointStore,
    checkpoint_step,
)


def _fake_trainer_checkpoint(root: Path, step: int, payload: str = "weights") -> Path:
    directory = root / f"checkpoint-{step}"
    (directory / "nested").mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_text(f"{payload}-{step}")
    (directory / "nested" / "rng_state.pth").write_text("rng")
    return directory


def test_save_then_latest_returns_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path / "store", keep_last=3)
    assert isinstance(store, CheckpointStore)
    assert store.latest() is None
    uris = [store.save(step, _fake_trainer_checkpoint(tmp_path / "trainer", step)) for step in (2, 4)]
    assert uris[-1].startswith("file://") and uris[-1].endswith("checkpoint-4")
    latest = store.latest()
    assert latest is not None and checkpoint_step(latest) == 4
    assert (latest / "adapter_model.safetensors").read_text() == "weights-4"
    assert (latest / "nested" / "rng_state.pth").is_file()
    assert (latest / COMPLETE_MARKER).is_file()


def test_incomplete_and_staging_directories_are_never_returned(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path / "store")
    store.save(2, _fake_trainer_checkpoint(tmp_path / "trainer", 2))
    # a writer killed after the rename but before the marker, and one killed mid-copy
    _fake_trainer_checkpoint(tmp_path / "store", 6)
    (tmp_path / "store" / ".tmp-checkpoint-8-abcd").mkdir()
    latest = store.latest()
    assert latest is not None and checkpoint_step(latest) == 2


def test_retention_keeps_the_last_n_and_resave_replaces(tmp_path: Path) -> None:
    store = LocalCheckpointStore(tmp_path / "store", keep_last=2)
    for step in (1, 2, 3):
        store.save(step, _fake_trainer_checkpoint(tmp_path / f"t{step}", step))
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    store.save(3, _fake_trainer_checkpoint(tmp_path / "again", 3, payload="redone"))
    latest = store.latest()
    assert latest is not None and (latest / "adapter_model.safetensors").read_text() == "redone-3"


def test_bad_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        LocalCheckpointStore(tmp_path).save(1, tmp_path / "missing")
    with pytest.raises(ValueError, match="keep_last"):
        LocalCheckpointStore(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="not a checkpoint"):
        checkpoint_step(tmp_path / "adapter")


def test_finished_checkpoint_is_told_from_an_intermediate_one(tmp_path: Path) -> None:
    import json

    from llmft_assets.training.checkpoints import finished_checkpoint

    for name, state, expected in [
        ("checkpoint-4", {"global_step": 4, "max_steps": 4}, True),
        ("checkpoint-2", {"global_step": 2, "max_steps": 4}, False),
        ("checkpoint-9", {"global_step": 9}, False),  # no plan recorded: never called finished
    ]:
        path = tmp_path / name
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps(state))
        assert finished_checkpoint(path) is expected
    assert finished_checkpoint(tmp_path / "missing") is False
    # A step budget: the new run's decides (a larger one extends training, the same one is zero steps).
    assert finished_checkpoint(tmp_path / "checkpoint-4", max_steps=8) is False
    assert finished_checkpoint(tmp_path / "checkpoint-4", max_steps=4) is True
    assert finished_checkpoint(tmp_path / "checkpoint-9", max_steps=9) is True
    assert finished_checkpoint(tmp_path / "checkpoint-2", max_steps=3) is False


def test_storage_checkpoint_counts_from_its_manifest_even_before_the_pointer(tmp_path: Path) -> None:
    """A run killed between writing a checkpoint's manifest and its LATEST pointer left a complete
    checkpoint: the store resumes from it (by the manifest's version), not fail on the missing pointer."""
    from llmft_assets.storage import open_storage
    from llmft_assets.storage.publish import POINTER_NAME
    from llmft_assets.training.storage_checkpoints import StorageCheckpointStore

    backend = open_storage(str(tmp_path / "storage"))
    store = StorageCheckpointStore(backend, "checkpoints/run", tmp_path / "cache")
    store.save(2, _fake_trainer_checkpoint(tmp_path / "trainer", 2))
    store.save(4, _fake_trainer_checkpoint(tmp_path / "trainer", 4))
    backend.delete(f"checkpoints/run/checkpoint-4/{POINTER_NAME}")  # the kill's state
    assert store.steps() == [2, 4]
    latest = store.latest()
    assert latest is not None and checkpoint_step(latest) == 4
    assert (latest / "adapter_model.safetensors").read_text() == "weights-4"
