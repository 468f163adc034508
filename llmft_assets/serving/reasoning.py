"""Split a reasoning model's `<think>...</think>` part from its answer, as vLLM and DeepSeek do.

The OpenAI-style response then carries the thinking as `message.reasoning_content` (streamed as
`delta.reasoning_content`) and only the answer as `content`. R1-style chat templates often end the
generation prompt with `<think>\\n`, so the model's output starts inside the reasoning: pass
`starts_in_reasoning=True` then. Text with no think tags is all content. Pure string handling.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (held back)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ReasoningSplitter:
    """Incremental splitter: feed text deltas, get (reasoning, content) deltas back."""

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._held = ""
        self.saw_reasoning = starts_in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = [], []
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._state == "start":
                stripped = buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self._state, self.saw_reasoning = "reasoning", True
                    buffer = stripped[len(THINK_OPEN) :]
                elif THINK_OPEN.startswith(stripped):  # only whitespace or a partial "<think"
                    self._held = buffer
                    buffer = ""
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = buffer.find(THINK_CLOSE)
                if end == -1:
                    keep = _partial_suffix(buffer, THINK_CLOSE)
                    reasoning.append(buffer[: len(buffer) - keep])
                    self._held = buffer[len(buffer) - keep :]
                    buffer = ""
                else:
                    reasoning.append(buffer[:end])
                    buffer = buffer[end + len(THINK_CLOSE) :]
                    self._state = "content"
            else:
                content.append(buffer)
                buffer = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of generation."""
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return held, ""
        return "", held


def split_reasoning(text: str, *, starts_in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning_content or None when there was none, content) of a whole response."""
    splitter = ReasoningSplitter(starts_in_reasoning=starts_in_reasoning)
    reasoning, content = splitter.feed(text)
    tail_reasoning, tail_content = splitter.finish()
    if not splitter.saw_reasoning:
        return None, content + tail_content
    return reasoning + tail_reasoning, content + tail_content


def prompt_opens_reasoning(prompt_text_tail: str) -> bool:
    """True when the rendered prompt ends inside an opened `<think>` (R1-style templates)."""
    tail = prompt_text_tail.rstrip()
    return tail.endswith(THINK_OPEN)
