"""Evidently drift report of served traffic (current) against the training prompts (reference).

The report compares the raw texts (prompt, and response where both windows have one) with
Evidently's text-drift method, plus the offline features of `descriptors.compute_text_features`
as numerical / categorical columns, all in one `DataDriftPreset` with its tests.
The caller (the Dagster asset) saves `DriftResult.html` / `.json` and emits `to_summary()` as
metadata; `status` drives the asset check and the alert. No Dagster import here.
"""

from __future__ import annotations

import html as html_lib
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmft_assets.monitoring.descriptors import (
    categorical_feature_columns,
    compute_text_features,
    numerical_feature_columns,
    to_text_array,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

DriftStatus = Literal["ok", "drift", "not_enough_data"]
PROMPT_COLUMN = "prompt"
RESPONSE_COLUMN = "response"
# Text drift trains a TF-IDF domain classifier per text column (three times per report: the
# preset's count, the per-column metric and the rendered table); beyond this many rows a window's
# texts are sampled. Feature columns always use every row.
DEFAULT_TEXT_SAMPLE_SIZE = 2_000
# The messages scikit-learn's TfidfVectorizer raises when a column's vocabulary is too uniform.
_LOW_DIVERSITY_ERRORS = ("no terms remain", "empty vocabulary")


@dataclass
class ColumnDrift:
    """Evidently's verdict on one column."""

    column: str
    kind: Literal["text", "numerical", "categorical"]
    method: str
    score: float | None
    threshold: float | None
    drifted: bool


@dataclass
class DriftResult:
    status: DriftStatus
    message: str
    drift_share: float | None
    drift_share_threshold: float
    drifted_columns: list[str]
    number_of_columns: int
    columns: dict[str, ColumnDrift]
    reference_rows: int
    current_rows: int
    min_rows: int
    text_method: str
    # Rows per window the text columns were compared on, when a window was sampled.
    text_sample_rows: dict[str, int] | None = None
    # Columns left out of the comparison, with the reason (e.g. low-diversity text).
    skipped_columns: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    html: str = field(default="", repr=False)
    json: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def drift_detected(self) -> bool:
        return self.status == "drift"

    def to_summary(self) -> dict[str, Any]:
        """JSON-able summary (no HTML / full report) for asset metadata, checks and alerts."""
        summary = asdict(self)
        del summary["html"], summary["json"]
        return summary


def build_drift_report(
    reference: Any,
    current: Any,
    *,
    drift_share_threshold: float = 0.5,
    min_rows: int = 50,
    text_method: str = "abs_text_content_drift",
    sample_size: int | None = DEFAULT_TEXT_SAMPLE_SIZE,
    sample_seed: int = 0,
) -> DriftResult:
    """Compare served traffic with the training prompts; never raises on too little data.

    `reference` / `current`: a pyarrow Table or pandas DataFrame with a `prompt` column and
    optionally `response` (the request-log schema, or the user / assistant turns of the training
    split), or just the prompt texts (list[str], pandas Series, pyarrow array).
    Responses are compared only when both windows carry them.
    `sample_size`: cap on rows per window for the text-drift columns (deterministic with
    `sample_seed`); None compares every text.
    """
    if not 0.0 < drift_share_threshold <= 1.0:
        raise ValueError(f"drift_share_threshold must be in (0, 1], got {drift_share_threshold}")
    if min_rows < 1:
        raise ValueError(f"min_rows must be at least 1, got {min_rows}")
    if sample_size is not None and sample_size < 2:
        raise ValueError(f"sample_size must be at least 2 or None, got {sample_size}")
    _check_text_method(text_method)

    reference_prompts, reference_responses = _prompts_and_responses(reference, "reference")
    current_prompts, current_responses = _prompts_and_responses(current, "current")
    reference_rows, current_rows = len(reference_prompts), len(current_prompts)

    if reference_rows < min_rows or current_rows < min_rows:
        message = (
            f"Not enough data for a drift report: reference has {reference_rows} rows and current has "
            f"{current_rows} rows; at least {min_rows} rows are needed in each window."
        )
        logger.info(message)
        return DriftResult(
            status="not_enough_data",
            message=message,
            drift_share=None,
            drift_share_threshold=drift_share_threshold,
            drifted_columns=[],
            number_of_columns=0,
            columns={},
            reference_rows=reference_rows,
            current_rows=current_rows,
            min_rows=min_rows,
            text_method=text_method,
            html=_not_enough_data_html(message),
            json={"status": "not_enough_data", "message": message, "metrics": [], "tests": []},
        )

    notes: list[str] = []
    compare_responses = reference_responses is not None and current_responses is not None
    if (reference_responses is None) != (current_responses is None):
        notes.append("responses are present in only one window: only prompts are compared")
    reference_frame = _feature_frame(
        reference_prompts, reference_responses if compare_responses else None, "reference", notes
    )
    current_frame = _feature_frame(
        current_prompts, current_responses if compare_responses else None, "current", notes
    )
    text_columns = [PROMPT_COLUMN, RESPONSE_COLUMN] if compare_responses else [PROMPT_COLUMN]

    text_sample_rows: dict[str, int] | None = None
    if sample_size is not None and max(reference_rows, current_rows) > sample_size:
        text_sample_rows = {
            "reference": _keep_text_sample(reference_frame, text_columns, sample_size, sample_seed),
            "current": _keep_text_sample(current_frame, text_columns, sample_size, sample_seed + 1),
        }
        notes.append(
            f"text columns compared on a deterministic sample (seed {sample_seed}) of "
            f"{text_sample_rows['reference']} reference and {text_sample_rows['current']} current rows; "
            "feature columns use every row"
        )

    skipped_columns: dict[str, str] = {}
    snapshot = _run_report_skipping_low_diversity_text(
        reference_frame,
        current_frame,
        text_columns,
        skipped_columns,
        drift_share_threshold=drift_share_threshold,
        text_method=text_method,
    )
    for column, reason in skipped_columns.items():
        notes.append(f"column {column!r} left out: {reason}")

    report_dict = json.loads(snapshot.json())
    columns = _column_verdicts(report_dict, text_columns, reference_frame)
    drift_share, share_test_failed = _share_of_drifted_columns(report_dict)
    drifted_columns = sorted(name for name, verdict in columns.items() if verdict.drifted)
    if drift_share is None:  # the preset always reports it; recompute rather than fail if it did not
        drift_share = len(drifted_columns) / len(columns) if columns else 0.0
    if share_test_failed is None:
        share_test_failed = drift_share >= drift_share_threshold
    status: DriftStatus = "drift" if share_test_failed else "ok"
    message = (
        f"{'Drift detected' if status == 'drift' else 'No drift'}: {len(drifted_columns)} of "
        f"{len(columns)} columns drifted (share {drift_share:.2f}, threshold {drift_share_threshold:.2f})"
        + (f": {', '.join(drifted_columns)}" if drifted_columns else "")
    )
    return DriftResult(
        status=status,
        message=message,
        drift_share=float(drift_share),
        drift_share_threshold=drift_share_threshold,
        drifted_columns=drifted_columns,
        number_of_columns=len(columns),
        columns=columns,
        reference_rows=reference_rows,
        current_rows=current_rows,
        min_rows=min_rows,
        text_method=text_method,
        text_sample_rows=text_sample_rows,
        skipped_columns=skipped_columns,
        notes=notes,
        html=snapshot.get_html_str(as_iframe=False),
        json=report_dict,
    )


def reference_from_conversations(conversations: pa.Table) -> pa.Table:
    """`prompt` / `response` columns from Conversation rows (e.g. the train split) to use as reference.

    prompt = the last user turn, response = the last assistant turn (null where a row has none), the
    same meaning as the request log's `prompt` (the last user message) and `response`.
    """
    if "messages" not in conversations.column_names:
        raise ValueError(f"no 'messages' column (columns: {conversations.column_names})")
    messages = conversations.column("messages").combine_chunks()  # parent indices are per array
    turns = pc.list_flatten(messages)
    parent_rows = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False)
    roles = pc.struct_field(turns, "role")
    contents = pc.struct_field(turns, "content")

    def last_turn(role: str) -> pa.Array:
        turn_indices = np.flatnonzero(
            pc.fill_null(pc.equal(roles, role), False).to_numpy(zero_copy_only=False)
        )
        last = np.full(len(messages), -1, dtype=np.int64)
        np.maximum.at(last, parent_rows[turn_indices], turn_indices)
        return contents.take(pa.array(last, mask=last < 0))

    return pa.table({PROMPT_COLUMN: last_turn("user"), RESPONSE_COLUMN: last_turn("assistant")})


