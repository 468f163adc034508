"""What a drift report's summary means for its check: pass, a WARN (too little data, unreadable), or an
ERROR (drift, which also alerts the webhook). No Dagster import: the check translates the verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["warn", "error"]


@dataclass(frozen=True)
class DriftVerdict:
    status: str
    passed: bool
    severity: Severity | None  # None: an ordinary pass
    description: str
    alert: bool  # post the drift alert


def drift_verdict(summary: dict[str, Any], report_version: str) -> DriftVerdict:
    status = str(summary.get("status", "missing"))
    message = str(summary.get("message", ""))
    if status == "not_enough_data":
        # Neither an error nor an alarm: too little data to judge.
        text = message if message.lower().startswith("not enough data") else f"Not enough data: {message}"
        return DriftVerdict(status, passed=True, severity="warn", description=text, alert=False)
    if status == "ok":
        return DriftVerdict(status, passed=True, severity=None, description=message, alert=False)
    if status != "drift":
        text = f"drift_report {report_version} has no readable summary (status {status!r})"
        return DriftVerdict(status, passed=False, severity="warn", description=text, alert=False)
    return DriftVerdict(status, passed=False, severity="error", description=message, alert=True)
