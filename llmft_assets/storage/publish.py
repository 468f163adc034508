"""Atomic, content-addressed publishing of artifact directories.

Protocol (see docs/architecture.md): files go under an immutable `<prefix>/<version>/`, then
`<prefix>/<version>/_MANIFEST.json` (sizes and sha256 of every file), then the pointer
`<prefix>/LATEST.json`, a single small PUT. A reader follows pointer -> manifest -> files, so it never
sees half an artifact; a writer that dies mid-upload leaves only an unreferenced version prefix.
The version is derived from the content, so the same bytes always get the same version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmft_assets.storage.backend import ObjectNotFound, StorageBackend, StorageError

MANIFEST_NAME = "_MANIFEST.json"
POINTER_NAME = "LATEST.json"
_VERIFIED_MARKER = ".llmft-verified"


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PublishedArtifact:
    prefix: str
    version: str
    uri: str
    files: list[FileEntry]
    published_at: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "files": [asdict(entry) for entry in self.files]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublishedArtifact:
        return cls(
            prefix=data["prefix"],
            version=data["version"],
            uri=data["uri"],
            files=[FileEntry(**entry) for entry in data["files"]],
            published_at=float(data["published_at"]),
            metadata=dict(data.get("metadata") or {}),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_directory(local_dir: Path) -> list[FileEntry]:
    if not local_dir.is_dir():
        raise StorageError(f"cannot publish {local_dir}: not a directory")
    entries = [
        FileEntry(path.relative_to(local_dir).as_posix(), path.stat().st_size, sha256_file(path))
        for path in sorted(local_dir.rglob("*"))
        if path.is_file() and path.name != _VERIFIED_MARKER
    ]
    if not entries:
        raise StorageError(f"cannot publish {local_dir}: it holds no files")
    return entries


def content_version(entries: list[FileEntry]) -> str:
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.path}\0{entry.sha256}\n".encode())
    return digest.hexdigest()[:16]


def publish_directory(
    backend: StorageBackend,
    prefix: str,
    local_dir: Path,
    *,
    metadata: dict[str, Any] | None = None,
    update_pointer: bool = True,
    entries: list[FileEntry] | None = None,
    move_files: bool = False,
) -> PublishedArtifact:
    """Upload `local_dir` under `<prefix>/<version>/`, then its manifest, then the pointer.

    `entries`: the directory's description when the caller already hashed it (not re-read).
    `move_files`: the caller drops `local_dir` afterwards, so a local backend may rename its files into
    place instead of copying them (each byte is then written once and hashed once, by `describe_directory`).
    """
    prefix = prefix.strip("/")
    entries = entries if entries is not None else describe_directory(Path(local_dir))
    version = content_version(entries)
    version_prefix = f"{prefix}/{version}"
    manifest_key = f"{version_prefix}/{MANIFEST_NAME}"
    artifact = PublishedArtifact(
        prefix=prefix,
        version=version,
        uri=backend.uri(version_prefix),
        files=entries,
        published_at=time.time(),
        metadata=metadata or {},
    )
    if not backend.exists(manifest_key):  # same content already published completely: nothing to upload
        put = backend.move_file if move_files else backend.put_file
        for entry in entries:
            put(f"{version_prefix}/{entry.path}", Path(local_dir) / entry.path)
        backend.put_bytes(manifest_key, json.dumps(artifact.to_json(), indent=2).encode())
    if update_pointer:
        pointer = {"version": version, "manifest_key": manifest_key, "published_at": artifact.published_at}
        backend.put_bytes(f"{prefix}/{POINTER_NAME}", json.dumps(pointer).encode())
    return artifact


def latest_version(backend: StorageBackend, prefix: str) -> str | None:
    try:
        pointer = json.loads(backend.get_bytes(f"{prefix.strip('/')}/{POINTER_NAME}"))
    except ObjectNotFound:
        return None
    return str(pointer["version"])


def read_manifest(backend: StorageBackend, prefix: str, version: str | None = None) -> PublishedArtifact:
    prefix = prefix.strip("/")
    version = version or latest_version(backend, prefix)
    if version is None:
        raise ObjectNotFound(f"nothing published under {backend.uri(prefix)} yet")
    return PublishedArtifact.from_json(json.loads(backend.get_bytes(f"{prefix}/{version}/{MANIFEST_NAME}")))


def list_versions(backend: StorageBackend, prefix: str) -> list[str]:
    """Complete versions only: a version counts once its manifest exists."""
    prefix = prefix.strip("/")
    return sorted(
        {
            key[len(prefix) + 1 :].split("/")[0]
            for key in backend.iter_keys(prefix + "/")
            if key.endswith(f"/{MANIFEST_NAME}")
        }
    )


def fetch_artifact(
    backend: StorageBackend, prefix: str, cache_root: Path, version: str | None = None
) -> tuple[PublishedArtifact, Path]:
    """A local directory holding the artifact's files, verified against its manifest.

    The local backend hands back the published folder itself; S3 downloads into `cache_root` once per
    version (verified sha256, then a marker), so training pods and servers re-use what they fetched.
    """
    artifact = read_manifest(backend, prefix, version)
    version_prefix = f"{artifact.prefix}/{artifact.version}"
    in_place = backend.local_path(version_prefix)
    if in_place is not None:
        return artifact, in_place
    target = Path(cache_root) / artifact.prefix / artifact.version
    if (target / _VERIFIED_MARKER).exists():
        return artifact, target
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for entry in artifact.files:
        destination = staging / entry.path
        backend.download_file(f"{version_prefix}/{entry.path}", destination)
        if sha256_file(destination) != entry.sha256:
            raise StorageError(
                f"{backend.uri(version_prefix)}/{entry.path}: checksum mismatch after download"
            )
    (staging / _VERIFIED_MARKER).write_text(artifact.version)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    return artifact, target