def _check_text_method(text_method: str) -> None:
    from evidently.legacy.calculations.stattests.registry import (
        StatTestNotFoundError,
        get_registered_stattest,
    )
    from evidently.legacy.core import ColumnType

    try:
        get_registered_stattest(text_method, ColumnType.Text)
    except (StatTestNotFoundError, ValueError) as error:
        raise ValueError(
            f"text_method {text_method!r} is not an Evidently text drift method "
            "(e.g. 'abs_text_content_drift', 'perc_text_content_drift')"
        ) from error


def _prompts_and_responses(data: Any, window: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray | None]:
    """Prompt texts and, where the window has them, response texts."""
    columns: dict[str, Any] | None = None
    if isinstance(data, pa.Table):
        columns = {name: data.column(name) for name in data.column_names}
    elif hasattr(data, "columns") and hasattr(data, "iloc"):  # a pandas DataFrame
        columns = {str(name): data[name] for name in data.columns}
    if columns is None:
        return to_text_array(data, name=f"{window} prompts"), None
    if PROMPT_COLUMN not in columns:
        raise ValueError(f"{window}: no {PROMPT_COLUMN!r} column (columns: {sorted(columns)})")
    prompts = to_text_array(columns[PROMPT_COLUMN], name=f"{window}.{PROMPT_COLUMN}")
    if RESPONSE_COLUMN not in columns:
        return prompts, None
    responses = to_text_array(columns[RESPONSE_COLUMN], name=f"{window}.{RESPONSE_COLUMN}")
    if responses.null_count == len(responses):  # a column of nulls carries nothing to compare
        return prompts, None
    return prompts, responses


