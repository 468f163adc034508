"""The retraining selection's candidate pool (pure, no Dagster).

``pool`` names where the candidate rows come from:

- ``tokenized_dataset`` (the default): every row the data chain ingested, already tokenized;
- ``source``: the data chain's configured source (recorded in tokenized_dataset's manifest) at full size;
- ``incoming``: every data drop under the storage root's ``incoming/`` folder;
- a local file or folder, or ``s3://bucket/prefix``: raw R1-Distill-SFT files (parquet / jsonl, v0 or v1).

Raw rows go through the data chain's own steps, streamed batch by batch: the raw readers
(`data.raw_sources`), cleaning (`data.cleaning.clean_rows`) and validation (`data.validation.validate_rows`);
the selection then scores the validated conversations, and only the rows it selects are rendered and
tokenized with the base model's tokenizer (`data.tokenization.tokenize_to_table`): tokenizing a 1 M-row
pool to keep 2 000 rows would cost hours. Every row that fails is written to a quarantine file with its
reason and counted, per stage and reason, in the selection statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from llmft_assets.data.key_set import CompactKeySet
from llmft_assets.data.schema import StageCounts, conversation_table
from llmft_assets.data.validation import ValidationLimits
from llmft_assets.storage.backend import StorageBackend
from llmft_assets.storage.tables import ParquetSink

POOL_TOKENIZED = "tokenized_dataset"
POOL_SOURCE = "source"
POOL_INCOMING = "incoming"
DEFAULT_POOL = POOL_TOKENIZED
POOL_DESCRIPTION = (
    "candidate pool: tokenized_dataset (default), source (the data chain's source at full size), "
    "incoming (the incoming/ drops), or a local folder/file or s3://bucket/prefix of raw R1-Distill-SFT files"
)
POOL_QUARANTINE_FILE = "pool_quarantine.parquet"


@dataclass(frozen=True)
class PoolLocations:
    """Where a raw pool is read from (one or more raw sources, in order) and how to name it."""

    kind: Literal["source", "incoming", "location"]
    sources: tuple[str, ...]
    config: str | None = None  # R1-Distill-SFT config for the data chain's source (v0 / v1 / all)
    left_out: tuple[str, ...] = ()  # incoming drops not read: still being written

    @property
    def version(self) -> str:
        """What the manifest records as the pool's version: the kind and what it read."""
        return f"{self.kind}:" + ",".join(self.sources)


def resolve_pool(
    pool: str,
    *,
    dataset: dict[str, Any] | None,
    backend: StorageBackend,
    complete_drops: Collection[str] = (),
) -> PoolLocations | None:
    """The raw locations ``pool`` names, or None for ``tokenized_dataset``. ValueError when it names none:
    ``dataset`` (tokenized_dataset's dataset description) records no source, or incoming/ holds no complete
    drop. A drop is complete when it carries the ready marker or is in ``complete_drops`` (those the
    incoming sensor took: seen unchanged); a drop still being written is left out and named."""
    from llmft_assets.storage.incoming import drop_source, list_incoming_drops

    pool = pool.strip()
    if not pool:
        raise ValueError(f"pool must not be empty ({POOL_DESCRIPTION})")
    if pool == POOL_TOKENIZED:
        return None
    if pool == POOL_SOURCE:
        source = (dataset or {}).get("source")
        if not source:
            raise ValueError("pool 'source': tokenized_dataset records no source (built by an older version)")
        return PoolLocations("source", (str(source),), config=(dataset or {}).get("config"))
    if pool == POOL_INCOMING:
        drops = [drop for drop in list_incoming_drops(backend) if drop.data_keys]
        if not drops:
            raise ValueError("pool 'incoming': incoming/ holds no .parquet/.jsonl/.json drop")
        complete = [drop for drop in drops if drop.ready_marked or drop.name in complete_drops]
        settling = tuple(drop.name for drop in drops if drop not in complete)
        if not complete:
            raise ValueError(
                f"pool 'incoming': no complete drop yet ({', '.join(settling)} may still be being written: "
                "add the ready marker, or let incoming_data_sensor take it first)"
            )
        sources = tuple(drop_source(backend, drop) for drop in complete)
        return PoolLocations("incoming", sources, left_out=settling)
    return PoolLocations("location", (pool,))


