"""Final-answer extraction and normalization for math-style answers (pure, shared with evaluation).

`extract_boxed_answer` finds the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, so
answers such as ``\\boxed{\\frac{1}{2}}`` come back whole. `normalize_answer` maps equivalent spellings
of the same answer (``\\dfrac`` vs ``\\frac``, ``0.50`` vs ``.5``, ``$x$`` vs ``x``) to one string so
that two answers can be compared with ``==``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _balanced_group(text: str, open_index: int) -> str | None:
    """Contents of the ``{...}`` group opening at ``open_index``; None when it never closes.

    Escaped braces (``\\{`` and ``\\}``) are literal characters in LaTeX and do not count.
    """
    depth = 0
    index = open_index
    length = len(text)
    while index < length:
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def _boxed_at(text: str, start: int, command: str) -> str | None:
    index = start + len(command)
    # `\boxedfoo` is another command, not a box.
    if index < len(text) and text[index].isalpha():
        return None
    while index < len(text) and text[index] in " \t":
        index += 1
    if index >= len(text):
        return None
    if text[index] == "{":
        return _balanced_group(text, index)
    if start + len(command) == index:
        return None
    # `\boxed 5` form: the argument runs to the next whitespace or math delimiter.
    match = re.match(r"[^\s$]+", text[index:])
    return match.group(0) if match else None


def extract_boxed_answer(text: str | None) -> str | None:
    """Content of the last well-formed ``\\boxed{}``/``\\fbox{}`` in ``text``, stripped; else None."""
    if not text:
        return None
    candidates: list[tuple[int, str]] = []
    for command in _BOX_COMMANDS:
        position = text.rfind(command)
        while position != -1:
            candidates.append((position, command))
            position = text.rfind(command, 0, position)
    for position, command in sorted(candidates, reverse=True):
        content = _boxed_at(text, position, command)
        if content is not None and content.strip():
            return content.strip()
    return None


_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_SPACING_COMMANDS = re.compile(r"\\[,;:! ]|\\q?quad|~")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_WHITESPACE = re.compile(r"\s+")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def _canonical_number(text: str) -> str | None:
    candidate = text.replace(",", "") if _THOUSANDS.match(text) else text
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", candidate):
        return None
    try:
        value = Decimal(candidate)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_answer(answer: str | None) -> str:
    """Canonical form of a final answer for exact-match comparison ('' for no answer)."""
    if answer is None:
        return ""
    text = answer.strip()
    # Unwrap math delimiters and a \boxed{} left around the answer.
    text = text.strip("$").strip()
    if text.startswith("\\(") and text.endswith("\\)"):
        text = text[2:-2]
    if text.startswith("\\[") and text.endswith("\\]"):
        text = text[2:-2]
    inner = extract_boxed_answer(text)
    if inner is not None and text.lstrip().startswith(_BOX_COMMANDS):
        text = inner
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = _SPACING_COMMANDS.sub("", text)
    text = _DEGREES.sub("", text)
    text = text.replace("\\%", "").replace("%", "")
    text = text.rstrip(".")
    text = _WHITESPACE.sub("", text)
    number = _canonical_number(text)
    if number is not None:
        return number
    # `x=5` and `5` are the same final answer when the left side is a single variable.
    match = re.fullmatch(r"[a-zA-Z]=(.+)", text)
    if match:
        return normalize_answer(match.group(1))
    return text.lower()
