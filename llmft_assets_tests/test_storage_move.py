"""Publishing with move_files: local storage renames staged files into place, other cases copy."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from llmft_assets.storage import fetch_artifact, open_storage, publish_directory


def _staged(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "data.parquet").write_bytes(b"rows" * 1000)
    (root / "sub" / "meta.json").write_bytes(b"{}")
    return root


def test_local_publish_moves_the_staged_files_into_place(tmp_path: Path) -> None:
    backend = open_storage(str(tmp_path / "store"))
    staged = _staged(tmp_path / "staging")
    inode = (staged / "data.parquet").stat().st_ino
    published = publish_directory(backend, "assets/x", staged, move_files=True)
    _, folder = fetch_artifact(backend, "assets/x", tmp_path / "cache")
    # The same inode: renamed, not copied; the staging folder no longer holds it.
    assert (folder / "data.parquet").stat().st_ino == inode
    assert not (staged / "data.parquet").exists() and not (staged / "sub" / "meta.json").exists()
    by_path = {entry.path: entry for entry in published.files}
    assert by_path["data.parquet"].sha256 == hashlib.sha256(b"rows" * 1000).hexdigest()
    assert (folder / "sub" / "meta.json").read_bytes() == b"{}"


def test_without_move_files_the_staged_files_stay(tmp_path: Path) -> None:
    backend = open_storage(str(tmp_path / "store"))
    staged = _staged(tmp_path / "staging")
    publish_directory(backend, "assets/x", staged)
    _, folder = fetch_artifact(backend, "assets/x", tmp_path / "cache")
    assert (staged / "data.parquet").exists()
    assert (folder / "data.parquet").stat().st_ino != (staged / "data.parquet").stat().st_ino


def test_move_across_file_systems_falls_back_to_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = open_storage(str(tmp_path / "store"))
    staged = _staged(tmp_path / "staging")
    real_replace = os.replace

    def cross_device(source: str | Path, target: str | Path) -> None:
        if Path(source).is_relative_to(staged):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(source, target)  # the copy's own temp-file rename

    monkeypatch.setattr(os, "replace", cross_device)
    publish_directory(backend, "assets/x", staged, move_files=True)
    _, folder = fetch_artifact(backend, "assets/x", tmp_path / "cache")
    assert (folder / "data.parquet").read_bytes() == b"rows" * 1000
    assert (folder / "sub" / "meta.json").read_bytes() == b"{}"
    assert (staged / "data.parquet").exists()  # copied, not renamed: the fallback ran


def test_s3_publish_with_move_files_uploads(s3_bucket: str, tmp_path: Path) -> None:
    backend = open_storage(f"s3://{s3_bucket}/llmft")
    staged = _staged(tmp_path / "staging")
    publish_directory(backend, "assets/x", staged, move_files=True)
    _, folder = fetch_artifact(backend, "assets/x", tmp_path / "cache")
    assert (folder / "data.parquet").read_bytes() == b"rows" * 1000
