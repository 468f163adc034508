"""Cleaning: map both R1-Distill-SFT configs to the canonical conversation, normalize text, dedupe.

v0 rows (``problem``, ``reannotated_assistant_content``, ``solution``) become one user and one
assistant turn, with the reference answer taken from the ``\\boxed{}`` of ``solution``. v1 rows carry
``messages`` (or, failing that, ``reannotated_messages``) as a list of ``{role, content}``; their
reference answer is the last ``\\boxed{}`` of the assistant turns. Text is NFC-normalized, stripped of
control characters (tab and newline kept), with CRLF, trailing spaces and runs of blank lines
normalized. Exact duplicates (same normalized roles and contents) are dropped across the whole stream
through ``seen_hashes``. Rows that do not fit go to quarantine with a precise reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from llmft_assets.data.answers import extract_boxed_answer
from llmft_assets.data.schema import (
    DEFAULT_SOURCE_DATASET,
    ROLES,
    StageCounts,
    quarantine_row,
)

STAGE = "cleaned"
V0_REQUIRED = ("problem", "reannotated_assistant_content")
V1_MESSAGE_COLUMNS = ("messages", "reannotated_messages")
NON_NULL_PREFIX = "non_null."
UNKNOWN_SOURCE = "unknown"

# C0/C1 control characters except tab (\x09) and newline (\x0a); CR is folded into \n before this.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n)")
_BLANK_LINE_RUNS = re.compile(r"\n{4,}")  # more than two blank lines in a row


class RowRejected(Exception):
    """A row cannot become a conversation; the message is the quarantine reason."""


def normalize_text(text: str) -> str:
    """NFC, no control characters but tab/newline, LF line ends, no trailing spaces, <= 2 blank lines."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL_CHARS.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINE_RUNS.sub("\n\n\n", text)
    return text.strip()


