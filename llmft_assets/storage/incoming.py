"""New raw data dropped under `<storage root>/incoming/`: which drops there are, when one is complete, and
which of them to start a data run for. No Dagster import: the incoming-data sensor translates the plan.

A drop is a top-level file or folder. A folder carrying `_SUCCESS` is complete at once; anything else
must be unchanged (same fingerprint) between two sensor evaluations, so a half-copied file or folder is
never read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from llmft_assets.data.raw_sources import SUPPORTED_SUFFIXES
from llmft_assets.storage.backend import StorageBackend

INCOMING_PREFIX = "incoming"
DROP_READY_MARKER = "_SUCCESS"
# Names a writer uses while a file is incomplete, or that are not data.
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart")


def incoming_uri(storage_root: str) -> str:
    """Where new raw data is dropped: `<root>/incoming` (a local folder or an s3:// prefix)."""
    return f"{storage_root.rstrip('/')}/{INCOMING_PREFIX}"


@dataclass(frozen=True)
class IncomingDrop:
    """One drop under incoming/: a top-level file or folder."""

    name: str
    keys: tuple[str, ...]
    is_folder: bool

    @property
    def data_keys(self) -> tuple[str, ...]:
        return tuple(key for key in self.keys if key.lower().endswith(SUPPORTED_SUFFIXES))

    @property
    def ready_marked(self) -> bool:
        return self.is_folder and any(key.rsplit("/", 1)[-1] == DROP_READY_MARKER for key in self.keys)


def list_incoming_drops(backend: StorageBackend) -> list[IncomingDrop]:
    """Top-level entries of `incoming/` with their data keys (hidden and in-progress files left out)."""
    grouped: dict[str, list[str]] = {}
    folders: set[str] = set()
    for key in backend.iter_keys(f"{INCOMING_PREFIX}/"):
        relative = key[len(INCOMING_PREFIX) + 1 :]
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts) or relative.endswith(IGNORED_SUFFIXES):
            continue
        grouped.setdefault(parts[0], []).append(key)
        if len(parts) > 1:
            folders.add(parts[0])
    return [
        IncomingDrop(name=name, keys=tuple(sorted(keys)), is_folder=name in folders)
        for name, keys in sorted(grouped.items())
    ]


def drop_fingerprint(backend: StorageBackend, drop: IncomingDrop) -> str:
    """Changes whenever the drop's content changes: keys, and sizes + mtimes where the files are local
    (S3 objects appear whole, so their keys suffice)."""
    digest = hashlib.sha256()
    for key in drop.keys:
        digest.update(key.encode())
        local = backend.local_path(key)
        if local is not None:
            try:
                stat = local.stat()
            except OSError:  # removed while listing: the next evaluation sees a new fingerprint
                continue
            digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def drop_source(backend: StorageBackend, drop: IncomingDrop) -> str:
    """What raw_dataset reads for the drop: a local path, or an s3:// URI (folders end with '/')."""
    key = f"{INCOMING_PREFIX}/{drop.name}"
    local = backend.local_path(key)
    if local is not None:
        return str(local)
    return backend.uri(key) + ("/" if drop.is_folder else "")


@dataclass(frozen=True)
class DropRun:
    drop: IncomingDrop
    fingerprint: str
    source: str


@dataclass
class IncomingPlan:
    """What one sensor evaluation does with the drops it sees, and the cursor it leaves."""

    runs: list[DropRun] = field(default_factory=list)
    processed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    waiting_for_slot: list[str] = field(default_factory=list)
    not_data: list[str] = field(default_factory=list)

    def cursor(self) -> str:
        return json.dumps({"processed": self.processed, "pending": self.pending}, sort_keys=True)

    @property
    def settling(self) -> list[str]:
        return sorted(set(self.pending) - set(self.waiting_for_slot))


def plan_incoming_runs(backend: StorageBackend, cursor: str | None, *, free_slots: int) -> IncomingPlan:
    """Each complete, new (or changed) drop with data becomes a run, at most `free_slots` of them; a
    ready drop beyond that waits as settled, so a later evaluation starts it at once."""
    state = json.loads(cursor) if cursor else {}
    previous_pending: dict[str, str] = dict(state.get("pending", {}))
    plan = IncomingPlan(processed=dict(state.get("processed", {})))
    for drop in list_incoming_drops(backend):
        fingerprint = drop_fingerprint(backend, drop)
        if plan.processed.get(drop.name) == fingerprint:
            continue
        if not drop.ready_marked and previous_pending.get(drop.name) != fingerprint:
            plan.pending[drop.name] = fingerprint  # still settling (or just seen): look again next time
            continue
        if drop.data_keys and len(plan.runs) >= free_slots:
            plan.pending[drop.name] = fingerprint
            plan.waiting_for_slot.append(drop.name)
            continue
        plan.processed[drop.name] = fingerprint
        if not drop.data_keys:
            # Not data raw_dataset can read: said once instead of launching a run bound to fail.
            plan.not_data.append(drop.name)
            continue
        plan.runs.append(DropRun(drop=drop, fingerprint=fingerprint, source=drop_source(backend, drop)))
    return plan
