"""Dagster resources and the IO manager over llmft's storage layer (local folder or S3).

Assets write their outputs into a local staging folder and return a `StagedArtifact` (through
`artifact_output`, which makes the content hash the output's Dagster `DataVersion`); the IO manager
publishes it atomically (files, manifest, pointer last) and records uri + version as metadata.
Downstream assets receive an `ArtifactHandle`: a local folder with the verified files. Nothing is pickled.

Which version an input is: the one *this run* materialized, else the one Dagster recorded for the input
when the step started (the input data version in the lineage). The storage pointer (`LATEST.json`),
which any concurrent run can move, is used only when this Dagster instance has no record of the asset
at all (a fresh instance over existing storage).
"""

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
from dagster_aws.s3 import S3Resource

from llmft_assets import settings
from llmft_assets.manifests import Manifest
from llmft_assets.storage import StorageBackend, fetch_artifact, open_storage, publish_directory
from llmft_assets.storage.backend import ObjectNotFound
from llmft_assets.storage.publish import FileEntry, content_version, describe_directory


@dataclass
class StagedArtifact:
    """A local folder an asset filled; the IO manager publishes and then removes it."""

    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    entries: list[FileEntry] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, path: Path, manifest: Manifest) -> "StagedArtifact":
        return cls(path, metadata=manifest.to_dict())

    def content_version(self) -> str:
        """The version storage will give these bytes (hashed once, reused by the IO manager)."""
        if self.entries is None:
            self.entries = describe_directory(self.path)
        return content_version(self.entries)


def artifact_output(artifact: StagedArtifact, metadata: dict[str, Any] | None = None) -> dg.Output:
    """An asset's output whose Dagster DataVersion is the content hash its artifact is published under."""
    with warnings.catch_warnings():  # `data_version` is marked beta; it is the documented way to set it
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(
            artifact, metadata=metadata or {}, data_version=dg.DataVersion(artifact.content_version())
        )


ManifestT = TypeVar("ManifestT", bound=Manifest)


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

    def manifest(self, kind: type[ManifestT]) -> ManifestT:
        """What the upstream asset recorded for its downstream assets, as its typed manifest."""
        return kind.from_dict(self.metadata)


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

    def artifact_dir(self, asset: str, version: str) -> Path:
        """The local folder of one published version of `asset` (fetched into the cache if needed)."""
        _, path = fetch_artifact(
            self.backend(), asset_prefix(dg.AssetKey(asset)), self.cache_dir(), version=version
        )
        return path


def asset_prefix(asset_key: dg.AssetKey, partition_key: str | None = None) -> str:
    """`assets/<key>`, or `assets/<key>/<partition>` for one partition of a partitioned asset: each
    partition has its own immutable versions and its own LATEST pointer."""
    prefix = "assets/" + "/".join(asset_key.path)
    return f"{prefix}/{partition_key}" if partition_key is not None else prefix


def _output_partition(context: dg.OutputContext) -> str | None:
    return context.asset_partition_key if context.has_asset_partitions else None


# AssetIn metadata: the asset reads this input only on some configs (lora_adapter's dataset_splits when it
# trains on sharded splits), so a never-materialized upstream loads as None; the asset decides.
MAY_BE_UNMATERIALIZED = "llmft/may_be_unmaterialized"