def _feature_frame(
    prompts: pa.ChunkedArray, responses: pa.ChunkedArray | None, window: str, notes: list[str]
) -> pd.DataFrame:
    """Text columns (nulls as empty strings, counted in the notes) beside their features."""
    features = compute_text_features(prompts, responses)
    texts = {PROMPT_COLUMN: prompts} | ({RESPONSE_COLUMN: responses} if responses is not None else {})
    for column, values in texts.items():
        if values.null_count:
            notes.append(f"{window}: {values.null_count} null {column}s compared as empty text")
        features.insert(len(features.columns), column, pc.fill_null(values, "").to_pandas())
    return features


def _keep_text_sample(frame: pd.DataFrame, text_columns: list[str], sample_size: int, seed: int) -> int:
    """Blank (NaN) the text of rows outside a deterministic sample; Evidently drops NaN per column."""
    if len(frame) <= sample_size:
        return len(frame)
    keep = np.zeros(len(frame), dtype=bool)
    keep[np.random.default_rng(seed).choice(len(frame), size=sample_size, replace=False)] = True
    for column in text_columns:
        frame[column] = frame[column].where(keep, None)
    return sample_size


def _run_report_skipping_low_diversity_text(
    reference_frame: pd.DataFrame,
    current_frame: pd.DataFrame,
    text_columns: list[str],
    skipped_columns: dict[str, str],
    *,
    drift_share_threshold: float,
    text_method: str,
) -> Any:
    """Run the report; a text column too uniform for TF-IDF is dropped and noted, not fatal."""
    try:
        return _run_report(
            reference_frame,
            current_frame,
            text_columns,
            drift_share_threshold=drift_share_threshold,
            text_method=text_method,
        )
    except ValueError as error:
        if not any(marker in str(error) for marker in _LOW_DIVERSITY_ERRORS):
            raise
        logger.warning("text drift failed (%s); finding the low-diversity text column(s)", error)
    for column in text_columns:
        failure = _text_drift_failure(reference_frame[column], current_frame[column], text_method)
        if failure is not None:
            skipped_columns[column] = f"text drift not computable (low diversity): {failure}"
    remaining_text_columns = [column for column in text_columns if column not in skipped_columns]
    if len(remaining_text_columns) == len(text_columns):
        raise RuntimeError("text drift failed on low-diversity text but no single column reproduces it")
    return _run_report(
        reference_frame.drop(columns=list(skipped_columns)),
        current_frame.drop(columns=list(skipped_columns)),
        remaining_text_columns,
        drift_share_threshold=drift_share_threshold,
        text_method=text_method,
    )


