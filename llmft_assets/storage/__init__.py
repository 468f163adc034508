"""Storage: one API over a local folder or S3, with atomic publishing. No Dagster import."""

from llmft_assets.storage.backend import (
    LocalBackend,
    ObjectNotFound,
    S3Backend,
    StorageBackend,
    StorageError,
    open_storage,
)
from llmft_assets.storage.publish import PublishedArtifact, fetch_artifact, publish_directory, read_manifest

__all__ = [
    "LocalBackend",
    "ObjectNotFound",
    "PublishedArtifact",
    "S3Backend",
    "StorageBackend",
    "StorageError",
    "fetch_artifact",
    "open_storage",
    "publish_directory",
    "read_manifest",
]
