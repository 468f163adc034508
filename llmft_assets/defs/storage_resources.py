"""Dagster resources and the IO manager over llmft's storage layer (local folder or S3).

Assets write their outputs into a local staging folder and return a `StagedArtifact`; the IO manager
publishes it atomically (files, manifest, pointer last) and records uri + version as metadata.
Downstream assets receive an `ArtifactHandle`: a local folder with the verified files. Nothing is pickled.
"""

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from llmft_assets import settings
from llmft_assets.storage import StorageBackend, fetch_artifact, open_storage, publish_directory


@dataclass
class StagedArtifact:
    """A local folder an asset filled; the IO manager publishes and then removes it."""

    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ArtifactHandle:
    """A published artifact as a downstream asset sees it."""

    asset: str
    version: str
    uri: str
    path: Path
    metadata: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


class StorageResource(dg.ConfigurableResource):
    """The one storage root: `LLMFT_STORAGE` (a path or s3://bucket/prefix), else `$LLMFT_HOME/storage`."""

    root: str = ""
    s3: dg.ResourceDependency[S3Resource]

    def root_uri(self) -> str:
        return self.root.rstrip("/") if self.root else settings.storage_root()

    def backend(self) -> StorageBackend:
        root = self.root_uri()
        client = self.s3.get_client() if root.startswith("s3://") else None
        return open_storage(root, s3_client=client)

    def staging_dir(self, name: str) -> Path:
        base = settings.llmft_home() / "staging"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))

    def cache_dir(self) -> Path:
        return settings.cache_dir("artifacts")


def asset_prefix(asset_key: dg.AssetKey) -> str:
    return "assets/" + "/".join(asset_key.path)


class ArtifactIOManager(dg.ConfigurableIOManager):
    storage: dg.ResourceDependency[StorageResource]

    def handle_output(self, context: dg.OutputContext, obj: StagedArtifact) -> None:
        if not isinstance(obj, StagedArtifact):
            raise TypeError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not StagedArtifact"
            )
        backend = self.storage.backend()
        published = publish_directory(
            backend, asset_prefix(context.asset_key), obj.path, metadata=obj.metadata
        )
        context.add_output_metadata(
            {
                "uri": dg.MetadataValue.path(published.uri),
                "version": published.version,
                "files": len(published.files),
                "bytes": published.total_bytes,
            }
        )
        shutil.rmtree(obj.path, ignore_errors=True)

    def load_input(self, context: dg.InputContext) -> ArtifactHandle:
        key = context.upstream_output.asset_key if context.upstream_output else context.asset_key
        artifact, path = fetch_artifact(self.storage.backend(), asset_prefix(key), self.storage.cache_dir())
        return ArtifactHandle(
            asset=key.to_user_string(),
            version=artifact.version,
            uri=artifact.uri,
            path=path,
            metadata=artifact.metadata,
        )
