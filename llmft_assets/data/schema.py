"""Table schemas of the data pipeline and the bookkeeping shared by its stages.

The schemas are the contract of docs/architecture.md (Conversation, Quarantine, Tokenized). Every stage
takes rows in and gives rows out, quarantine rows, or dropped duplicates; `StageCounts` keeps the
books so that ``rows_in == rows_out + quarantined + duplicates`` can be checked after every batch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

ROLES: tuple[str, ...] = ("system", "user", "assistant")
SCHEMA_VERSIONS: tuple[str, ...] = ("v0", "v1")
DEFAULT_SOURCE_DATASET = "ServiceNow-AI/R1-Distill-SFT"
IGNORE_INDEX = -100
# Quarantine payloads are for a human to look at, not a copy of the data: keep them small.
MAX_PAYLOAD_CHARS = 2000

MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])

CONVERSATION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("messages", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_dataset", pa.string(), nullable=False),
        pa.field("schema_version", pa.string(), nullable=False),
        # Nullable so that tables written before the column existed still read; cleaning always sets it.
        pa.field("source_format", pa.string(), nullable=True),
        pa.field("reference_answer", pa.string(), nullable=True),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("origin", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=True),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("payload", pa.string(), nullable=True),
    ]
)

TOKENIZED_SCHEMA = pa.schema(
    [
        *CONVERSATION_SCHEMA,
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("num_assistant_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
    ]
)

CONVERSATION_COLUMNS: tuple[str, ...] = tuple(CONVERSATION_SCHEMA.names)


class CountsImbalanceError(AssertionError):
    """Rows went missing (or appeared) inside a stage: the books do not balance."""


@dataclass
class StageCounts:
    """Running totals of one pipeline stage; update it batch after batch.

    ``reasons`` counts quarantine reasons by their code (the text before the first ':').
    ``warnings`` holds human-readable notes that are not row rejections (e.g. an empty input file).
    """

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    quarantined: int = 0
    duplicates: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    extra: Counter[str] = field(default_factory=Counter)

    def record_quarantine(self, reason: str) -> None:
        self.quarantined += 1
        self.reasons[reason.split(":", 1)[0].strip()] += 1

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out + self.quarantined + self.duplicates

    def check_balanced(self) -> None:
        if not self.balanced:
            raise CountsImbalanceError(
                f"stage {self.stage!r}: rows_in={self.rows_in} but rows_out={self.rows_out} + "
                f"quarantined={self.quarantined} + duplicates={self.duplicates} = "
                f"{self.rows_out + self.quarantined + self.duplicates}"
            )

    def merge(self, other: StageCounts) -> None:
        """Add another worker's counts of the same stage into these."""
        self.rows_in += other.rows_in
        self.rows_out += other.rows_out
        self.quarantined += other.quarantined
        self.duplicates += other.duplicates
        self.reasons.update(other.reasons)
        self.warnings.extend(other.warnings)
        self.extra.update(other.extra)

    def to_metadata(self) -> dict[str, Any]:
        """Plain JSON-able dict for asset metadata and logs."""
        return {
            "stage": self.stage,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "quarantine_reasons": dict(sorted(self.reasons.items())),
            "warnings": len(self.warnings),
            "warning_messages": self.warnings[:20],
            **{key: value for key, value in sorted(self.extra.items())},
        }


def payload_json(row: Any, max_chars: int = MAX_PAYLOAD_CHARS) -> str | None:
    """Truncated JSON of a rejected row (never raises; non-JSON values are repr'd)."""
    if row is None:
        return None
    try:
        text = json.dumps(row, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(row)
    except RecursionError:  # nested too deep to show; the reason says so
        text = f"<{type(row).__name__} nested too deep to show>"
    if len(text) > max_chars:
        text = text[:max_chars] + f"...[truncated {len(text) - max_chars} chars]"
    # Lone surrogates cannot be stored as UTF-8: show them escaped.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def quarantine_row(
    *, origin: str, stage: str, reason: str, row: Any = None, row_id: str | None = None
) -> dict[str, Any]:
    """One row in QUARANTINE_SCHEMA. The id is taken from the row when it is a string there."""
    if row_id is None and isinstance(row, Mapping):
        candidate = row.get("id")
        if isinstance(candidate, str):
            row_id = candidate
        elif isinstance(candidate, int) and not isinstance(candidate, bool):
            row_id = str(candidate)
    return {
        "origin": origin,
        "id": row_id,
        "stage": stage,
        "reason": reason,
        "payload": payload_json(row),
    }


def conversation_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts in CONVERSATION_SCHEMA) as an Arrow table; extra keys are ignored."""
    return pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)


def quarantine_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def tokenized_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)
