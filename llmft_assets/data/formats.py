"""Source formats: which known layout a raw row is in, and its turns as ``{role, content}``.

Detected per row (a file or folder may mix formats), in this order:

- ``r1_v0``: R1-Distill-SFT v0 (``problem`` + ``reannotated_assistant_content``, ``solution``);
- ``r1_v1``: R1-Distill-SFT v1 (``messages`` / ``reannotated_messages`` next to
  ``reannotated_assistant_content`` or ``reannotated_messages``);
- ``openai``: OpenAI chat fine-tuning lines, ``{"messages": [{role, content}, ...]}`` with roles
  system / developer (a system turn) / user / assistant; ``content`` may be a list of text parts;
- ``sharegpt``: ``conversations`` of ``{from, value}`` (``human``/``gpt``/``system``, or
  ``user``/``assistant``), or of ``{role, content}``; an optional top-level ``system`` string;
- ``alpaca``: ``instruction`` + optional ``input`` (one user turn) and ``output`` (the assistant turn),
  optional ``system`` and ``history`` (earlier ``[instruction, response]`` pairs);
- ``prompt_response``: ``prompt`` + ``response`` (or TRL's ``completion``), optional ``system``; TRL's
  conversational form (both lists of messages) too.

Anything else can be mapped onto these column names with `apply_column_mapping` (the ``columns`` setting
of ``raw_dataset``). Text is returned as found; `llmft_assets.data.cleaning` normalizes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llmft_assets.data.schema import ROLES, StageCounts

R1_V0 = "r1_v0"
R1_V1 = "r1_v1"
OPENAI = "openai"
SHAREGPT = "sharegpt"
ALPACA = "alpaca"
PROMPT_RESPONSE = "prompt_response"
# Formats of R1-Distill-SFT: reasoning traces with <think> and a \boxed{} answer are part of the contract.
R1_FORMATS: frozenset[str] = frozenset({R1_V0, R1_V1})
V1_MESSAGE_COLUMNS = ("messages", "reannotated_messages")

_CANONICAL_ROLES = {role: role for role in ROLES}
_OPENAI_ROLES = {**_CANONICAL_ROLES, "developer": "system"}
_SHAREGPT_ROLES = {**_CANONICAL_ROLES, "human": "user", "gpt": "assistant"}

# Column names a `columns` mapping may target (the user's column goes under this name).
MAPPABLE_COLUMNS: tuple[str, ...] = (
    "id",
    "system",
    "prompt",
    "response",
    "completion",
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "history",
    "source",
)


# StageCounts.extra key of the rows kept per format: "format.<name>".
FORMAT_COUNT_PREFIX = "format."


def format_counts(counts: StageCounts) -> dict[str, int]:
    """Rows kept per source format so far, e.g. ``{"openai": 10, "r1_v0": 3}``."""
    return {
        key[len(FORMAT_COUNT_PREFIX) :]: value
        for key, value in sorted(counts.extra.items())
        if key.startswith(FORMAT_COUNT_PREFIX)
    }


class RowRejected(Exception):
    """A row cannot become a conversation; the message is the quarantine reason."""


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Extracted:
    """What a format yields for one row: its turns (raw text), and a text holding the reference answer."""

    source_format: str
    messages: list[dict[str, str]]
    # v0 only: the `solution` column, whose \boxed{} is the reference answer.
    solution: str | None = None


@dataclass(frozen=True)
class SourceFormat:
    name: str
    columns: str  # what the format needs, as named in a quarantine reason
    matches: Callable[[Mapping[str, Any]], bool]
    extract: Callable[[Mapping[str, Any], bool], Extracted]


# ------------------------------------------------------------------------------------------- helpers


def _require_string(row: Mapping[str, Any], column: str) -> str:
    if column not in row:
        raise RowRejected(f"missing_column: {column}")
    value = row[column]
    if value is None:
        raise RowRejected(f"missing_value: {column} is null")
    if not isinstance(value, str):
        raise RowRejected(f"wrong_type: {column} is {type_name(value)}, expected string")
    return value


def optional_string(row: Mapping[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowRejected(f"wrong_type: {column} is {type_name(value)}, expected string or null")
    return value


def _content_text(content: Any, where: str, *, allow_parts: bool) -> str:
    if isinstance(content, str):
        return content
    # OpenAI's content parts: [{"type": "text", "text": "..."}]; other part types are not text.
    if allow_parts and isinstance(content, list | tuple) and content:
        texts = []
        for index, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RowRejected(
                    f"wrong_type: {where}.content[{index}] is not a text part ({{type: text, text: string}})"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RowRejected(f"wrong_type: {where}.content is {type_name(content)}, expected string")


def _turns(
    value: Any,
    column: str,
    *,
    roles: Mapping[str, str],
    role_key: str = "role",
    content_key: str = "content",
    allow_parts: bool = False,
) -> list[dict[str, str]]:
    if not isinstance(value, list | tuple):
        raise RowRejected(
            f"wrong_type: {column} is {type_name(value)}, expected a list of {{{role_key}, {content_key}}}"
        )
    if not value:
        raise RowRejected(f"empty_messages: {column} is an empty list")
    messages = []
    for index, message in enumerate(value):
        where = f"{column}[{index}]"
        if not isinstance(message, Mapping):
            raise RowRejected(
                f"wrong_type: {where} is {type_name(message)}, expected an object with {role_key} and {content_key}"
            )
        role = message.get(role_key)
        if not isinstance(role, str):
            raise RowRejected(f"wrong_type: {where}.{role_key} is {type_name(role)}, expected string")
        canonical = roles.get(role.strip().lower())
        if canonical is None:
            raise RowRejected(
                f"unknown_role: {where}.{role_key} is {role!r}, expected one of {', '.join(roles)}"
            )
        content = _content_text(message.get(content_key), f"{where}", allow_parts=allow_parts)
        messages.append({"role": canonical, "content": content})
    return messages


def _with_system(row: Mapping[str, Any], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Prepend the row's top-level ``system`` column (LLaMA-Factory's layout) when it is non-empty."""
    system = optional_string(row, "system")
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


