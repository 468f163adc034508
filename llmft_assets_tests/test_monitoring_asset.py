"""drift_report + drift_check materialized through Dagster on local storage: drift (with the webhook
alert), no drift, not enough data; and the request-log window reader they rely on."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmft_assets.definitions import build_resources
from llmft_assets.defs.monitoring.assets import drift_report
from llmft_assets.defs.monitoring.checks import drift_check
from llmft_assets.monitoring.request_logs import partition_days, read_request_log_window, window_bounds
from llmft_assets.serving.request_log import RequestLogRecord, records_to_parquet_bytes, request_log_key
from llmft_assets.storage import LocalBackend, StorageBackend, open_storage
from llmft_assets.storage.publish import publish_directory

# The upstream as the IO manager sees it: drift_report loads the published artifact, nothing is rebuilt.
DATASET_SPLITS = dg.SourceAsset("dataset_splits")
WINDOW_END = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
WINDOW_DAY = "2025-03-10"  # drift_report's partition of WINDOW_END: its window ends at 2025-03-11 00:00 UTC
MATH_TOPICS = ["integer", "triangle", "probability", "polynomial", "sequence", "circle", "prime", "matrix"]
MATH_WORDS = ["sum", "of", "the", "digits", "remainder", "divided", "by", "real", "numbers", "positive"]
OTHER_TOPICS = ["recipe", "itinerary", "contract", "symptom", "poem", "invoice", "playlist", "garden"]
OTHER_WORDS = ["please", "write", "friendly", "email", "summer", "family", "deadline", "manager", "coast"]
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])


# ------------------------------------------------------------------------------------ synthetic data


def synthetic_pairs(rows: int, *, shifted: bool, seed: int) -> list[tuple[str, str]]:
    """R1-like math prompts with <think> answers; `shifted`: longer off-topic prompts, short answers."""
    rng = np.random.default_rng(seed)
    topics, words = (OTHER_TOPICS, OTHER_WORDS) if shifted else (MATH_TOPICS, MATH_WORDS)
    pairs = []
    for _ in range(rows):
        length = int(rng.integers(20, 60) if shifted else rng.integers(5, 20))
        body = " ".join(rng.choice(topics + words, size=length))
        prompt = f"Find the {rng.choice(topics)} such that {body} equals {rng.integers(1, 99)}."
        steps = " ".join(rng.choice(words, size=int(rng.integers(10, 40))))
        response = (
            f"Sure! {steps.capitalize()}."
            if shifted
            else f"<think>\n{steps}\n</think>\n\nThe answer is $\\boxed{{{rng.integers(0, 100)}}}$."
        )
        pairs.append((prompt, response))
    return pairs


def publish_fake_splits(backend: StorageBackend, tmp_path: Path, rows: int = 200, seed: int = 1) -> str:
    """A dataset_splits artifact whose train.parquet holds conversations (only `messages` is read)."""
    folder = tmp_path / "fake_splits"
    folder.mkdir(parents=True, exist_ok=True)
    messages = [
        [
            {"role": "system", "content": "You are a careful math tutor."},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        for prompt, response in synthetic_pairs(rows, shifted=False, seed=seed)
    ]
    table = pa.table(
        {
            "id": pa.array([f"row-{index}" for index in range(rows)]),
            "messages": pa.array(messages, type=pa.list_(MESSAGE_TYPE)),
        }
    )
    # Several row groups, so the streamed, sampled reader is exercised.
    pq.write_table(table, folder / "train.parquet", row_group_size=64)
    for name in ("validation", "test"):
        pq.write_table(table.slice(0, 4), folder / f"{name}.parquet")
    return publish_directory(backend, "assets/dataset_splits", folder).version


def log_requests(
    backend: StorageBackend, pairs: list[tuple[str, str]], *, start: datetime, spacing: timedelta, batch: str
) -> None:
    """Write served traffic the way the model server does: one Parquet object per day and batch."""
    by_day: dict[str, list[RequestLogRecord]] = {}
    for index, (prompt, response) in enumerate(pairs):
        timestamp = start + index * spacing
        record = RequestLogRecord(
            request_id=f"{batch}-{index}",
            timestamp=timestamp,
            model="llmft",
            model_version="v-test",
            prompt=prompt,
            messages_json=json.dumps([{"role": "user", "content": prompt}]),
            response=response,
            prompt_tokens=len(prompt.split()),
            completion_tokens=len(response.split()),
            latency_ms=12.5,
            finish_reason="stop",
            stream=False,
        )
        by_day.setdefault(timestamp.strftime("%Y-%m-%d"), []).append(record)
    for day, records in by_day.items():
        backend.put_bytes(request_log_key(day, batch), records_to_parquet_bytes(records))


# ------------------------------------------------------------------------------------ webhook receiver


class WebhookReceiver:
    """A Slack-compatible incoming webhook on loopback that records what it is sent."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, "body": json.loads(body)})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/not-a-real-secret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        monkeypatch.setenv("LLMFT_ALERT_WEBHOOK_URL", receiver.url)
        yield receiver


