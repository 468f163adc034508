"""A source as shards: each of its files is one partition of the sharded data chain, processed on its own.

`list_source_shards` turns a source (the bundled sample, a local file/glob/folder, an s3:// prefix, an
incoming/ drop) into `SourceShard`s with stable keys; `register_shards` records each shard's source under
`<storage root>/source_shards/<key>.json`, so any process (a pod on a cluster) can read a partition's
shard from its key alone. `assemble_shards` is where the shards meet again: exact duplicates (content
hash) and repeated ids are removed *across* shards, in bounded memory (16 bytes a key), before
`write_splits` cuts the same leak-free splits the unpartitioned chain cuts. No Dagster import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmft_assets.data.key_set import CompactKeySet
from llmft_assets.data.schema import QUARANTINE_SCHEMA, TOKENIZED_SCHEMA, StageCounts
from llmft_assets.data.splits import SplitSettings
from llmft_assets.manifests import DatasetDescription, SplitsManifest
from llmft_assets.storage.backend import ObjectNotFound, StorageBackend
from llmft_assets.storage.tables import ParquetSink, open_parquet

SHARDS_PREFIX = "source_shards"
ASSEMBLED_STAGE = "assembled"
QUARANTINE_FILE = "quarantine.parquet"
ASSEMBLY_BATCH_ROWS = 2048
_KEY_STEM_CHARS = 40
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UnknownShardError(LookupError):
    """A partition key with no registered shard under `<root>/source_shards/`."""


@dataclass(frozen=True)
class SourceShard:
    """One shard: what `iter_raw_batches` reads for it (source + config), and the source it was listed from."""

    key: str
    source: str
    config: str | None
    listed_from: str
    listed_config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceShard:
        names = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def shard_key(source: str, config: str | None) -> str:
    """A partition key that names the shard (its file stem) and cannot collide (a hash of source + config).

    Only [A-Za-z0-9._-]: it is also a storage path segment."""
    if source == "sample":
        return f"sample-{config}"
    stem = source.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
    stem = _UNSAFE.sub("_", stem)[:_KEY_STEM_CHARS].strip("_") or "shard"
    digest = hashlib.sha256(f"{source}\0{config}".encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def list_source_shards(source: str, config: str | None = None, s3_client: Any = None) -> list[SourceShard]:
    """The shards of `source`, one per file, in the order the unpartitioned chain reads them.

    Raises DataSourceError for a source that cannot be listed (missing, empty, a Hugging Face id)."""
    from llmft_assets.data.raw_sources import list_source_files

    listed_from = source.strip()
    return [
        SourceShard(
            key=shard_key(path, shard_config),
            source=path,
            config=shard_config,
            listed_from=listed_from,
            listed_config=config,
        )
        for path, shard_config in list_source_files(listed_from, config, s3_client)
    ]


def _spec_key(key: str) -> str:
    if _UNSAFE.search(key) or not key:
        raise UnknownShardError(f"{key!r} is not a shard key (only letters, digits, '.', '_', '-')")
    return f"{SHARDS_PREFIX}/{key}.json"


def register_shards(backend: StorageBackend, shards: Sequence[SourceShard]) -> list[str]:
    """Record each shard's source under its key (idempotent); returns the keys in order."""
    for shard in shards:
        backend.put_bytes(_spec_key(shard.key), json.dumps(shard.to_dict(), sort_keys=True).encode())
    return [shard.key for shard in shards]


def read_shard(backend: StorageBackend, key: str) -> SourceShard:
    try:
        return SourceShard.from_dict(json.loads(backend.get_bytes(_spec_key(key))))
    except ObjectNotFound as exc:
        raise UnknownShardError(
            f"shard {key!r} is not registered under {backend.uri(SHARDS_PREFIX)}/ (register its source first)"
        ) from exc


@dataclass(frozen=True)
class ShardInput:
    """One tokenized shard as the assembly reads it."""

    key: str
    data_file: Path
    version: str
    dataset: dict[str, Any] | None
    max_seq_len: int | None = None  # what its tokenized_dataset manifest recorded
    base_model_version: str | None = None


@dataclass
class AssemblyResult:
    manifest: SplitsManifest
    counts: StageCounts
    rows_in: int
    near_duplicates_joined_eval_split: int
    rows_per_shard: dict[str, int]


def _assembled_dataset(shards: Sequence[ShardInput]) -> dict[str, Any] | None:
    """One dataset description for the whole: the shards' own when they agree, else their union."""
    described = [shard.dataset for shard in shards if shard.dataset]
    if not described:
        return None
    unique = {json.dumps(item, sort_keys=True): item for item in described}
    if len(unique) == 1:
        return next(iter(unique.values()))
    sources = sorted({str(item.get("source")) for item in described})
    licenses = sorted({str(item.get("license")) for item in described})
    return DatasetDescription(
        source=", ".join(sources),
        config=None,
        license=licenses[0] if len(licenses) == 1 else "mixed: " + ", ".join(licenses),
        license_source="shards",
    ).to_dict()