# ------------------------------------------------------------------------------------------- formats


def _is_r1_v0(row: Mapping[str, Any]) -> bool:
    return "problem" in row


def _r1_v0(row: Mapping[str, Any], prefer_reannotated: bool) -> Extracted:
    messages = [
        {"role": "user", "content": _require_string(row, "problem")},
        {"role": "assistant", "content": _require_string(row, "reannotated_assistant_content")},
    ]
    return Extracted(R1_V0, messages, solution=optional_string(row, "solution"))


def _is_r1_v1(row: Mapping[str, Any]) -> bool:
    return "reannotated_messages" in row or ("messages" in row and "reannotated_assistant_content" in row)


def _r1_v1(row: Mapping[str, Any], prefer_reannotated: bool) -> Extracted:
    columns = V1_MESSAGE_COLUMNS[::-1] if prefer_reannotated else V1_MESSAGE_COLUMNS
    column = next((name for name in columns if row.get(name) is not None), None)
    if column is None:
        raise RowRejected("missing_value: both messages and reannotated_messages are null or absent")
    return Extracted(R1_V1, _turns(row[column], column, roles=_CANONICAL_ROLES))


def _is_openai(row: Mapping[str, Any]) -> bool:
    return "messages" in row


def _openai(row: Mapping[str, Any], prefer_reannotated: bool) -> Extracted:
    if row["messages"] is None:
        raise RowRejected("missing_value: messages is null")
    return Extracted(OPENAI, _turns(row["messages"], "messages", roles=_OPENAI_ROLES, allow_parts=True))


def _is_sharegpt(row: Mapping[str, Any]) -> bool:
    return "conversations" in row


def _sharegpt(row: Mapping[str, Any], prefer_reannotated: bool) -> Extracted:
    value = row["conversations"]
    if value is None:
        raise RowRejected("missing_value: conversations is null")
    first = value[0] if isinstance(value, list | tuple) and value else None
    # Either {from, value} (the original) or {role, content} (what several tools write).
    keys = ("role", "content") if isinstance(first, Mapping) and "role" in first else ("from", "value")
    messages = _turns(value, "conversations", roles=_SHAREGPT_ROLES, role_key=keys[0], content_key=keys[1])
    return Extracted(SHAREGPT, _with_system(row, messages))


def _is_alpaca(row: Mapping[str, Any]) -> bool:
    return "instruction" in row and "output" in row


