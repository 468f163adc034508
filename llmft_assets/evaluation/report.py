"""The eval report: base model vs LoRA adapter (and optionally the current champion) on the test split.

For every model: perplexity on the assistant tokens, verified accuracy of the boxed answer (math-verify,
see ``answer_check``), format compliance, finish rate (stopped at the end token) and mean response length,
plus every row's verdicts (for the gate's paired test) and a few sample generations side by side. The report is written as JSON (the
machine-readable record the gate and the registry read) and a standalone HTML page (for people).
All models are scored on the same rows in one process: the base model is loaded once, evaluated, then
wrapped with the adapter(s), so the comparison is like for like.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmft_assets.data.schema import IGNORE_INDEX
from llmft_assets.evaluation import metrics
from llmft_assets.evaluation.answer_check import DEFAULT_TIMEOUT_S, AnswerChecker, Verdict

BASE = "base"
ADAPTER = "adapter"
CHAMPION = "champion"
REPORT_JSON = "eval_report.json"
REPORT_HTML = "eval_report.html"
_HEADLINE_METRICS = ("accuracy", "perplexity", "format_compliance", "finished_rate", "mean_response_tokens")
_DELTA_METRICS = ("accuracy", "perplexity", "format_compliance", "finished_rate")


@dataclass(frozen=True)
class ModelMetrics:
    """One model's scores; None where a score cannot be computed (e.g. no row has a reference answer)."""

    perplexity: float | None
    accuracy: float | None
    num_correct: int
    num_checkable: int
    format_compliance: float | None
    mean_response_tokens: float | None
    mean_response_chars: float | None
    finished_rate: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SampleComparison:
    """One test row's prompt, reference and every model's answer, for reading side by side."""

    id: str
    prompt: str
    reference_answer: str | None
    outputs: dict[str, str]
    correct: dict[str, bool | None]


@dataclass(frozen=True)
class RowOutcome:
    """One test row's verdict per model: answer correct (None: no reference), format ok, stopped at the end."""

    id: str
    correct: dict[str, bool | None]
    format_ok: dict[str, bool]
    finished: dict[str, bool]


