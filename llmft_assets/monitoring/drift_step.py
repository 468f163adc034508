"""The drift report step: served traffic (the request log over a window) against what the model was trained
on (the train split), written as HTML + JSON + summary into a staging folder. No Dagster import.

The window and the reference are sampled deterministically (`max_rows_per_window`), so memory stays
bounded on a big train split or a busy day.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmft_assets.manifests import DriftManifest
from llmft_assets.storage import StorageBackend
from llmft_assets.storage.publish import content_version, describe_directory

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SUMMARY_JSON = "summary.json"


@dataclass(frozen=True)
class DriftSettings:
    window_days: float = 7.0
    end_time: str | None = None
    drift_share_threshold: float = 0.5
    min_rows: int = 50
    sample_size: int | None = 2_000
    model_version: str | None = None
    max_rows_per_window: int = 50_000
    text_method: str = "abs_text_content_drift"
    seed: int = 0


@dataclass
class DriftOutcome:
    result: Any  # monitoring.drift.DriftResult
    window: Any  # monitoring.request_logs.RequestLogWindow
    current_rows_logged: int
    splits_version: str
    manifest: DriftManifest


def parse_end_time(end_time: str | None) -> datetime | None:
    """An ISO-8601 time (UTC when it has no offset); ValueError naming the value otherwise."""
    if end_time is None:
        return None
    try:
        parsed = datetime.fromisoformat(end_time)
    except ValueError as error:
        raise ValueError(f"end_time {end_time!r} is not an ISO-8601 time") from error
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def build_drift_artifacts(
    backend: StorageBackend,
    train_split: Path,
    *,
    splits_version: str,
    settings: DriftSettings,
    staging: Path,
    version_prefix: Callable[[str], str],
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> DriftOutcome:
    """Compare, write the report into `staging`, and return it with the URIs it will be published under
    (`version_prefix(content version)` is where the IO manager publishes these bytes).

    Raises ValueError for bad settings (end time, thresholds, method): no retry can fix them."""
    from llmft_assets.monitoring.drift import build_drift_report
    from llmft_assets.monitoring.reference import reference_from_train_split, sample_table
    from llmft_assets.monitoring.request_logs import read_request_log_window

    window = read_request_log_window(
        backend,
        window_days=settings.window_days,
        end=parse_end_time(settings.end_time),
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