def _text_drift_failure(reference_texts: pd.Series, current_texts: pd.Series, text_method: str) -> str | None:
    """The low-diversity error text drift raises on this column (same data as the report), or None."""
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    reference_texts, current_texts = reference_texts.dropna(), current_texts.dropna()
    stat_test = get_stattest(reference_texts, current_texts, ColumnType.Text, text_method)
    try:
        stat_test(reference_texts, current_texts, ColumnType.Text, None)
    except ValueError as error:
        if any(marker in str(error) for marker in _LOW_DIVERSITY_ERRORS):
            return str(error)
        raise
    return None


def _run_report(
    reference_frame: pd.DataFrame,
    current_frame: pd.DataFrame,
    text_columns: list[str],
    *,
    drift_share_threshold: float,
    text_method: str,
) -> Any:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset
    from sklearn.exceptions import ConvergenceWarning

    feature_frame = reference_frame.drop(columns=text_columns)
    data_definition = DataDefinition(
        text_columns=text_columns,
        numerical_columns=numerical_feature_columns(feature_frame),
        categorical_columns=categorical_feature_columns(feature_frame),
    )
    report = Report(
        [DataDriftPreset(drift_share=drift_share_threshold, text_method=text_method, include_tests=True)],
        include_tests=True,
    )
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # Constant feature columns (e.g. every response has a think block) make Evidently's
        # correlation table divide by a zero std: expected, and harmless for the drift verdicts.
        warnings.simplefilter("ignore", RuntimeWarning)
        # Evidently's text domain classifier caps SGD at 50 iterations by design.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return report.run(
            current_data=Dataset.from_pandas(current_frame, data_definition=data_definition),
            reference_data=Dataset.from_pandas(reference_frame, data_definition=data_definition),
        )


def _column_verdicts(
    report_dict: dict[str, Any], text_columns: list[str], reference_frame: pd.DataFrame
) -> dict[str, ColumnDrift]:
    """Per-column score, method and threshold from the ValueDrift metrics, verdict from their tests."""
    categorical = set(
        categorical_feature_columns(reference_frame.drop(columns=text_columns, errors="ignore"))
    )
    test_failed_by_metric = {
        test["metric_config"]["metric_id"]: test["status"] == "FAIL"
        for test in report_dict.get("tests", [])
        if test.get("id") == "drift"
    }
    verdicts: dict[str, ColumnDrift] = {}
    for metric in report_dict.get("metrics", []):
        config = metric.get("config", {})
        if not str(config.get("type", "")).endswith(":ValueDrift"):
            continue
        column = config["column"]
        kind = "text" if column in text_columns else "categorical" if column in categorical else "numerical"
        score = metric.get("value")
        verdicts[column] = ColumnDrift(
            column=column,
            kind=kind,
            method=str(config.get("method")),
            score=None if score is None or not np.isfinite(score) else float(score),
            threshold=config.get("threshold"),
            drifted=bool(test_failed_by_metric.get(metric["id"], False)),
        )
    return verdicts


def _share_of_drifted_columns(report_dict: dict[str, Any]) -> tuple[float | None, bool | None]:
    """(share of drifted columns, whether the preset's share test failed) from DriftedColumnsCount."""
    share: float | None = None
    count_metric_id: str | None = None
    for metric in report_dict.get("metrics", []):
        if str(metric.get("config", {}).get("type", "")).endswith(":DriftedColumnsCount"):
            share = float(metric["value"]["share"])
            count_metric_id = metric["id"]
    for test in report_dict.get("tests", []):
        if count_metric_id is not None and test["metric_config"]["metric_id"] == count_metric_id:
            return share, test["status"] == "FAIL"
    return share, None


def _not_enough_data_html(message: str) -> str:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Drift report: not enough data</title>"
        "</head><body><h1>Drift report: not enough data</h1>"
        f"<p>{html_lib.escape(message)}</p></body></html>\n"
    )