@dataclass
class EvalReport:
    base_model: str
    adapter: str
    champion: str | None
    num_rows: int
    settings: dict[str, Any]
    models: dict[str, ModelMetrics]
    samples: list[SampleComparison]
    skipped: list[dict[str, str]] = field(default_factory=list)
    created_at: str = ""
    eval_seconds: float = 0.0
    rows: list[RowOutcome] = field(default_factory=list)
    gate: dict[str, Any] | None = None  # GateDecision.as_dict(); set before the report is written

    def metrics_for(self, model: str) -> dict[str, Any]:
        """One model's metrics as a plain dict (what :func:`llmft_assets.evaluation.gate.decide_gate` takes)."""
        return self.models[model].as_dict()

    def correct_by_row(self, model: str) -> dict[str, bool | None] | None:
        """{row id: verdict} of one model (the gate's paired test); None when the report has no rows."""
        if not self.rows or any(model not in row.correct for row in self.rows):
            return None
        return {row.id: row.correct[model] for row in self.rows}

    def headline(self) -> dict[str, float | int | None]:
        """Flat headline numbers for asset metadata and MLflow: ``adapter_accuracy``, ``accuracy_delta``..."""
        numbers: dict[str, float | int | None] = {"num_rows": self.num_rows, "num_skipped": len(self.skipped)}
        for model, scores in self.models.items():
            for metric in _HEADLINE_METRICS:
                numbers[f"{model}_{metric}"] = getattr(scores, metric)
        base, adapter = self.models[BASE], self.models[ADAPTER]
        for metric in _DELTA_METRICS:
            ours, theirs = getattr(adapter, metric), getattr(base, metric)
            numbers[f"{metric}_delta"] = None if ours is None or theirs is None else ours - theirs
        return numbers

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        data = json.loads(text)
        data["models"] = {name: ModelMetrics(**scores) for name, scores in data["models"].items()}
        data["samples"] = [SampleComparison(**sample) for sample in data["samples"]]
        data["rows"] = [RowOutcome(**row) for row in data.get("rows", [])]
        return cls(**data)

    def to_html(self) -> str:
        return render_html(self)

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write ``eval_report.json`` and ``eval_report.html`` into ``out_dir``; return both paths.

        The gate's decision is part of the record: a report without one is refused.
        """
        if not self.gate:
            raise ValueError("the report has no gate decision; set report.gate before writing it")
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
        json_path.write_text(self.to_json() + "\n", encoding="utf-8")
        html_path.write_text(self.to_html(), encoding="utf-8")
        return json_path, html_path


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def row_problem(row: Mapping[str, Any]) -> str | None:
    """Why a test row cannot be evaluated; None when it can."""
    messages = row.get("messages")
    if not isinstance(messages, list | tuple) or not messages:
        return "messages missing or empty"
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            return "a message is not a {role, content} mapping"
    roles = [message.get("role") for message in messages]
    prompt_roles = roles[:-1] if roles[-1] == "assistant" else roles
    if not prompt_roles or prompt_roles[-1] != "user":
        return "no user turn to answer"
    input_ids, labels = row.get("input_ids"), row.get("labels")
    if input_ids is None or labels is None or len(input_ids) != len(labels):
        return "input_ids/labels missing or of different lengths"
    if all(label == IGNORE_INDEX for label in list(labels)[1:]):
        return "no assistant tokens in labels"
    return None


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def _score(
    generations: Sequence[metrics.Generation], verdicts: Sequence[Verdict], perplexity: float
) -> ModelMetrics:
    accuracy = metrics.answer_accuracy(verdicts)
    lengths = metrics.response_length(generations)
    return ModelMetrics(
        perplexity=_finite_or_none(perplexity),
        accuracy=_finite_or_none(accuracy.accuracy),
        num_correct=accuracy.num_correct,
        num_checkable=accuracy.num_checkable,
        format_compliance=_finite_or_none(metrics.format_compliance(generations)),
        mean_response_tokens=_finite_or_none(lengths.mean_tokens),
        mean_response_chars=_finite_or_none(lengths.mean_chars),
        finished_rate=_finite_or_none(lengths.finished_rate),
    )


def _vllm_generations(
    requested: str | None,
    model_dir: Path,
    adapters: dict[str, Path],
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: Any,
    max_new_tokens: int,
    seed: int,
) -> tuple[str, dict[str, list[metrics.Generation]]]:
    """The selection hook: ("vllm", answers of every model) or ("transformers", {}) to generate in place."""
    from llmft_assets.evaluation import vllm_generate

    backend = vllm_generate.select_generation_backend(requested)
    if backend != "vllm" or (requested in (None, "auto") and not vllm_generate.vllm_can_serve(adapters)):
        return "transformers", {}
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from llmft_assets.evaluation import generate

    try:  # the same end tokens as the transformers path (tokenizer eos + the generation config's)
        model_stub = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(model_dir)))
    except OSError:
        model_stub = None
    answers = vllm_generate.generate_all_with_vllm(
        Path(model_dir),
        adapters,
        conversations,
        base_name=BASE,
        tokenizer=tokenizer,
        stop_ids=generate.end_token_ids(tokenizer, model_stub),
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    return "vllm", answers


def evaluate(
    model_dir: Path,
    adapter_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    perplexity_batch_size: int = 4,
    seed: int = 0,
    num_samples: int = 5,
    answer_timeout_s: float = DEFAULT_TIMEOUT_S,
    champion_adapter_dir: Path | None = None,
    base_model_name: str | None = None,
    adapter_name: str | None = None,
    champion_name: str | None = None,
    generation_backend: str | None = None,
) -> EvalReport:
    """Score the base model, the adapter (and the champion adapter, when given) on the test ``rows``.

    ``max_new_tokens`` defaults to the eval's generation budget (``generate.DEFAULT_MAX_NEW_TOKENS``);
    ``batch_size`` is how many rows are decoded together (continuous batching).
    ``rows`` are tokenized-schema rows: ``messages`` (the reference assistant turn last),
    ``reference_answer``, ``input_ids``, ``labels``. Rows that cannot be evaluated are listed in
    ``report.skipped`` with the reason; ValueError when none is left. Answers are checked with
    math-verify, each within ``answer_timeout_s`` (a slower one counts as wrong). ``report.gate`` is
    left for the caller to decide (:func:`llmft_assets.evaluation.gate.decide_gate_for_report`).
    ``generation_backend`` ("auto", "vllm", "transformers"; default LLMFT_EVAL_BACKEND or auto) picks
    where the answers are generated (see ``vllm_generate``); perplexity and scoring are the same code
    either way.
    """
    from llmft_assets.evaluation import generate

    started = time.monotonic()
    if max_new_tokens is None:
        max_new_tokens = generate.DEFAULT_MAX_NEW_TOKENS
    usable: list[Mapping[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem is None:
            usable.append(row)
        else:
            skipped.append({"id": str(row.get("id", f"#{index}")), "reason": problem})
    if not usable:
        raise ValueError(f"no evaluable test rows ({len(skipped)} skipped): {skipped[:3]}")

    conversations = [list(row["messages"]) for row in usable]
    references = [row.get("reference_answer") for row in usable]
    tokenizer = generate.load_tokenizer(Path(model_dir))
    pad_id = int(tokenizer.pad_token_id)

    adapters = {ADAPTER: Path(adapter_dir)}
    if champion_adapter_dir is not None:
        adapters[CHAMPION] = Path(champion_adapter_dir)
    backend, pregenerated = _vllm_generations(
        generation_backend, model_dir, adapters, conversations, tokenizer, max_new_tokens, seed
    )
    outputs: dict[str, list[metrics.Generation]] = {}
    verdicts: dict[str, list[Verdict]] = {}
    scores: dict[str, ModelMetrics] = {}
    with AnswerChecker(timeout_s=answer_timeout_s) as checker:

        def score_current(name: str, model: Any) -> None:
            outputs[name] = pregenerated.get(name) or generate.generate_continuous(
                model,
                Path(model_dir),
                conversations,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                seed=seed,
            )
            perplexity = generate.assistant_token_perplexity(
                model, usable, batch_size=perplexity_batch_size, pad_token_id=pad_id
            )
            verdicts[name] = checker.check_many([g.text for g in outputs[name]], references)
            scores[name] = _score(outputs[name], verdicts[name], perplexity)

        model = generate.load_base_model(Path(model_dir))
        # The base model is scored before any adapter is injected into it.
        score_current(BASE, model)
        model = generate.attach_adapter(model, Path(adapter_dir), adapter_name=ADAPTER)
        score_current(ADAPTER, model)
        if champion_adapter_dir is not None:
            model = generate.attach_adapter(model, Path(champion_adapter_dir), adapter_name=CHAMPION)
            score_current(CHAMPION, model)

    row_ids = [str(row.get("id", index)) for index, row in enumerate(usable)]
    row_outcomes = [
        RowOutcome(
            id=row_id,
            correct={name: verdicts[name][index].correct for name in outputs},
            format_ok={name: metrics.format_problem(outputs[name][index]) is None for name in outputs},
            finished={name: outputs[name][index].finished for name in outputs},
        )
        for index, row_id in enumerate(row_ids)
    ]

    samples = [
        SampleComparison(
            id=str(row.get("id", index)),
            prompt=_last_user_text(row["messages"]),
            reference_answer=row.get("reference_answer"),
            outputs={name: generations[index].text for name, generations in outputs.items()},
            correct={name: verdicts[name][index].correct for name in outputs},
        )
        for index, row in enumerate(usable[: max(0, num_samples)])
    ]
    return EvalReport(
        base_model=base_model_name or str(model_dir),
        adapter=adapter_name or str(adapter_dir),
        champion=(champion_name or str(champion_adapter_dir)) if champion_adapter_dir is not None else None,
        num_rows=len(usable),
        settings={
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "perplexity_batch_size": perplexity_batch_size,
            "seed": seed,
            "decoding": "greedy, continuous batching",
            "answer_check": "math-verify",
            "answer_timeout_s": answer_timeout_s,
            "generation_backend": backend,
        },
        models=scores,
        samples=samples,
        rows=row_outcomes,
        skipped=skipped,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        eval_seconds=round(time.monotonic() - started, 3),
    )


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------

_METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    # (field, label, format) ; percentages for rates
    ("accuracy", "Verified answer accuracy (last boxed answer, math-verify)", "pct"),
    ("num_correct", "Correct answers", "int"),
    ("num_checkable", "Rows with a reference answer", "int"),
    ("perplexity", "Perplexity on assistant tokens (lower is better)", "float"),
    ("format_compliance", "Format compliance (closed <think>, ended with end token)", "pct"),
    ("finished_rate", "Stopped at the end token", "pct"),
    ("mean_response_tokens", "Mean response length (tokens)", "float1"),
    ("mean_response_chars", "Mean response length (characters)", "float1"),
)

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem; color: #1d1d1f; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #d0d0d5; padding: 0.35rem 0.7rem; text-align: left; vertical-align: top; }
th { background: #f3f3f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta td:first-child { color: #555; }
.pass { color: #0a7a2f; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.sample { border: 1px solid #d0d0d5; border-radius: 6px; padding: 0.8rem; margin: 1rem 0; }
.outputs { display: grid; gap: 0.8rem; }
pre { white-space: pre-wrap; word-break: break-word; background: #f8f8fa; padding: 0.5rem;
      margin: 0.3rem 0; max-height: 24rem; overflow: auto; font-size: 0.85rem; }
"""