def _alpaca(row: Mapping[str, Any], prefer_reannotated: bool) -> Extracted:
    instruction = _require_string(row, "instruction")
    extra_input = optional_string(row, "input")
    prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages: list[dict[str, str]] = []
    history = row.get("history")
    if history is not None:
        if not isinstance(history, list | tuple):
            raise RowRejected(
                f"wrong_type: history is {type_name(history)}, expected a list of [prompt, response]"
            )
        for index, pair in enumerate(history):
            if not (
                isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
            ):
                raise RowRejected(f"wrong_type: history[{index}] is not a [prompt, response] pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _require_string(row, "output")},
    ]
    return Extracted(ALPACA, _with_system(row, messages))


def _is_prompt_response(row: Mapping[str, Any]) -> bool:
    return "prompt" in row and ("response" in row or "completion" in row)


def _prompt_response(row: Mapping[str, Any], prefer_reannotated: bool) -> Extracted:
    column = "response" if "response" in row else "completion"
    prompt, answer = row["prompt"], row[column]
    if isinstance(prompt, list | tuple) and isinstance(answer, list | tuple):
        # TRL's conversational prompt-completion: two lists of messages, one after the other.
        messages = _turns(prompt, "prompt", roles=_OPENAI_ROLES, allow_parts=True)
        messages += _turns(answer, column, roles=_OPENAI_ROLES, allow_parts=True)
        return Extracted(PROMPT_RESPONSE, messages)
    messages = [
        {"role": "user", "content": _require_string(row, "prompt")},
        {"role": "assistant", "content": _require_string(row, column)},
    ]
    return Extracted(PROMPT_RESPONSE, _with_system(row, messages))


FORMATS: tuple[SourceFormat, ...] = (
    SourceFormat(R1_V0, "problem (+ reannotated_assistant_content)", _is_r1_v0, _r1_v0),
    SourceFormat(
        R1_V1, "messages + reannotated_assistant_content, or reannotated_messages", _is_r1_v1, _r1_v1
    ),
    SourceFormat(OPENAI, "messages", _is_openai, _openai),
    SourceFormat(SHAREGPT, "conversations", _is_sharegpt, _sharegpt),
    SourceFormat(ALPACA, "instruction + output", _is_alpaca, _alpaca),
    SourceFormat(PROMPT_RESPONSE, "prompt + response or completion", _is_prompt_response, _prompt_response),
)
FORMAT_NAMES: tuple[str, ...] = tuple(source_format.name for source_format in FORMATS)


def detect_format(row: Mapping[str, Any]) -> SourceFormat:
    """The first format whose columns the row has; RowRejected naming every format tried otherwise."""
    for source_format in FORMATS:
        if source_format.matches(row):
            return source_format
    tried = "; ".join(f"{source_format.name} ({source_format.columns})" for source_format in FORMATS)
    columns = sorted(str(key) for key in row if key != "origin")
    raise RowRejected(f"unknown_schema: no known format matches; tried {tried}; got columns {columns}")


def extract(row: Mapping[str, Any], *, prefer_reannotated: bool = False) -> Extracted:
    """The row's format and turns (roles canonical, text as found); RowRejected when it has none."""
    return detect_format(row).extract(row, prefer_reannotated)


# ---------------------------------------------------------------------------------- column mapping


def check_column_mapping(columns: Mapping[str, str] | None) -> None:
    """ValueError unless ``columns`` maps known target names (MAPPABLE_COLUMNS) to distinct column names."""
    if columns is None:
        return
    if not isinstance(columns, Mapping):
        raise ValueError(f"columns must be a mapping of target name -> your column, got {columns!r}")
    unknown = sorted(str(target) for target in columns if target not in MAPPABLE_COLUMNS)
    if unknown:
        raise ValueError(
            f"columns: unknown target(s) {unknown}; map onto {', '.join(MAPPABLE_COLUMNS)} "
            "(e.g. {prompt: question, response: answer})"
        )
    for target, column in columns.items():
        if not isinstance(column, str) or not column:
            raise ValueError(f"columns.{target} must be a non-empty column name, got {column!r}")
    sources = list(columns.values())
    if len(set(sources)) != len(sources):
        raise ValueError(f"columns: one column is mapped to two targets: {dict(columns)}")


def apply_column_mapping(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The row with each mapped column renamed to its target (which wins over a column of that name).

    A mapped column the row lacks is a RowRejected ``missing_column`` naming the mapping.
    """
    mapped = {key: value for key, value in row.items() if key not in columns.values()}
    for target, column in columns.items():
        if column not in row:
            raise RowRejected(f"missing_column: {column} (mapped to {target} by the columns config)")
        mapped[target] = row[column]
    return mapped
