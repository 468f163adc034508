"""Is a generated answer mathematically equal to the reference? (math-verify, with a real deadline)

The last ``\\boxed{}`` of a generation is its answer (``llmft_assets.data.answers.extract_boxed_answer``,
the same extraction the data pipeline used on the references). Both sides are parsed with Hugging Face's
math-verify (LaTeX via latex2sympy2-extended) and compared symbolically and numerically, so ``\\frac12``,
``0.5`` and ``50\\%`` agree, ``\\sqrt8`` equals ``2\\sqrt2``, ``\\{1,2\\}`` equals ``\\{2,1\\}``,
intervals keep their open/closed ends, and ``\\text{}`` wrappers and units are ignored. When math-verify
cannot turn one side into an expression (a word answer), the normalised strings are compared instead.

math-verify's own timeouts use ``signal.alarm``, which works only in the main thread (not in a Dagster
step thread or a server thread), and a signal handler cannot interrupt a long C-level computation
(``9^{9^{9^9}}`` spends minutes inside one big-integer power). So its timeouts are switched off and the
comparison runs in a worker process that :class:`AnswerChecker` kills when one answer takes longer than
``timeout_s``: the row then counts as wrong, with the reason, and a fresh worker takes the next one.
Requests and answers travel as JSON lines (nothing is unpickled).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

from llmft_assets.data.answers import extract_boxed_answer, normalize_answer

DEFAULT_TIMEOUT_S = 5.0
# The worker imports sympy and math-verify before it says it is ready; that start is not the answer's time.
WORKER_START_TIMEOUT_S = 120.0
_READY = "ready"


@dataclass(frozen=True)
class Verdict:
    """One row's answer check: ``correct`` is None when the row has no checkable reference."""

    correct: bool | None
    predicted: str | None  # the last boxed answer of the generation, None when there is none
    reason: str  # "equal", "not equal", "no boxed answer", "no reference answer", "timed out after 5 s"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# In-process comparison (what the worker runs; no deadline of its own)
# --------------------------------------------------------------------------------------------------


def _parse(answer: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # The answer alone, boxed, so that math-verify's boxed extraction takes the whole of it.
    return parse(
        f"\\boxed{{{answer}}}",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,  # type: ignore[arg-type]  # the caller's deadline bounds it (see module doc)
    )


def _is_expression(parsed: list[Any]) -> bool:
    return bool(parsed) and not isinstance(parsed[0], str)


def answers_equal(predicted: str, reference: str) -> bool:
    """math-verify's verdict on two bare answers (no ``\\boxed``), else normalised string equality.

    Unbounded in time: call it through :class:`AnswerChecker` wherever an answer comes from a model.
    """
    from math_verify import verify

    gold, target = _parse(reference), _parse(predicted)
    both_parsed = _is_expression(gold) and _is_expression(target)
    if both_parsed and verify(gold, target, timeout_seconds=None):  # type: ignore[arg-type]
        return True
    # Word answers ("Yes", "(B)") and anything math-verify cannot read: compare canonical strings.
    return bool(normalize_answer(reference)) and normalize_answer(predicted) == normalize_answer(reference)


def _serve(stdin: IO[str], stdout: IO[str]) -> None:
    """The worker loop: one JSON request ``[predicted, reference]`` per line, one JSON bool back."""
    import logging

    # The "timeout is disabled" warning is expected: the parent process enforces the deadline.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401  # import before saying ready, so the first answer is not slowed

    stdout.write(json.dumps(_READY) + "\n")
    stdout.flush()
    for line in stdin:
        predicted, reference = json.loads(line)
        try:
            result: bool | str = answers_equal(predicted, reference)
        except Exception as exc:  # a parser bug on one odd answer must not end the worker
            result = f"error: {type(exc).__name__}"
        stdout.write(json.dumps(result) + "\n")
        stdout.flush()


# --------------------------------------------------------------------------------------------------
# The checker: a worker process with a per-answer deadline
# --------------------------------------------------------------------------------------------------


class _Worker:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmft_assets.evaluation.answer_check"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=os.environ.copy(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        # A reader thread turns the blocking pipe into a queue that can be waited on with a timeout.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if self._next(WORKER_START_TIMEOUT_S) != _READY:
            self.stop()
            raise RuntimeError("the answer-check worker did not start (is math-verify installed?)")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _next(self, timeout_s: float) -> Any:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            raise RuntimeError("the answer-check worker exited")
        return json.loads(line)

    def ask(self, predicted: str, reference: str, timeout_s: float) -> bool | str:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps([predicted, reference]) + "\n")
        self.process.stdin.flush()
        return self._next(timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # our own child, by its handle
        self.process.wait(timeout=30)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class AnswerChecker:
    """Checks generated answers against references with a hard per-answer deadline (any thread).

    Use as a context manager (``with AnswerChecker() as checker: checker.check_many(...)``); the worker
    process starts on the first answer that needs it and stops on exit.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self._worker: _Worker | None = None
        self._lock = threading.Lock()  # one request in flight per worker
        self.timeouts = 0

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None

    def check(self, generated: str | None, reference: str | None) -> Verdict:
        """The verdict on one generation: its last boxed answer against ``reference``."""
        if reference is None or not normalize_answer(reference):
            return Verdict(
                correct=None, predicted=extract_boxed_answer(generated), reason="no reference answer"
            )
        predicted = extract_boxed_answer(generated)
        if predicted is None:
            return Verdict(correct=False, predicted=None, reason="no boxed answer")
        if normalize_answer(predicted) == normalize_answer(reference):
            # Identical after normalisation: equal without asking the parser (also the fast path).
            return Verdict(correct=True, predicted=predicted, reason="equal")
        with self._lock:
            if self._worker is None:
                self._worker = _Worker()
            started = time.monotonic()
            try:
                answer = self._worker.ask(predicted, reference, self.timeout_s)
            except TimeoutError:
                # The only way to stop a computation stuck in C: end the process, start a fresh one later.
                self._worker.stop()
                self._worker = None
                self.timeouts += 1
                waited = time.monotonic() - started
                return Verdict(correct=False, predicted=predicted, reason=f"timed out after {waited:.1f} s")
            except (RuntimeError, OSError) as exc:
                self._worker.stop()
                self._worker = None
                return Verdict(correct=False, predicted=predicted, reason=f"checker failed: {exc}")
        if isinstance(answer, str):
            return Verdict(correct=False, predicted=predicted, reason=f"checker {answer}")
        return Verdict(correct=answer, predicted=predicted, reason="equal" if answer else "not equal")

    def check_many(self, generated: Sequence[str | None], references: Sequence[str | None]) -> list[Verdict]:
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generations but {len(references)} references")
        return [self.check(text, reference) for text, reference in zip(generated, references, strict=True)]


def check_answers(
    generated: Sequence[str | None],
    references: Sequence[str | None],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Verdict]:
    """Verdicts for many generations with one worker process (started only if a row needs it)."""
    with AnswerChecker(timeout_s=timeout_s) as checker:
        return checker.check_many(generated, references)


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