class ArtifactIOManager(dg.ConfigurableIOManager):
    storage: dg.ResourceDependency[StorageResource]

    def handle_output(self, context: dg.OutputContext, obj: StagedArtifact) -> None:
        if not isinstance(obj, StagedArtifact):
            raise TypeError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, not StagedArtifact"
            )
        backend = self.storage.backend()
        published = publish_directory(
            backend,
            asset_prefix(context.asset_key, _output_partition(context)),
            obj.path,
            metadata=obj.metadata,
            entries=obj.entries,
            move_files=True,  # the staging folder is removed below: local storage renames, not copies
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

    def load_input(self, context: dg.InputContext) -> "ArtifactHandle | dict[str, ArtifactHandle] | None":
        """One artifact; for a partitioned upstream read by a partitioned asset, the same partition's; for
        one read whole (AllPartitionMapping), {partition key: artifact} over all its partitions. None for an
        input marked MAY_BE_UNMATERIALIZED whose asset was never materialized."""
        key = context.upstream_output.asset_key if context.upstream_output else context.asset_key
        if not context.has_asset_partitions:
            version, pinned_by = pinned_input_version(context, key)
            try:
                handle = self._handle(key, None, version)
            except ObjectNotFound:
                if version is not None or not (context.definition_metadata or {}).get(MAY_BE_UNMATERIALIZED):
                    raise
                context.log.info(f"{key.to_user_string()} was never materialized: input is None")
                return None
            context.add_input_metadata({"version": handle.version, "pinned_by": pinned_by})
            return handle
        if context.has_partition_key:  # a partitioned asset reads its own partition of the upstream
            partition = context.partition_key
            handle = self._handle(key, partition, pinned_partition_version(context, key, partition))
            context.add_input_metadata({"version": handle.version, "pinned_by": "latest of this partition"})
            return handle
        # Read whole (AllPartitionMapping): the versions read are the downstream artifact's to record.
        handles = {}
        for partition in sorted(context.asset_partition_keys):
            try:
                handles[partition] = self._handle(
                    key, partition, pinned_partition_version(context, key, partition)
                )
            except ObjectNotFound as exc:
                raise dg.Failure(
                    description=f"{key.to_user_string()}[{partition}] was never materialized: materialize "
                    "every partition (a backfill) before the asset that reads them all",
                    allow_retries=False,
                ) from exc
        return handles

    def _handle(self, key: dg.AssetKey, partition: str | None, version: str | None) -> ArtifactHandle:
        return artifact_handle(self.storage, key, partition, version)


def artifact_handle(
    storage: StorageResource, key: dg.AssetKey, partition: str | None, version: str | None
) -> ArtifactHandle:
    """One published version of `key` (of one partition), fetched; `version` None: its LATEST pointer."""
    artifact, path = fetch_artifact(
        storage.backend(), asset_prefix(key, partition), storage.cache_dir(), version=version
    )
    return ArtifactHandle(
        asset=key.to_user_string(),
        version=artifact.version,
        uri=artifact.uri,
        path=path,
        metadata=artifact.metadata,
    )


def recorded_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The version of the latest materialization of an unpartitioned `key` Dagster recorded; None if none."""
    return _version_of(instance.get_latest_materialization_event(key))


def published_version(storage: StorageResource, asset: str, version: str) -> tuple[str, Path, dict[str, Any]]:
    """(version, local folder, published metadata) of one version of an unpartitioned `asset` (fetched)."""
    artifact, path = fetch_artifact(
        storage.backend(), asset_prefix(dg.AssetKey(asset)), storage.cache_dir(), version=version
    )
    return artifact.version, path, dict(artifact.metadata)


def recorded_partition_artifact(
    instance: dg.DagsterInstance, storage: StorageResource, key: dg.AssetKey, partition: str | None
) -> tuple[str, ArtifactHandle]:
    """(partition, artifact) of a partitioned asset read outside Dagster's input loading: `partition`, or
    the newest (greatest key) partition Dagster recorded a materialization for, at the version it recorded.
    Raises ValueError when there is none."""
    if partition is None:
        materialized = instance.get_materialized_partitions(key)
        if not materialized:
            raise ValueError(f"{key.to_user_string()} has no materialized partition yet")
        partition = max(materialized)
    version = _recorded_partition_version(instance, key, partition)
    if version is None:
        raise ValueError(f"{key.to_user_string()}[{partition}] was never materialized")
    return partition, artifact_handle(storage, key, partition, version)


def _version_of(record: Any) -> str | None:
    materialization = record.asset_materialization if record is not None else None
    value = materialization.metadata.get("version") if materialization is not None else None
    return str(getattr(value, "value", value)) if value is not None else None


def pinned_input_version(context: dg.InputContext, key: dg.AssetKey) -> tuple[str | None, str]:
    """(version to read, why): this run's materialization of `key`, else the one Dagster recorded for
    this step's input; (None, ...) only when the instance never recorded `key`."""
    from dagster._core.errors import DagsterInvariantViolationError
    from dagster._core.events import DagsterEventType

    try:
        step_context = context.step_context
    except DagsterInvariantViolationError:  # an input context built outside a run (unit tests)
        return None, "storage pointer (no run)"
    instance, run_id = step_context.instance, step_context.run_id
    produced = instance.get_records_for_run(
        run_id=run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
    ).records
    for record in reversed(produced):
        materialization = record.event_log_entry.asset_materialization
        if materialization is not None and materialization.asset_key == key:
            version = _version_of(record.event_log_entry)
            if version:
                return version, f"materialized by this run ({run_id[:8]})"
    info = step_context.maybe_fetch_and_get_input_asset_version_info(key)
    if info is not None:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, storage_ids=[info.storage_id]), limit=1
        ).records
        version = _version_of(records[0].event_log_entry) if records else None
        if version:
            return version, f"input version Dagster recorded (run {info.run_id[:8]})"
    context.log.warning(
        f"{key.to_user_string()}: no materialization recorded in this Dagster instance; reading the "
        "storage pointer (LATEST.json)"
    )
    return None, "storage pointer (not recorded in this instance)"


def pinned_partition_version(context: dg.InputContext, key: dg.AssetKey, partition: str) -> str | None:
    """The version of one partition of `key` to read: the latest materialization Dagster recorded for that
    partition (this run's, if it made one); None (the partition's storage pointer) when none is recorded."""
    from dagster._core.errors import DagsterInvariantViolationError

    try:
        instance = context.step_context.instance
    except DagsterInvariantViolationError:  # an input context built outside a run (unit tests)
        return None
    return _recorded_partition_version(instance, key, partition)


def _recorded_partition_version(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> str | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return _version_of(records[0].event_log_entry) if records else None
