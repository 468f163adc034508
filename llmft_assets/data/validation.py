"""Validation: the rules a cleaned conversation must pass before it is tokenized.

Rules (all are checked; a rejected row's reason lists every rule it broke, the first one's code leads):

- ``role_order``: an optional system turn, then user/assistant alternating, ending with assistant;
- ``empty_turn``: no turn is empty or whitespace only;
- ``unbalanced_think``: every assistant ``<think>`` is closed by ``</think>`` (in order, no nesting);
  for R1-Distill-SFT rows every assistant turn, for other formats (``source_format``) the assistant
  turns that open with ``<think>`` (a chat answer may mention the tag in prose);
- ``too_short`` / ``too_long``: total characters of the conversation within the limits;
- ``too_many_turns``: at most ``limits.max_turns`` turns;
- ``missing_answer``: when the source has a reference answer, the final assistant turn holds a
  non-empty ``\\boxed{}`` (cleaning gives non-R1 formats a reference answer only from that turn, so
  ordinary chat data without one is never rejected by this rule);
- ``no_final_answer``: an assistant turn that reasons (``<think>...</think>``) says something after its
  last ``</think>``: a trace that is only reasoning would teach the model to stop before answering;
- ``duplicate_id``: an id already accepted earlier in the stream (``seen_ids``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmft_assets.data.answers import extract_boxed_answer
from llmft_assets.data.formats import FORMAT_COUNT_PREFIX, R1_FORMATS
from llmft_assets.data.key_set import SeenKeys, claim
from llmft_assets.data.schema import StageCounts, quarantine_row

STAGE = "validated"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ValidationLimits:
    """Limits of the validation rules. R1 answers run long: a conversation may hold 64k characters."""

    min_chars: int = 16
    max_chars: int = 65_536
    max_turns: int = 64
    require_answer: bool = True
    require_balanced_think: bool = True
    require_final_answer: bool = True

    def __post_init__(self) -> None:
        for name in ("min_chars", "max_chars", "max_turns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ValidationLimits.{name} must be an integer, got {value!r}")
        if self.min_chars < 0:
            raise ValueError(f"ValidationLimits.min_chars must be >= 0, got {self.min_chars}")
        if self.max_chars <= 0:
            raise ValueError(f"ValidationLimits.max_chars must be > 0, got {self.max_chars}")
        if self.max_chars < self.min_chars:
            raise ValueError(
                f"ValidationLimits.max_chars ({self.max_chars}) is below min_chars ({self.min_chars})"
            )
        if self.max_turns < 2:
            raise ValueError(
                f"ValidationLimits.max_turns must be >= 2 (a user and an assistant turn), got {self.max_turns}"
            )
        for name in ("require_answer", "require_balanced_think", "require_final_answer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ValidationLimits.{name} must be a bool, got {getattr(self, name)!r}")


def role_order_problem(roles: list[str]) -> str | None:
    """Why the sequence of roles is not [system] user assistant (user assistant)*; None when it is."""
    if not roles:
        return "role_order: conversation has no turns"
    for index, role in enumerate(roles[1:], start=1):
        if role == "system":
            return f"role_order: system turn at position {index}, only allowed first"
    body = roles[1:] if roles[0] == "system" else roles
    if not body:
        return "role_order: conversation has only a system turn"
    offset = len(roles) - len(body)
    for index, role in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            return f"role_order: turn {index + offset} is {role}, expected {expected}"
    if body[-1] != "assistant":
        return "role_order: conversation ends with a user turn, expected assistant last"
    return None


def think_balance_problem(text: str) -> str | None:
    """Why the <think> tags of one assistant turn are unbalanced; None when balanced."""
    depth = 0
    position = 0
    while True:
        open_at = text.find(THINK_OPEN, position)
        close_at = text.find(THINK_CLOSE, position)
        if open_at == -1 and close_at == -1:
            break
        if open_at != -1 and (close_at == -1 or open_at < close_at):
            if depth:
                return f"nested {THINK_OPEN} at character {open_at}"
            depth += 1
            position = open_at + len(THINK_OPEN)
        else:
            if not depth:
                return f"{THINK_CLOSE} without {THINK_OPEN} at character {close_at}"
            depth -= 1
            position = close_at + len(THINK_CLOSE)
    if depth:
        return f"{THINK_OPEN} never closed"
    return None


def final_answer_problem(text: str) -> str | None:
    """Why an assistant turn with reasoning has no final answer after it; None when it has one (or no
    reasoning at all)."""
    close_at = text.rfind(THINK_CLOSE)
    if close_at == -1:
        return None
    if not text[close_at + len(THINK_CLOSE) :].strip():
        return f"nothing after the last {THINK_CLOSE} (reasoning only)"
    return None


def conversation_problems(row: dict[str, Any], limits: ValidationLimits) -> list[str]:
    """Every rule the conversation breaks (duplicate ids aside), as 'code: detail' strings."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(message, Mapping)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
        for message in messages
    ):
        return ["wrong_type: messages is not a list of {role: string, content: string}"]
    problems: list[str] = []
    roles = [message["role"] for message in messages]
    order = role_order_problem(roles)
    if order:
        problems.append(order)
    if len(messages) > limits.max_turns:
        problems.append(f"too_many_turns: {len(messages)} turns, limit {limits.max_turns}")
    empty = [index for index, message in enumerate(messages) if not message["content"].strip()]
    if empty:
        problems.append(f"empty_turn: turn(s) {empty} are empty")
    total_chars = sum(len(message["content"]) for message in messages)
    if total_chars < limits.min_chars:
        problems.append(f"too_short: {total_chars} characters, minimum {limits.min_chars}")
    elif total_chars > limits.max_chars:
        problems.append(f"too_long: {total_chars} characters, maximum {limits.max_chars}")
    if limits.require_balanced_think:
        # R1 rows (or rows of unknown format) are reasoning traces: every assistant turn is checked. In
        # ordinary chat data "<think>" may just be mentioned; only a turn that opens with one is a trace.
        reasoning_format = row.get("source_format") in (None, *R1_FORMATS)
        for index, message in enumerate(messages):
            if message["role"] == "assistant" and (
                reasoning_format or message["content"].lstrip().startswith(THINK_OPEN)
            ):
                problem = think_balance_problem(message["content"])
                if problem:
                    problems.append(f"unbalanced_think: turn {index}: {problem}")
    if limits.require_final_answer:
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                problem = final_answer_problem(message["content"])
                if problem:
                    problems.append(f"no_final_answer: turn {index}: {problem}")
    if limits.require_answer and row.get("reference_answer") is not None:
        final = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if final is None or extract_boxed_answer(final["content"]) is None:
            problems.append(
                "missing_answer: source has a reference answer but the final assistant turn has no \\boxed{}"
            )
    return problems