def _format(value: Any, style: str) -> str:
    if value is None:
        return "n/a"
    if style == "pct":
        return f"{100 * value:.1f}%"
    if style == "int":
        return str(int(value))
    if style == "float1":
        return f"{value:.1f}"
    return f"{value:.4g}"


def _verdict(correct: bool | None) -> str:
    if correct is None:
        return '<span class="meta">no reference</span>'
    return '<span class="pass">correct</span>' if correct else '<span class="fail">wrong</span>'


def _gate_html(gate: Mapping[str, Any]) -> list[str]:
    """The decision, then one table row per criterion: value, threshold, verdict and the reason."""
    esc = html.escape
    passed = bool(gate.get("passed"))
    verdict = '<span class="pass">PROMOTE</span>' if passed else '<span class="fail">REFUSE</span>'
    parts = [f"<h2>Gate: {verdict}</h2>"]
    if gate.get("champion"):
        parts.append(f"<p>Compared with the champion {esc(str(gate['champion']))}.</p>")
    criteria = gate.get("criteria") or []
    if criteria:
        parts.append(
            "<table><tr><th>Criterion</th><th>Value</th><th>Threshold</th><th>Verdict</th><th>Why</th></tr>"
        )
        for criterion in criteria:
            value = criterion.get("value")
            threshold = criterion.get("threshold")
            status = str(criterion.get("verdict"))
            css = {"pass": "pass", "fail": "fail"}.get(status, "meta")
            parts.append(
                f"<tr><td>{esc(str(criterion.get('name')))}</td>"
                f'<td class="num">{_format(value, "float")}</td>'
                f'<td class="num">{esc(str(criterion.get("comparator") or ""))} {_format(threshold, "float")}</td>'
                f'<td class="{css}">{esc(status)}</td><td>{esc(str(criterion.get("reason")))}</td></tr>'
            )
        parts.append("</table>")
    else:
        parts.append("<ul>" + "".join(f"<li>{esc(str(r))}</li>" for r in gate.get("reasons", [])) + "</ul>")
    return parts


