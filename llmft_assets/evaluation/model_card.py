"""The model card: ``README.md`` of an adapter folder, a packaged model and a bento (pure).

Hugging Face model-card layout: YAML front matter (licence, base model, dataset, tags) and Markdown
sections for the base model, the data and its licence, the training config, the eval table (base ->
adapter for every metric) and the promotion gate's decision with each criterion. Built only from plain
values (a bill of materials, the eval report's metrics and gate), so it carries no path of the build
machine: ids that look like local paths are reduced to ``local:<folder name>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llmft_assets.training.bom import portable_model_id

MODEL_CARD_FILE = "README.md"
# (metric key in ModelMetrics, label, style)
_EVAL_ROWS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "Verified accuracy (math-verify)", "pct"),
    ("format_compliance", "Format compliance", "pct"),
    ("finished_rate", "Stopped at the end token", "pct"),
    ("perplexity", "Perplexity (assistant tokens)", "float"),
    ("mean_response_tokens", "Mean response length (tokens)", "float"),
)


def _cell(value: Any, style: str) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "n/a"
    return f"{100 * value:.1f}%" if style == "pct" else f"{value:.4g}"


def _escape(text: Any) -> str:
    """Markdown table cells: no pipes or line breaks from data."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _yaml_scalar(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quoted and escaped


def render_model_card(
    *,
    title: str,
    base_model_id: str,
    base_model_license: str,
    dataset: Mapping[str, Any],
    training_config: Mapping[str, Any],
    method: str = "lora",
    version: str | None = None,
    eval_metrics: Mapping[str, Mapping[str, Any]] | None = None,
    gate: Mapping[str, Any] | None = None,
    base_model_license_source: str | None = None,
    library_name: str = "peft",
) -> str:
    """The card as Markdown.

    ``dataset``: ``source``, ``config``, ``asset``, ``version``, ``license``, ``license_source`` (a BOM's
    ``dataset``; ``asset``: the dataset asset the version belongs to, e.g. sharded_dataset_splits). ``eval_metrics``: {model name: ModelMetrics dict} (``base``, ``adapter``, maybe
    ``champion``); ``gate``: ``GateDecision.as_dict()``. Without them the card says the model has not
    been evaluated yet.
    """
    base_id = portable_model_id(base_model_id)
    source = portable_model_id(str(dataset.get("source") or "unknown"))
    dataset_license = str(dataset.get("license") or "unknown")
    lines = [
        "---",
        f"license: {_yaml_scalar(dataset_license)}",
        f"base_model: {_yaml_scalar(base_id)}",
        f"datasets: [{_yaml_scalar(source)}]",
        f"library_name: {library_name}",  # "transformers" for a merged model
        "tags: [llmft, lora, " + ("qlora, " if method == "qlora" else "") + "text-generation]",
        "---",
        "",
        f"# {title}",
        "",
        f"A {method.upper()} fine-tune of `{base_id}` made with llmft"
        + (f" (version `{version}`)." if version else "."),
        "",
        "## Base model",
        "",
        f"- id: `{base_id}`",
        f"- licence: {base_model_license}"
        + (f" (from {base_model_license_source})" if base_model_license_source else ""),
        "",
        "## Training data",
        "",
        f"- dataset: `{source}`" + (f", config `{dataset['config']}`" if dataset.get("config") else ""),
        *([f"- asset: `{dataset['asset']}`"] if dataset.get("asset") else []),
        f"- version (content hash of the splits): `{dataset.get('version', 'unknown')}`",
        f"- licence: {dataset_license} (from {dataset.get('license_source') or 'not recorded'})",
        "",
        "The model is subject to the licences of its base model and of its training data.",
        "",
        "## Training config",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    lines += [
        f"| {_escape(key)} | {_escape(json.dumps(value))} |" for key, value in sorted(training_config.items())
    ]
    lines += ["", "## Evaluation", ""]
    if not eval_metrics:
        lines.append(
            "Not evaluated yet: the eval report and the gate's decision come with the packaged model."
        )
    else:
        names = list(eval_metrics)
        lines.append("| metric | " + " | ".join(_escape(name) for name in names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for key, label, style in _EVAL_ROWS:
            cells = [_cell(eval_metrics[name].get(key), style) for name in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if gate:
        decision = "promoted" if gate.get("passed") else "refused"
        lines += ["", "## Promotion gate", "", f"Decision: **{decision}**"]
        if gate.get("champion"):
            lines[-1] += f" (compared with {gate['champion']})"
        lines += ["", "| criterion | value | threshold | verdict |", "|---|---|---|---|"]
        for criterion in gate.get("criteria", []):
            value = criterion.get("value")
            threshold = criterion.get("threshold")
            shown_value = f"{value:.4g}" if isinstance(value, int | float) else "n/a"
            shown_threshold = (
                f"{criterion.get('comparator', '')} {threshold:.4g}"
                if isinstance(threshold, int | float)
                else "-"
            )
            lines.append(
                f"| {_escape(criterion.get('name'))} | {shown_value} | {_escape(shown_threshold)} | "
                f"{_escape(criterion.get('verdict'))} |"
            )
    return "\n".join(lines) + "\n"


def model_card_from_bom(
    bom: Mapping[str, Any],
    *,
    title: str,
    version: str | None = None,
    eval_metrics: Mapping[str, Mapping[str, Any]] | None = None,
    gate: Mapping[str, Any] | None = None,
    library_name: str = "peft",
) -> str:
    """:func:`render_model_card` from an adapter's bill of materials (plus its eval and gate, if any)."""
    base = bom.get("base_model") or {}
    return render_model_card(
        title=title,
        base_model_id=str(base.get("model_id") or base.get("id") or "unknown"),
        base_model_license=str(base.get("license") or "unknown"),
        base_model_license_source=base.get("license_source"),
        dataset=bom.get("dataset") or {},
        training_config=bom.get("training_config") or {},
        method=str(bom.get("method") or "lora"),
        version=version,
        eval_metrics=eval_metrics,
        gate=gate,
        library_name=library_name,
    )