def validate_rows(
    rows: list[dict[str, Any]],
    *,
    seen_ids: SeenKeys,
    limits: ValidationLimits | None = None,
    counts: StageCounts,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Validate one batch of conversations: (valid rows, quarantine rows with stage 'validated').

    ``seen_ids`` persists across batches; an id is claimed only by a row that passes every rule, so a
    broken row does not shadow a later good row with the same id.
    """
    limits = limits if limits is not None else ValidationLimits()
    valid: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    for row in rows:
        counts.rows_in += 1
        problems = conversation_problems(row, limits)
        row_id = row.get("id")
        # The id is claimed here, by a row that passes every rule.
        if not problems and not claim(seen_ids, row_id):
            problems.append(f"duplicate_id: id {row_id!r} was already accepted")
        if problems:
            reason = "; ".join(problems)
            counts.record_quarantine(reason)
            origin = row.get("origin")
            quarantine.append(
                quarantine_row(
                    origin=origin if isinstance(origin, str) else "unknown",
                    stage=STAGE,
                    reason=reason,
                    row=row,
                )
            )
            continue
        counts.rows_out += 1
        counts.extra[FORMAT_COUNT_PREFIX + str(row.get("source_format") or "unknown")] += 1
        valid.append(row)
    return valid, quarantine