def content_hash(messages: Iterable[dict[str, str]]) -> str:
    """sha256 over the (already normalized) roles and contents, in order."""
    canonical = json.dumps(
        [[message["role"], message["content"]] for message in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def detect_schema_version(row: Mapping[str, Any]) -> str:
    """'v1' for a row with a messages column, 'v0' for a problem/answer row; RowRejected otherwise."""
    if any(column in row for column in V1_MESSAGE_COLUMNS):
        return "v1"
    if "problem" in row:
        return "v0"
    columns = sorted(key for key in row if key != "origin")
    raise RowRejected(
        "unknown_schema: expected v0 columns (problem, reannotated_assistant_content) or v1 columns "
        f"(messages or reannotated_messages), got columns {columns}"
    )


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require_string(row: Mapping[str, Any], column: str) -> str:
    if column not in row:
        raise RowRejected(f"missing_column: {column}")
    value = row[column]
    if value is None:
        raise RowRejected(f"missing_value: {column} is null")
    if not isinstance(value, str):
        raise RowRejected(f"wrong_type: {column} is {_type_name(value)}, expected string")
    return value


def _row_id(row: Mapping[str, Any]) -> str:
    if "id" not in row or row["id"] is None:
        raise RowRejected("missing_column: id")
    value = row["id"]
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowRejected(f"wrong_type: id is {_type_name(value)}, expected string")
    value = value.strip()
    if not value:
        raise RowRejected("empty_id: id is an empty string")
    return value


def _optional_string(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowRejected(f"wrong_type: {column} is {_type_name(value)}, expected string or null")
    return value


def _canonical_messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple):
        raise RowRejected(
            f"wrong_type: {column} is {_type_name(value)}, expected a list of {{role, content}}"
        )
    if not value:
        raise RowRejected(f"empty_messages: {column} is an empty list")
    messages = []
    for index, message in enumerate(value):
        where = f"{column}[{index}]"
        if not isinstance(message, Mapping):
            raise RowRejected(
                f"wrong_type: {where} is {_type_name(message)}, expected an object with role and content"
            )
        role = message.get("role")
        if not isinstance(role, str):
            raise RowRejected(f"wrong_type: {where}.role is {_type_name(role)}, expected string")
        role_name = role.strip().lower()
        if role_name not in ROLES:
            raise RowRejected(f"unknown_role: {where}.role is {role!r}, expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RowRejected(f"wrong_type: {where}.content is {_type_name(content)}, expected string")
        messages.append({"role": role_name, "content": normalize_text(content)})
    return messages


def _last_assistant_answer(messages: list[dict[str, str]]) -> str | None:
    for message in reversed(messages):
        if message["role"] == "assistant":
            answer = extract_boxed_answer(message["content"])
            if answer is not None:
                return answer
    return None


def to_conversation(
    row: Mapping[str, Any],
    *,
    source_dataset: str = DEFAULT_SOURCE_DATASET,
    prefer_reannotated: bool = False,
) -> dict[str, Any]:
    """One raw row (either config) as a conversation in CONVERSATION_SCHEMA; RowRejected if it can't be."""
    if not isinstance(row, Mapping):
        raise RowRejected(f"wrong_type: row is {_type_name(row)}, expected an object")
    schema_version = detect_schema_version(row)
    row_id = _row_id(row)
    if schema_version == "v0":
        problem = _require_string(row, "problem")
        answer = _require_string(row, "reannotated_assistant_content")
        messages = [
            {"role": "user", "content": normalize_text(problem)},
            {"role": "assistant", "content": normalize_text(answer)},
        ]
        solution = _optional_string(row, "solution")
        reference_answer = extract_boxed_answer(normalize_text(solution)) if solution else None
    else:
        columns = V1_MESSAGE_COLUMNS[::-1] if prefer_reannotated else V1_MESSAGE_COLUMNS
        column = next((name for name in columns if row.get(name) is not None), None)
        if column is None:
            raise RowRejected("missing_value: both messages and reannotated_messages are null or absent")
        messages = _canonical_messages(row[column], column)
        reference_answer = _last_assistant_answer(messages)
    source = _optional_string(row, "source") or UNKNOWN_SOURCE
    row_source_dataset = _optional_string(row, "source_dataset") or source_dataset
    origin = row.get("origin")
    return {
        "id": row_id,
        "messages": messages,
        "source": source,
        "source_dataset": row_source_dataset,
        "schema_version": schema_version,
        "reference_answer": reference_answer,
        "content_hash": content_hash(messages),
        "origin": origin if isinstance(origin, str) else "unknown",
    }


def always_null_columns(counts: StageCounts) -> list[str]:
    """Input columns that held only nulls in every row cleaned so far (dropped from the output)."""
    return sorted(
        key[len(NON_NULL_PREFIX) :]
        for key, value in counts.extra.items()
        if key.startswith(NON_NULL_PREFIX) and value == 0
    )


def clean_rows(
    rows: list[dict[str, Any]],
    *,
    seen_hashes: set[str],
    counts: StageCounts,
    source_dataset: str = DEFAULT_SOURCE_DATASET,
    prefer_reannotated: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Clean one batch: (conversations in CONVERSATION_SCHEMA, quarantine rows).

    ``seen_hashes`` persists across batches so duplicates are dropped stream-wide; ``counts`` gains
    rows_in/rows_out/quarantined/duplicates and per-column non-null tallies.
    """
    cleaned: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    non_null = counts.extra
    for row in rows:
        counts.rows_in += 1
        if isinstance(row, Mapping):
            for column, value in row.items():
                if column != "origin":
                    non_null[NON_NULL_PREFIX + column] += value is not None
        origin = row.get("origin") if isinstance(row, Mapping) else None
        origin = origin if isinstance(origin, str) else "unknown"
        try:
            conversation = to_conversation(
                row, source_dataset=source_dataset, prefer_reannotated=prefer_reannotated
            )
        except RowRejected as rejection:
            reason = str(rejection)
            counts.record_quarantine(reason)
            quarantine.append(quarantine_row(origin=origin, stage=STAGE, reason=reason, row=row))
            continue
        if conversation["content_hash"] in seen_hashes:
            counts.duplicates += 1
            continue
        seen_hashes.add(conversation["content_hash"])
        counts.rows_out += 1
        cleaned.append(conversation)
    return cleaned, quarantine
