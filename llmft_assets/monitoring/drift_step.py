"""The drift report step: served traffic (the request log over a window) against what the model was trained
on (the train split), written as HTML + JSON + summary into a staging folder. No Dagster import.

The window and the reference are sampled deterministically (`max_rows_per_window`), so memory stays
bounded on a big train split or a busy day.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from llmft_assets.manifests import DriftManifest
from llmft_assets.storage import StorageBackend
from llmft_assets.storage.publish import content_version, describe_directory

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SUMMARY_JSON = "summary.json"


def _described(default: Any, description: str) -> Any:
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class DriftSettings:
    """How served traffic is compared with the training data (the one home of these defaults; the Dagster
    config `DriftReportConfig` derives from it). The window's end is not a setting: it is the end of the
    report's day (its daily partition)."""

    window_days: float = _described(
        1.0,
        "days of request log compared, ending with the report's day: 1 is that day alone, 7 the week up to it",
    )
    drift_share_threshold: float = _described(
        0.5, "drift when at least this share of the compared columns drifted (Evidently's DataDriftPreset)"
    )
    min_rows: int = _described(50, "fewer rows in either window is a 'not enough data' report, not a verdict")
    sample_size: int | None = _described(
        2_000, "rows per window the text-drift columns are compared on (None: every row)"
    )
    model_version: str | None = _described(
        None, "only the traffic one adapter version answered (the request log's model_version); None: all"
    )
    max_rows_per_window: int = _described(
        50_000, "deterministic sample cap per window for the whole comparison (bounds memory on a big split)"
    )
    text_method: str = _described("abs_text_content_drift", "Evidently's text drift method")
    seed: int = _described(0, "sampling seed")


@dataclass
class DriftOutcome:
    result: Any  # monitoring.drift.DriftResult
    window: Any  # monitoring.request_logs.RequestLogWindow
    current_rows_logged: int
    splits_version: str
    manifest: DriftManifest


def day_window_end(day: str) -> datetime:
    """The end of a report's day `YYYY-MM-DD` (its daily partition): the next midnight, UTC."""
    try:
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as error:
        raise ValueError(f"report day {day!r} is not YYYY-MM-DD") from error
    return start + timedelta(days=1)


def build_drift_artifacts(
    backend: StorageBackend,
    train_split: Path,
    *,
    splits_version: str,
    settings: DriftSettings,
    end: datetime,
    staging: Path,
    version_prefix: Callable[[str], str],
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> DriftOutcome:
    """Compare the request log's [end - window_days, end) with the train split, write the report into
    `staging`, and return it with the URIs it will be published under (`version_prefix(content version)` is
    where the IO manager publishes these bytes). A window without traffic is a 'not enough data' report.

    Raises ValueError for bad settings (window, thresholds, method): no retry can fix them."""
    from llmft_assets.monitoring.drift import build_drift_report
    from llmft_assets.monitoring.reference import reference_from_train_split, sample_table
    from llmft_assets.monitoring.request_logs import read_request_log_window

    window = read_request_log_window(
        backend,
        window_days=settings.window_days,
        end=end,
        model_version=settings.model_version,
    )
    for key, reason in window.skipped_batches.items():
        warn(f"request log batch {key} left out: {reason}")
    current = sample_table(window.table, settings.max_rows_per_window, settings.seed + 1)
    reference = reference_from_train_split(
        train_split, max_rows=settings.max_rows_per_window, seed=settings.seed
    )
    log(
        f"comparing {reference.num_rows} training rows (dataset_splits {splits_version}) with "
        f"{current.num_rows} of {window.table.num_rows} requests logged in "
        f"[{window.start.isoformat()}, {window.end.isoformat()})"
    )
    result = build_drift_report(
        reference,
        current,
        drift_share_threshold=settings.drift_share_threshold,
        min_rows=settings.min_rows,
        text_method=settings.text_method,
        sample_size=settings.sample_size,
        sample_seed=settings.seed,
    )
    log(result.message)
    summary = {
        **result.to_summary(),
        "window": window.to_summary(),
        "current_rows_logged": window.table.num_rows,
        "dataset_splits_version": splits_version,
    }
    (staging / REPORT_HTML).write_text(result.html, encoding="utf-8")
    (staging / REPORT_JSON).write_text(json.dumps(result.json, indent=1, default=str), encoding="utf-8")
    (staging / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    # The IO manager publishes under the same content version, so the links are known before publishing.
    prefix = version_prefix(content_version(describe_directory(staging)))
    manifest = DriftManifest(
        summary=summary,
        report_html=backend.uri(f"{prefix}/{REPORT_HTML}"),
        report_json=backend.uri(f"{prefix}/{REPORT_JSON}"),
    )
    return DriftOutcome(
        result=result,
        window=window,
        current_rows_logged=window.table.num_rows,
        splits_version=splits_version,
        manifest=manifest,
    )