def preparation_of(dataset: dict[str, Any] | None, *, log: Callable[[str], None]) -> dict[str, Any]:
    """RawPool's ``prefer_reannotated`` and ``limits`` as the data chain prepared ``dataset``'s rows (its
    description's preparation record); the defaults, said once, for data prepared before it was recorded."""
    preparation = (dataset or {}).get("preparation") or {}
    missing = [step for step in ("prefer_reannotated", "validation") if step not in preparation]
    if missing:
        log(f"the dataset description records no {' / '.join(missing)} settings: the pool uses the defaults")
    return {
        "prefer_reannotated": bool(preparation.get("prefer_reannotated", True)),
        "limits": ValidationLimits(**preparation.get("validation", {})),
    }


@dataclass
class RawPool:
    """Raw rows -> cleaned -> validated conversations (CONVERSATION_SCHEMA tables), streamed once.

    Counts are kept per stage (rows in = rows out + quarantined + duplicates, as in the data chain);
    rejected rows go to ``quarantine`` (a QUARANTINE_SCHEMA sink) with their reason.
    """

    locations: PoolLocations
    quarantine: ParquetSink
    batch_rows: int = 2048
    prefer_reannotated: bool = True
    limits: ValidationLimits = field(default_factory=ValidationLimits)
    s3_client: Any = None
    raw: StageCounts = field(default_factory=lambda: StageCounts(stage="raw"))
    cleaned: StageCounts = field(default_factory=lambda: StageCounts(stage="cleaned"))
    validated: StageCounts = field(default_factory=lambda: StageCounts(stage="validated"))

    def batches(self) -> Iterator[pa.Table]:
        """The validated conversations, batch by batch. Raises DataSourceError / ValueError for a location
        that cannot be read at all (missing path, empty prefix)."""
        from llmft_assets.data.cleaning import clean_rows
        from llmft_assets.data.raw_sources import iter_raw_batches
        from llmft_assets.data.validation import validate_rows

        seen_hashes, seen_ids = CompactKeySet(), CompactKeySet()  # 16 bytes a row, not a set of strings
        for source in self.locations.sources:
            for raw in iter_raw_batches(
                source,
                config=self.locations.config,
                batch_size=self.batch_rows,
                s3_client=self.s3_client,
                counts=self.raw,
            ):
                self.quarantine.write_rows(raw.quarantine)
                cleaned, rejected = clean_rows(
                    raw.rows,
                    seen_hashes=seen_hashes,
                    counts=self.cleaned,
                    prefer_reannotated=self.prefer_reannotated,
                )
                self.quarantine.write_rows(rejected)
                valid, rejected = validate_rows(
                    cleaned, seen_ids=seen_ids, limits=self.limits, counts=self.validated
                )
                self.quarantine.write_rows(rejected)
                if valid:
                    yield conversation_table(valid)

    def stats(self) -> dict[str, Any]:
        """What the pool held and what did not reach the selection, with reasons per stage."""
        for counts in (self.raw, self.cleaned, self.validated):
            counts.check_balanced()
        reasons = {
            f"{counts.stage}.{reason}": count
            for counts in (self.raw, self.cleaned, self.validated)
            for reason, count in sorted(counts.reasons.items())
        }
        return {
            "pool": self.locations.version,
            "raw_rows": self.raw.rows_in,
            "rejected_rows": self.raw.quarantined + self.cleaned.quarantined + self.validated.quarantined,
            "duplicate_rows": self.cleaned.duplicates,
            "rows_to_selection": self.validated.rows_out,
            "reject_reasons": reasons,
            "warnings": list(self.raw.warnings[:20]),
            "drops_left_out_still_written": list(self.locations.left_out),
            "prepared_with": {
                "prefer_reannotated": self.prefer_reannotated,
                "validation": asdict(self.limits),
            },
        }


def tokenize_selected(table: pa.Table, tokenizer: Any, *, max_seq_len: int, counts: StageCounts) -> pa.Table:
    """Selected conversations rendered with the base model's chat template and tokenized, as the data
    chain's tokenized_dataset does (assistant-only labels; over-long sequences truncated and counted)."""
    from llmft_assets.data.schema import TOKENIZED_SCHEMA
    from llmft_assets.data.tokenization import tokenize_to_table

    if not table.num_rows:  # nothing selected (an empty pool's table has no columns at all)
        return TOKENIZED_SCHEMA.empty_table()
    return tokenize_to_table(table, tokenizer, max_seq_len=max_seq_len, counts=counts)


def quarantine_path(staging: Path) -> Path:
    return staging / POOL_QUARANTINE_FILE
