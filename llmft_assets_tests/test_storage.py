"""Storage backends and the atomic publish protocol, on a local folder and a real moto_server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from llmft_assets.settings import storage_root
from llmft_assets.storage import ObjectNotFound, StorageError, fetch_artifact, open_storage, publish_directory
from llmft_assets.storage.publish import MANIFEST_NAME, latest_version, list_versions
from llmft_assets.storage.tables import ParquetSink, count_rows, iter_parquet_rows


def _make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/llmft")


def test_publish_then_fetch_roundtrip(backend, tmp_path: Path) -> None:
    source = _make_dir(tmp_path / "v1", {"data.parquet": b"x" * 1000, "sub/readme.json": b"{}"})
    published = publish_directory(backend, "assets/demo", source, metadata={"rows": 3})
    assert latest_version(backend, "assets/demo") == published.version
    assert published.uri.endswith(f"assets/demo/{published.version}")
    artifact, local = fetch_artifact(backend, "assets/demo", tmp_path / "cache")
    assert artifact.version == published.version
    assert artifact.metadata == {"rows": 3}
    assert (local / "data.parquet").read_bytes() == b"x" * 1000
    assert (local / "sub" / "readme.json").read_bytes() == b"{}"
    assert artifact.total_bytes == 1002


def test_same_content_same_version_new_content_new_version(backend, tmp_path: Path) -> None:
    first = publish_directory(backend, "assets/a", _make_dir(tmp_path / "one", {"f": b"1"}))
    again = publish_directory(backend, "assets/a", _make_dir(tmp_path / "two", {"f": b"1"}))
    changed = publish_directory(backend, "assets/a", _make_dir(tmp_path / "three", {"f": b"2"}))
    assert first.version == again.version != changed.version
    assert list_versions(backend, "assets/a") == sorted({first.version, changed.version})
    assert latest_version(backend, "assets/a") == changed.version
    # Older versions stay readable by their version.
    _old, local = fetch_artifact(backend, "assets/a", tmp_path / "cache", version=first.version)
    assert (local / "f").read_bytes() == b"1"


def test_missing_artifact_is_a_clear_error(backend, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="nothing published"):
        fetch_artifact(backend, "assets/never", tmp_path / "cache")
    with pytest.raises(StorageError, match="holds no files"):
        publish_directory(backend, "assets/empty", tmp_path)


def test_local_keys_cannot_escape_root(tmp_path: Path) -> None:
    backend = open_storage(str(tmp_path / "store"))
    with pytest.raises(StorageError, match="escapes"):
        backend.put_bytes("../outside", b"no")


def test_storage_root_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMFT_HOME", str(tmp_path))
    monkeypatch.delenv("LLMFT_STORAGE", raising=False)
    assert storage_root() == str(tmp_path / "storage")
    monkeypatch.setenv("LLMFT_STORAGE", "s3://bucket/prefix/")
    assert storage_root() == "s3://bucket/prefix"
    monkeypatch.setenv("LLMFT_STORAGE", "gs://bucket")
    with pytest.raises(ValueError, match="unsupported scheme"):
        storage_root()


def test_parquet_sink_streams_row_groups(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.string()), ("n", pa.int32())])
    path = tmp_path / "t.parquet"
    with ParquetSink(path, schema) as sink:
        for start in range(0, 10_000, 1000):
            sink.write_rows([{"id": str(i), "n": i} for i in range(start, start + 1000)])
    assert count_rows(path) == 10_000
    batches = list(iter_parquet_rows(path, batch_size=2500))
    assert [len(b) for b in batches] == [2500] * 4
    empty = tmp_path / "empty.parquet"
    ParquetSink(empty, schema).close()
    assert count_rows(empty) == 0


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from llmft_assets.storage import open_storage, publish_directory
    backend = open_storage(sys.argv[1])
    publish_directory(backend, "assets/big", Path(sys.argv[2]))
    """
)


def test_writer_killed_mid_upload_leaves_readers_on_the_old_version(s3_bucket: str, tmp_path: Path) -> None:
    root = f"s3://{s3_bucket}/atomic"
    backend = open_storage(root)
    old = publish_directory(backend, "assets/big", _make_dir(tmp_path / "old", {"part-0": b"old"}))
    # Many files so the upload takes long enough to be interrupted between objects.
    big = _make_dir(tmp_path / "new", {f"part-{i:04d}": os.urandom(64 * 1024) for i in range(400)})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, root, str(big)], env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        new_keys: list[str] = []
        while time.monotonic() < deadline and writer.poll() is None:
            new_keys = [
                k for k in backend.list("assets/big/") if f"/{old.version}/" not in k and "part-" in k
            ]
            if len(new_keys) >= 5:
                break
            time.sleep(0.05)
        assert writer.poll() is None, "writer finished before it could be interrupted"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=30)
    assert new_keys, "the writer never started uploading"
    half_version = new_keys[0].split("/")[2]
    assert not backend.exists(f"assets/big/{half_version}/{MANIFEST_NAME}")
    assert list_versions(backend, "assets/big") == [old.version]
    pointer = json.loads(backend.get_bytes("assets/big/LATEST.json"))
    assert pointer["version"] == old.version
    artifact, local = fetch_artifact(backend, "assets/big", tmp_path / "cache")
    assert artifact.version == old.version
    assert (local / "part-0").read_bytes() == b"old"
    # A retry of the same publish completes and moves the pointer.
    done = publish_directory(backend, "assets/big", big)
    assert done.version == half_version
    assert latest_version(backend, "assets/big") == half_version
