"""Drift alert webhook: Slack payload, retries on 5xx, no secret in errors or logs."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmft_assets.monitoring.alerts import WebhookError, build_drift_alert_payload, send_drift_alert

SECRET_PATH = "/services/T000/B000/s3cr3t-token"
SUMMARY: dict[str, Any] = {
    "status": "drift",
    "message": "Drift detected: 3 of 18 columns drifted",
    "drift_share": 0.6667,
    "drift_share_threshold": 0.5,
    "drifted_columns": ["prompt", "prompt_words", "response_is_refusal"],
    "number_of_columns": 18,
    "reference_rows": 10_000,
    "current_rows": 2_345,
}


@dataclass
class FakeWebhook:
    """Answers the scripted status codes in order (then 200) and records every request body."""

    url: str
    statuses: list[int] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@pytest.fixture
def webhook() -> Iterator[FakeWebhook]:
    state = FakeWebhook(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            state.bodies.append(json.loads(self.rfile.read(length)))
            state.paths.append(self.path)
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if status == 200 else b"error")

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}{SECRET_PATH}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_payload_is_slack_compatible() -> None:
    payload = build_drift_alert_payload(SUMMARY, report_uri="s3://bucket/assets/drift_report/v1/report.html")
    assert "Drift detected" in payload["text"]
    assert "0.67" in payload["text"] and "3 of 18" in payload["text"]
    assert "s3://bucket/assets/drift_report/v1/report.html" in payload["text"]
    block_types = [block["type"] for block in payload["blocks"]]
    assert block_types[0] == "header" and "context" in block_types
    rendered = json.dumps(payload["blocks"])
    assert "`prompt_words`" in rendered and "2345" in rendered

    not_enough = build_drift_alert_payload(
        {"status": "not_enough_data", "drift_share": None, "drifted_columns": []}, report_uri=None
    )
    assert "not enough data" in not_enough["text"] and "n/a" in not_enough["text"]


def test_alert_is_posted(webhook: FakeWebhook) -> None:
    send_drift_alert(webhook.url, SUMMARY, report_uri="file:///tmp/report.html", timeout_s=5)
    assert webhook.paths == [SECRET_PATH]
    assert webhook.bodies[0] == build_drift_alert_payload(SUMMARY, report_uri="file:///tmp/report.html")


def test_server_error_is_retried_then_delivered(
    webhook: FakeWebhook, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.statuses = [500]
    with caplog.at_level(logging.DEBUG):
        send_drift_alert(webhook.url, SUMMARY, report_uri=None, timeout_s=5, backoff_s=0.01)
    assert len(webhook.bodies) == 2
    assert webhook.bodies[0] == webhook.bodies[1]
    assert "retrying" in caplog.text
    assert "s3cr3t" not in caplog.text


def test_persistent_server_error_gives_up_after_three_attempts(webhook: FakeWebhook) -> None:
    webhook.statuses = [503, 502, 500, 500]
    with pytest.raises(WebhookError, match="after 3 attempts") as raised:
        send_drift_alert(webhook.url, SUMMARY, report_uri=None, timeout_s=5, backoff_s=0.01)
    assert len(webhook.bodies) == 3
    assert "s3cr3t" not in str(raised.value)


def test_client_error_is_not_retried(webhook: FakeWebhook) -> None:
    webhook.statuses = [404]
    with pytest.raises(WebhookError, match="HTTP 404") as raised:
        send_drift_alert(webhook.url, SUMMARY, report_uri=None, timeout_s=5, backoff_s=0.01)
    assert len(webhook.bodies) == 1
    assert "s3cr3t" not in str(raised.value)


def test_connection_refused_is_retried_without_leaking_the_url(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with caplog.at_level(logging.DEBUG), pytest.raises(WebhookError, match="connection failed") as raised:
        send_drift_alert(
            f"http://127.0.0.1:{closed_port}{SECRET_PATH}",
            SUMMARY,
            report_uri=None,
            timeout_s=2,
            backoff_s=0.01,
        )
    assert "s3cr3t" not in str(raised.value) and "s3cr3t" not in caplog.text
    assert caplog.text.count("retrying") == 2


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="http") as raised:
        send_drift_alert("file:///etc/s3cr3t", SUMMARY, report_uri=None)
    assert "s3cr3t" not in str(raised.value)