def render_html(report: EvalReport) -> str:
    """A standalone HTML page (inline CSS, no scripts); every piece of model or data text is escaped."""
    esc = html.escape
    names = list(report.models)
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>llmft eval report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>llmft eval report</h1>",
        '<table class="meta">',
        f"<tr><td>Base model</td><td>{esc(report.base_model)}</td></tr>",
        f"<tr><td>Adapter</td><td>{esc(report.adapter)}</td></tr>",
    ]
    if report.champion is not None:
        parts.append(f"<tr><td>Champion</td><td>{esc(report.champion)}</td></tr>")
    settings_text = ", ".join(f"{key}={value}" for key, value in sorted(report.settings.items()))
    parts += [
        f"<tr><td>Test rows</td><td>{report.num_rows} evaluated, {len(report.skipped)} skipped</td></tr>",
        f"<tr><td>Settings</td><td>{esc(settings_text)}</td></tr>",
        f"<tr><td>Created</td><td>{esc(report.created_at)} ({report.eval_seconds:.1f} s)</td></tr>",
        "</table>",
    ]
    if report.gate is not None:
        parts += _gate_html(report.gate)

    parts.append("<h2>Metrics</h2><table><tr><th>Metric</th>")
    parts += [f"<th>{esc(name)}</th>" for name in names]
    parts.append("<th>adapter &minus; base</th></tr>")
    for field_name, label, style in _METRIC_ROWS:
        parts.append(f"<tr><td>{esc(label)}</td>")
        values = [getattr(report.models[name], field_name) for name in names]
        parts += [f'<td class="num">{_format(value, style)}</td>' for value in values]
        base_value = getattr(report.models[BASE], field_name)
        adapter_value = getattr(report.models[ADAPTER], field_name)
        delta = None if base_value is None or adapter_value is None else adapter_value - base_value
        sign = "+" if delta is not None and delta > 0 else ""
        parts.append(f'<td class="num">{sign}{_format(delta, style)}</td></tr>')
    parts.append("</table>")

    if report.samples:
        parts.append(f"<h2>Sample generations ({len(report.samples)})</h2>")
    for sample in report.samples:
        parts.append('<div class="sample">')
        parts.append(f"<div><b>Row</b> {esc(sample.id)}</div>")
        parts.append(f"<div><b>Prompt</b><pre>{esc(sample.prompt)}</pre></div>")
        parts.append(f"<div><b>Reference answer</b> <code>{esc(str(sample.reference_answer))}</code></div>")
        columns = max(1, len(sample.outputs))
        parts.append(f'<div class="outputs" style="grid-template-columns: repeat({columns}, 1fr)">')
        for name, text in sample.outputs.items():
            parts.append(
                f"<div><b>{esc(name)}</b> {_verdict(sample.correct.get(name))}<pre>{esc(text)}</pre></div>"
            )
        parts.append("</div></div>")

    if report.skipped:
        parts.append("<h2>Skipped rows</h2><table><tr><th>Row</th><th>Reason</th></tr>")
        parts += [
            f"<tr><td>{esc(item['id'])}</td><td>{esc(item['reason'])}</td></tr>"
            for item in report.skipped[:50]
        ]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