def _agreed(shards: Sequence[ShardInput], field: str) -> Any:
    """The value of `field` every shard was tokenized with; ValueError naming the shards of each value when
    they differ (rows cut at different lengths, or by different tokenizers, cannot train together)."""
    keys_by_value: dict[Any, list[str]] = {}
    for shard in shards:
        keys_by_value.setdefault(getattr(shard, field), []).append(shard.key)
    if len(keys_by_value) == 1:
        return next(iter(keys_by_value))
    found = "; ".join(
        f"{'not recorded' if value is None else value} in {', '.join(keys)}"
        for value, keys in sorted(keys_by_value.items(), key=lambda item: (item[0] is None, str(item[0])))
    )
    raise ValueError(
        f"the shards were tokenized with different {field}: {found}; re-materialize shard_tokenized_dataset "
        "for those shards with one base_model and one max_seq_len"
    )


def _dedup_batch(
    batch: pa.RecordBatch, seen_hashes: CompactKeySet, seen_ids: CompactKeySet, counts: StageCounts, key: str
) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The batch's rows not seen in an earlier shard (or earlier in this one), and quarantine rows for the
    rows whose id another kept row already has."""
    keep: list[bool] = []
    quarantine: list[dict[str, Any]] = []
    ids = batch.column("id").to_pylist()
    origins = batch.column("origin").to_pylist()
    for row_id, content_hash, origin in zip(
        ids, batch.column("content_hash").to_pylist(), origins, strict=True
    ):
        counts.rows_in += 1
        if content_hash in seen_hashes:
            counts.duplicates += 1
            keep.append(False)
        elif row_id in seen_ids:
            counts.record_quarantine("duplicate_id: another shard holds a different row with this id")
            quarantine.append(
                {
                    "origin": origin,
                    "id": row_id,
                    "stage": ASSEMBLED_STAGE,
                    "payload": None,
                    "reason": f"duplicate_id: {row_id!r} (shard {key}) is already the id of a different, kept row",
                }
            )
            keep.append(False)
        else:
            seen_hashes.add(content_hash)
            seen_ids.add(row_id)
            counts.rows_out += 1
            keep.append(True)
    return pa.Table.from_batches([batch]).filter(pa.array(keep, pa.bool_())), quarantine


def assemble_shards(
    shards: Sequence[ShardInput],
    *,
    rule: SplitSettings,
    staging: Path,
    log: Callable[[str], None],
) -> AssemblyResult:
    """All tokenized shards, in shard order (the sorted keys), as one table without cross-shard duplicates
    (by content hash) or repeated ids (quarantined), split as the unpartitioned `dataset_splits` splits it.
    The shards must agree on max_seq_len and base_model version (recorded in the manifest: training reads
    max_seq_len there), else ValueError naming them.

    Writes train/validation/test.parquet and quarantine.parquet into `staging`; rows in = rows out +
    quarantined + duplicates, checked."""
    from llmft_assets.data.split_tables import write_splits
    from llmft_assets.data.stage import SPLIT_NAMES, split_path

    if not shards:
        raise ValueError("no tokenized shard to assemble: register the source's shards and materialize them")
    ordered = sorted(shards, key=lambda shard: shard.key)
    max_seq_len = _agreed(ordered, "max_seq_len")
    base_model_version = _agreed(ordered, "base_model_version")
    counts = StageCounts(stage=ASSEMBLED_STAGE)
    seen_hashes, seen_ids = CompactKeySet(), CompactKeySet()
    rows_per_shard: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="llmft-assembly-") as temp_dir:
        assembled = Path(temp_dir) / "assembled.parquet"
        with (
            ParquetSink(assembled, TOKENIZED_SCHEMA) as rows_sink,
            ParquetSink(staging / QUARANTINE_FILE, QUARANTINE_SCHEMA) as quarantine_sink,
        ):
            for shard in ordered:
                before = counts.rows_out
                for batch in open_parquet(shard.data_file).iter_batches(batch_size=ASSEMBLY_BATCH_ROWS):
                    kept, quarantine = _dedup_batch(batch, seen_hashes, seen_ids, counts, shard.key)
                    rows_sink.write_table(kept)
                    quarantine_sink.write_rows(quarantine)
                rows_per_shard[shard.key] = counts.rows_out - before
        counts.check_balanced()
        log(
            f"assembled {len(ordered)} shard(s): {counts.rows_in} rows in, {counts.rows_out} kept, "
            f"{counts.duplicates} cross-shard duplicates, {counts.quarantined} repeated ids quarantined"
        )
        paths = {name: split_path(staging, name) for name in SPLIT_NAMES}
        written = write_splits(assembled, paths, TOKENIZED_SCHEMA, rule)
    sizes = written.rows
    if sum(sizes.values()) != counts.rows_out:
        raise RuntimeError(f"split sizes {sizes} do not add up to {counts.rows_out} assembled rows")
    manifest = SplitsManifest(
        rows=sizes,
        tokens=written.tokens,
        salt=rule.salt,
        split_key="normalized first user turn",
        near_duplicate_jaccard=rule.near_duplicate_jaccard,
        near_duplicates_moved_to_train=written.plan.moved_to_train,
        upstream=",".join(f"{shard.key}@{shard.version}" for shard in ordered),
        dataset=_assembled_dataset(ordered),
        shards={shard.key: shard.version for shard in ordered},
        assembly=counts.to_metadata(),
        max_seq_len=max_seq_len,
        base_model_version=base_model_version,
    )
    return AssemblyResult(
        manifest=manifest,
        counts=counts,
        rows_in=counts.rows_in,
        near_duplicates_joined_eval_split=written.plan.joined_eval_group,
        rows_per_shard=rows_per_shard,
    )