@pytest.fixture
def storage(llmft_home: Path, tmp_path: Path) -> LocalBackend:
    backend = open_storage(str(llmft_home / "storage"))
    assert isinstance(backend, LocalBackend)
    publish_fake_splits(backend, tmp_path)
    return backend


# ------------------------------------------------------------------------------------ materialization


def materialize_drift(
    instance: dg.DagsterInstance | None = None, *, day: str = WINDOW_DAY, **config: Any
) -> dg.ExecuteInProcessResult:
    """drift_report's partition `day` (default: WINDOW_END's day, with the 3 days up to its end)."""
    run_config = {"ops": {"drift_report": {"config": {"window_days": 3, "min_rows": 50, **config}}}}
    return dg.materialize(
        [DATASET_SPLITS, drift_report, drift_check],
        selection=dg.AssetSelection.assets(drift_report),
        resources=build_resources(),
        run_config=run_config,
        instance=instance or dg.DagsterInstance.ephemeral(),
        partition_key=day,
    )


def report_metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node("drift_report")
    return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}


def check_evaluation(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "drift_check"
    return evaluation


def test_shifted_traffic_is_drift_fails_the_check_and_alerts(
    storage: LocalBackend, webhook: WebhookReceiver
) -> None:
    # Two days of off-topic traffic inside the window, plus on-topic traffic outside it (ignored).
    log_requests(
        storage,
        synthetic_pairs(160, shifted=True, seed=2),
        start=WINDOW_END - timedelta(days=2),
        spacing=timedelta(minutes=15),
        batch="shifted",
    )
    log_requests(
        storage,
        synthetic_pairs(40, shifted=False, seed=3),
        start=WINDOW_END - timedelta(days=9),
        spacing=timedelta(minutes=1),
        batch="old",
    )
    storage.put_bytes(
        request_log_key((WINDOW_END - timedelta(days=1)).strftime("%Y-%m-%d"), "torn"), b"PAR1?"
    )

    result = materialize_drift()

    assert result.success
    metadata = report_metadata(result)
    assert metadata["status"] == "drift"
    assert metadata["drift_share"] >= metadata["drift_share_threshold"] == 0.5
    assert {"prompt", "response"} <= set(metadata["drifted_columns"])
    assert metadata["current_rows"] == 160  # the out-of-window batch is not counted
    assert metadata["reference_rows"] == 200
    assert metadata["request_log_batches_skipped"] == 1  # the torn batch: left out, not fatal
    html_path = Path(metadata["report_html"])
    assert html_path.is_file() and "<html" in html_path.read_text().lower()
    report_json = json.loads(Path(metadata["report_json"]).read_text())
    assert report_json["metrics"]
    assert "**yes**" in metadata["columns"]

    evaluation = check_evaluation(result)
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["alert"].value == "sent"
    assert evaluation.metadata["report_version"].value == metadata["version"]

    (alert,) = webhook.received
    assert alert["path"].endswith("/not-a-real-secret")
    assert "Drift detected" in alert["body"]["text"]
    assert str(html_path) in alert["body"]["text"]
    assert any(block["type"] == "header" for block in alert["body"]["blocks"])
    # The secret webhook URL is in no event the run recorded.
    logged = " ".join(str(event.message) for event in result.all_events)
    assert webhook.url not in logged


def test_same_traffic_passes_without_alert(storage: LocalBackend, webhook: WebhookReceiver) -> None:
    log_requests(
        storage,
        synthetic_pairs(150, shifted=False, seed=4),
        start=WINDOW_END - timedelta(days=2, hours=6),
        spacing=timedelta(minutes=20),
        batch="same",
    )
    result = materialize_drift()

    metadata = report_metadata(result)
    assert metadata["status"] == "ok", metadata["message"]
    assert metadata["drift_share"] < 0.5
    evaluation = check_evaluation(result)
    assert evaluation.passed
    assert "alert" not in evaluation.metadata
    assert webhook.received == []


def test_too_little_traffic_is_not_enough_data_not_an_alarm(
    storage: LocalBackend, webhook: WebhookReceiver
) -> None:
    log_requests(
        storage,
        synthetic_pairs(12, shifted=True, seed=5),
        start=WINDOW_END - timedelta(hours=5),
        spacing=timedelta(minutes=10),
        batch="few",
    )
    result = materialize_drift()

    assert result.success
    metadata = report_metadata(result)
    assert metadata["status"] == "not_enough_data"
    assert "drift_share" not in metadata
    assert metadata["current_rows"] == 12
    assert "not enough data" in Path(metadata["report_html"]).read_text().lower()
    evaluation = check_evaluation(result)
    assert evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.description is not None and evaluation.description.startswith("Not enough data")
    assert webhook.received == []


def test_empty_request_log_and_no_webhook(storage: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMFT_ALERT_WEBHOOK_URL", raising=False)
    result = materialize_drift(window_days=1)
    assert result.success
    metadata = report_metadata(result)
    assert metadata["status"] == "not_enough_data"
    assert (metadata["current_rows"], metadata["request_log_batches"]) == (0, 0)


def test_a_backfill_of_two_days_gives_each_day_its_own_report(storage: LocalBackend) -> None:
    """Two partitions, each the request log of its own day: on-topic traffic on 03-09, shifted on 03-10."""
    log_requests(
        storage,
        synthetic_pairs(90, shifted=False, seed=12),
        start=datetime(2025, 3, 9, 1, 0, tzinfo=UTC),
        spacing=timedelta(minutes=10),
        batch="day1",
    )
    log_requests(
        storage,
        synthetic_pairs(80, shifted=True, seed=13),
        start=datetime(2025, 3, 10, 1, 0, tzinfo=UTC),
        spacing=timedelta(minutes=10),
        batch="day2",
    )
    instance = dg.DagsterInstance.ephemeral()
    days = ["2025-03-09", "2025-03-10"]
    reports = {day: report_metadata(materialize_drift(instance, day=day, window_days=1)) for day in days}
    assert {day: (m["current_rows"], m["status"]) for day, m in reports.items()} == {
        "2025-03-09": (90, "ok"),
        "2025-03-10": (80, "drift"),
    }
    assert {day: (m["window_start"], m["window_end"]) for day, m in reports.items()} == {
        "2025-03-09": ("2025-03-09T00:00:00+00:00", "2025-03-10T00:00:00+00:00"),
        "2025-03-10": ("2025-03-10T00:00:00+00:00", "2025-03-11T00:00:00+00:00"),
    }
    # Per-day history in the instance: each partition keeps its own report version.
    assert instance.get_materialized_partitions(dg.AssetKey("drift_report")) == set(days)
    for day in days:
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("drift_report"), asset_partitions=[day]), limit=1
        ).records
        assert record.asset_materialization.metadata["version"].value == reports[day]["version"]
    assert reports["2025-03-09"]["version"] != reports["2025-03-10"]["version"]


