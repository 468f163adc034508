"""Drift alerts to a Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat, ...).

The webhook URL is a secret (its path is the credential): it is never logged nor put in an
exception message. No Dagster import here.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

logger = logging.getLogger(__name__)

STATUS_EMOJI = {"drift": ":rotating_light:", "not_enough_data": ":warning:", "ok": ":white_check_mark:"}
STATUS_TITLE = {
    "drift": "Drift detected in served traffic",
    "not_enough_data": "Drift report: not enough data",
    "ok": "No drift in served traffic",
}
MAX_LISTED_COLUMNS = 20
# Slack rejects a section text over 3,000 characters.
MAX_SECTION_CHARS = 2_900


class WebhookError(RuntimeError):
    """The alert could not be delivered (permanent HTTP error, or retries exhausted)."""


class _TransientWebhookError(Exception):
    """A failure worth retrying: connection error, timeout, HTTP 5xx or 429."""


def build_drift_alert_payload(result_summary: dict[str, Any], *, report_uri: str | None) -> dict[str, Any]:
    """Slack `{"text", "blocks"}` message from `DriftResult.to_summary()`."""
    status = str(result_summary.get("status", "unknown"))
    title = STATUS_TITLE.get(status, f"Drift report: {status}")
    emoji = STATUS_EMOJI.get(status, ":grey_question:")
    drift_share = result_summary.get("drift_share")
    threshold = result_summary.get("drift_share_threshold")
    drifted_columns = [str(column) for column in result_summary.get("drifted_columns", [])]
    number_of_columns = result_summary.get("number_of_columns", 0)

    share_text = "n/a" if drift_share is None else f"{float(drift_share):.2f}"
    threshold_text = "n/a" if threshold is None else f"{float(threshold):.2f}"
    listed = ", ".join(f"`{column}`" for column in drifted_columns[:MAX_LISTED_COLUMNS])
    if len(drifted_columns) > MAX_LISTED_COLUMNS:
        listed += f" and {len(drifted_columns) - MAX_LISTED_COLUMNS} more"
    message = str(result_summary.get("message", ""))

    text = f"{emoji} {title}: drift share {share_text} (threshold {threshold_text})"
    if drifted_columns:
        text += f"; {len(drifted_columns)} of {number_of_columns} columns drifted"
    if report_uri:
        text += f". Report: {report_uri}"

    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"{title}"[:150], "emoji": True}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Status*\n{emoji} `{status}`"},
                {"type": "mrkdwn", "text": f"*Drift share*\n{share_text} (threshold {threshold_text})"},
                {
                    "type": "mrkdwn",
                    "text": f"*Reference rows*\n{result_summary.get('reference_rows', 'n/a')}",
                },
                {"type": "mrkdwn", "text": f"*Current rows*\n{result_summary.get('current_rows', 'n/a')}"},
            ],
        },
    ]
    if message:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": message[:MAX_SECTION_CHARS]}})
    if drifted_columns:
        blocks.append(
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"*Drifted columns ({len(drifted_columns)} of {number_of_columns})*\n{listed}"[
                        :MAX_SECTION_CHARS
                    ],
                },
            }
        )
    if report_uri:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"Report: {report_uri}"}]})
    return {"text": text, "blocks": blocks}


def send_drift_alert(
    webhook_url: str,
    result_summary: dict[str, Any],
    *,
    report_uri: str | None,
    timeout_s: float = 10,
    attempts: int = 3,
    backoff_s: float = 1.0,
) -> None:
    """POST the drift alert; retries connection errors, timeouts, 5xx and 429 with exponential backoff.

    Raises WebhookError on a permanent HTTP error (4xx) or once `attempts` are used up.
    """
    scheme = urllib.parse.urlsplit(webhook_url).scheme
    if scheme not in ("http", "https"):
        raise ValueError("webhook_url must be an http(s) URL")  # the URL itself is a secret: not echoed
    body = json.dumps(build_drift_alert_payload(result_summary, report_uri=report_uri)).encode("utf-8")

    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=backoff_s, max=30),
        retry=retry_if_exception_type(_TransientWebhookError),
        reraise=True,
        before_sleep=lambda state: logger.warning(
            "drift alert attempt %d failed (%s); retrying", state.attempt_number, state.outcome.exception()
        ),
    )
    try:
        for attempt in retrying:
            with attempt:
                _post_once(webhook_url, body, timeout_s=timeout_s)
    except _TransientWebhookError as error:
        raise WebhookError(f"drift alert not delivered after {attempts} attempts: {error}") from None
    logger.info("drift alert sent (status %s)", result_summary.get("status"))


def _post_once(webhook_url: str, body: bytes, *, timeout_s: float) -> None:
    request = urllib.request.Request(
        webhook_url, data=body, method="POST", headers={"Content-Type": "application/json; charset=utf-8"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as error:
        # Messages carry the status only: HTTPError.url / filename hold the secret URL.
        if error.code >= 500 or error.code == 429:
            raise _TransientWebhookError(f"HTTP {error.code}") from None
        raise WebhookError(f"drift alert rejected by the webhook: HTTP {error.code}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise _TransientWebhookError(f"connection failed: {type(reason).__name__}") from None


def send_alert_if_configured(summary: dict[str, Any], report_uri: str | None, log: Any) -> str:
    """Post the drift alert to $LLMFT_ALERT_WEBHOOK_URL; returns what happened (for metadata).

    Unset webhook: skipped with a log line. Delivery failure: logged as an error, never raised (the
    check's verdict is the record of the drift; a flaky chat server must not hide it).
    """
    from llmft_assets import settings

    secret = settings.get().alert_webhook_url
    webhook_url = secret.get_secret_value().strip() if secret is not None else ""
    if not webhook_url:
        log.info("drift alert not sent: LLMFT_ALERT_WEBHOOK_URL is not set")
        return "skipped (no webhook configured)"
    try:
        send_drift_alert(webhook_url, summary, report_uri=report_uri)
    except (WebhookError, ValueError) as error:  # messages never contain the (secret) URL
        log.error(f"drift alert not delivered: {error}")
        return f"failed: {error}"
    log.info("drift alert sent to the configured webhook")
    return "sent"