def test_a_day_without_traffic_is_a_not_enough_data_report(storage: LocalBackend) -> None:
    log_requests(
        storage,
        synthetic_pairs(90, shifted=True, seed=14),
        start=datetime(2025, 3, 10, 1, 0, tzinfo=UTC),
        spacing=timedelta(minutes=10),
        batch="next-day",
    )
    result = materialize_drift(day="2025-03-09", window_days=1)
    assert result.success
    metadata = report_metadata(result)
    assert (metadata["status"], metadata["current_rows"], metadata["request_log_batches"]) == (
        "not_enough_data",
        0,
        0,
    )
    assert metadata["message"] == (
        "Not enough data for a drift report: reference has 200 rows and current has 0 rows; at least 50 "
        "rows are needed in each window."
    )
    assert check_evaluation(result).passed  # a WARN, not an alarm


def test_bad_config_is_a_clear_failure(storage: LocalBackend) -> None:
    result = dg.materialize(
        [DATASET_SPLITS, drift_report, drift_check],
        selection=dg.AssetSelection.assets(drift_report),
        resources=build_resources(),
        run_config={"ops": {"drift_report": {"config": {"drift_share_threshold": 1.5}}}},
        instance=dg.DagsterInstance.ephemeral(),
        partition_key=WINDOW_DAY,
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    assert "drift_share_threshold must be in (0, 1]" in str(failure.message) + str(
        failure.event_specific_data
    )


# ------------------------------------------------------------------------------------ request-log reader


def test_window_bounds_and_partition_days() -> None:
    start, end = window_bounds(2, WINDOW_END)
    assert (start, end) == (WINDOW_END - timedelta(days=2), WINDOW_END)
    assert partition_days(start, end) == ["2025-03-08", "2025-03-09", "2025-03-10"]
    midnight = datetime(2025, 3, 10, tzinfo=UTC)
    assert partition_days(midnight - timedelta(days=1), midnight) == ["2025-03-09"]
    with pytest.raises(ValueError, match="timezone-aware"):
        window_bounds(1, datetime(2025, 3, 10))
    with pytest.raises(ValueError, match="positive"):
        window_bounds(0, WINDOW_END)


def test_reader_keeps_only_the_window_and_reports_bad_batches(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "root")
    assert read_request_log_window(backend, window_days=7, end=WINDOW_END).rows == 0  # no log at all

    log_requests(
        backend,
        synthetic_pairs(48, shifted=False, seed=6),
        start=WINDOW_END - timedelta(hours=36),
        spacing=timedelta(hours=1),  # 36 rows inside the window, 12 after its end
        batch="hourly",
    )
    backend.put_bytes(request_log_key("2025-03-09", "no-prompt"), _parquet_bytes(pa.table({"x": [1]})))
    backend.put_bytes("request_logs/date=2025-03-09/notes.txt", b"not a batch")

    window = read_request_log_window(backend, window_days=2, end=WINDOW_END)

    assert window.rows == 36
    assert window.table.column_names == ["timestamp", "prompt", "response"]
    timestamps = window.table.column("timestamp").to_pylist()
    assert min(timestamps) >= WINDOW_END - timedelta(days=2) and max(timestamps) < WINDOW_END
    assert list(window.skipped_batches) == ["request_logs/date=2025-03-09/no-prompt.parquet"]
    assert "missing columns" in window.skipped_batches["request_logs/date=2025-03-09/no-prompt.parquet"]
    assert window.to_summary()["batches_skipped"] == 1
    with pytest.raises(ValueError, match="not request log columns"):
        read_request_log_window(backend, window_days=1, end=WINDOW_END, columns=["nope"])


def test_reader_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    backend = open_storage(f"s3://{s3_bucket}/llmft")
    log_requests(
        backend,
        synthetic_pairs(10, shifted=True, seed=7),
        start=WINDOW_END - timedelta(hours=3),
        spacing=timedelta(minutes=5),
        batch="s3",
    )
    window = read_request_log_window(backend, window_days=1, end=WINDOW_END)
    assert window.rows == 10 and window.batches_read == 1
    assert window.table.column("prompt").to_pylist()[0].startswith("Find the")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_drift_report_on_s3_storage(
    s3_bucket: str, llmft_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same asset on an S3 root: the report is published in the bucket and linked by its s3:// URI."""
    root = f"s3://{s3_bucket}/llmft"
    monkeypatch.setenv("LLMFT_STORAGE", root)
    monkeypatch.delenv("LLMFT_ALERT_WEBHOOK_URL", raising=False)
    backend = open_storage(root)
    publish_fake_splits(backend, tmp_path, rows=60)
    log_requests(
        backend,
        synthetic_pairs(8, shifted=True, seed=8),
        start=WINDOW_END - timedelta(hours=2),
        spacing=timedelta(minutes=5),
        batch="s3",
    )
    result = materialize_drift()

    metadata = report_metadata(result)
    assert metadata["status"] == "not_enough_data" and metadata["current_rows"] == 8
    html_uri = metadata["report_html"]
    assert html_uri.startswith(f"{root}/assets/drift_report/{WINDOW_DAY}/{metadata['version']}/")
    key = html_uri[len(root) + 1 :]
    assert b"not enough data" in backend.get_bytes(key).lower()
    assert check_evaluation(result).passed
