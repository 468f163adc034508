"""Monitoring and automation: the `drift_report` asset, its `drift_check` (+ webhook alert), the drift
retraining sensor, the incoming-data sensor and the daily drift schedule.

The drift logic is in `llmft_assets.monitoring` (no Dagster there); this layer wires config, storage
and the instance's records. Evidently is imported inside `build_drift_report`, never at module top.

Automation, end to end:
- `drift_schedule` (daily) runs `drift_job` -> `drift_report` + `drift_check`.
- `drift_check` fails (severity ERROR) when the drift share reaches the threshold and posts a
  Slack-compatible alert to `$LLMFT_ALERT_WEBHOOK_URL`; too little data passes with a WARN-severity
  "not enough data" description (neither an error nor an alarm).
- `drift_retrain_sensor` sees the failed check and starts `data_job` (fresh data), then `train_job`;
  one drift report version starts one retraining (run keys) and a cooldown spaces retrainings out.
- `incoming_data_sensor` turns each new drop under `<storage root>/incoming/` into a `data_job` run
  reading just that drop; the drop is the dataset version (run tags + raw_dataset's version).
"""

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

from llmft_assets import settings
from llmft_assets.data.raw_sources import SUPPORTED_SUFFIXES
from llmft_assets.defs.data.assets import OWNERS, split_file
from llmft_assets.defs.data.jobs import data_job, fresh_data_selection, train_job
from llmft_assets.defs.storage_resources import (
    ArtifactHandle,
    StagedArtifact,
    StorageResource,
    artifact_output,
    asset_prefix,
)
from llmft_assets.storage import StorageBackend
from llmft_assets.storage.publish import content_version, describe_directory
from llmft_assets.storage.tables import count_rows, iter_parquet_batches

MONITORING_GROUP = "monitoring"
DRIFT_REPORT = "drift_report"
DRIFT_CHECK = "drift_check"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
SUMMARY_JSON = "summary.json"
INCOMING_PREFIX = "incoming"
# A folder drop carrying this marker is complete at once; otherwise it must be unchanged between two
# sensor evaluations (a half-copied folder or file is never read).
DROP_READY_MARKER = "_SUCCESS"
# Names a writer uses while a file is incomplete, or that are not data.
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart")

# A drift retraining's data run that never shows up (e.g. deleted) is given up after this long.
PENDING_RUN_TIMEOUT_S = 6 * 3600

TAG_TRIGGER = "llmft/trigger"
TAG_DRIFT_REPORT = "llmft/drift_report_version"
TAG_RETRAIN_STAGE = "llmft/retrain_stage"
TAG_INCOMING_DROP = "llmft/incoming_drop"
TAG_INCOMING_FINGERPRINT = "llmft/incoming_fingerprint"


# ------------------------------------------------------------------------------------------- helpers


def incoming_uri(storage_root: str) -> str:
    """Where new raw data is dropped: `<root>/incoming` (a local folder or an s3:// prefix)."""
    return f"{storage_root.rstrip('/')}/{INCOMING_PREFIX}"


def retrain_cooldown_s() -> float:
    return settings.get().retrain_cooldown_hours * 3600


def _metadata_text(metadata: dict[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    value = getattr(value, "value", value)
    return None if value is None else str(value)


def _link(uri: str) -> dg.MetadataValue:
    return dg.MetadataValue.url(uri) if "://" in uri else dg.MetadataValue.path(uri)


# -------------------------------------------------------------------------------------- drift_report


class DriftReportConfig(dg.Config):
    window_days: float = 7.0
    """The request log window compared with the training prompts: the `window_days` before `end_time`."""
    end_time: str | None = None
    """ISO-8601 end of the window (UTC if no offset); default now. The schedule sets its tick time."""
    drift_share_threshold: float = 0.5
    """Drift when at least this share of the compared columns drifted (Evidently's DataDriftPreset)."""
    min_rows: int = 50
    """Fewer rows in either window is a 'not enough data' report, not a verdict."""
    sample_size: int | None = 2_000
    """Rows per window the text-drift columns are compared on (None: every row)."""
    model_version: str | None = None
    """Only the traffic one adapter version answered (the request log's `model_version`); None: all."""
    max_rows_per_window: int = 50_000
    """Deterministic sample cap per window for the whole comparison (bounds memory on a big train split)."""
    text_method: str = "abs_text_content_drift"
    seed: int = 0


def _parse_end_time(end_time: str | None) -> datetime | None:
    if end_time is None:
        return None
    try:
        parsed = datetime.fromisoformat(end_time)
    except ValueError as error:
        raise dg.Failure(
            description=f"drift_report: end_time {end_time!r} is not an ISO-8601 time", allow_retries=False
        ) from error
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _sample_indices(total: int, limit: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a deterministic sample of `limit` rows out of `total`, or None to keep all."""
    if total <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def reference_from_train_split(train_path: Path, *, max_rows: int, seed: int = 0) -> pa.Table:
    """(prompt, response) of the train split's conversations, streamed in row groups and sampled
    deterministically to at most `max_rows` rows, so a split bigger than memory works too."""
    from llmft_assets.monitoring.drift import reference_from_conversations

    keep = _sample_indices(count_rows(train_path), max_rows, seed)
    parts: list[pa.Table] = []
    offset = 0
    for batch in iter_parquet_batches(train_path, columns=["messages"]):
        if keep is None:
            rows = pa.Table.from_batches([batch])
        else:
            wanted = keep[(keep >= offset) & (keep < offset + batch.num_rows)] - offset
            rows = pa.Table.from_batches([batch]).take(pa.array(wanted, type=pa.int64()))
        offset += batch.num_rows
        if rows.num_rows:
            parts.append(reference_from_conversations(rows))
    if not parts:
        return pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())})
    return pa.concat_tables(parts)


def _columns_markdown(summary: dict[str, Any]) -> str:
    lines = ["| column | kind | method | score | threshold | drifted |", "|---|---|---|---|---|---|"]
    for name, column in sorted(summary.get("columns", {}).items()):
        score = "n/a" if column["score"] is None else f"{column['score']:.4g}"
        threshold = "n/a" if column["threshold"] is None else f"{column['threshold']:.4g}"
        lines.append(
            f"| {name} | {column['kind']} | {column['method']} | {score} | {threshold} | "
            f"{'**yes**' if column['drifted'] else 'no'} |"
        )
    return "\n".join(lines)


@dg.asset(
    group_name=MONITORING_GROUP,
    owners=OWNERS,
    kinds={"evidently", "html"},
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftReportConfig,
    dataset_splits: ArtifactHandle,
    storage: StorageResource,
) -> dg.Output[StagedArtifact]:
    """Evidently drift of served traffic (the request log over `window_days`) against what the model
    was trained on (the train split's prompts and responses): HTML + JSON report, drift share and
    drifted columns as metadata. Too little data in either window is a 'not enough data' report."""
    from llmft_assets.monitoring.drift import build_drift_report
    from llmft_assets.monitoring.request_logs import read_request_log_window

    end = _parse_end_time(config.end_time)
    backend = storage.backend()
    window = read_request_log_window(
        backend, window_days=config.window_days, end=end, model_version=config.model_version
    )
    for key, reason in window.skipped_batches.items():
        context.log.warning(f"request log batch {key} left out: {reason}")
    current = window.table
    current_rows_logged = current.num_rows
    current_keep = _sample_indices(current.num_rows, config.max_rows_per_window, config.seed + 1)
    if current_keep is not None:
        current = current.take(pa.array(current_keep, type=pa.int64()))
    reference = reference_from_train_split(
        split_file(dataset_splits, "train"), max_rows=config.max_rows_per_window, seed=config.seed
    )
    context.log.info(
        f"comparing {reference.num_rows} training rows (dataset_splits {dataset_splits.version}) with "
        f"{current.num_rows} of {current_rows_logged} requests logged in "
        f"[{window.start.isoformat()}, {window.end.isoformat()})"
    )
    try:
        result = build_drift_report(
            reference,
            current,
            drift_share_threshold=config.drift_share_threshold,
            min_rows=config.min_rows,
            text_method=config.text_method,
            sample_size=config.sample_size,
            sample_seed=config.seed,
        )
    except ValueError as error:  # bad config values: one clear line, no retry can fix it
        raise dg.Failure(description=f"drift_report: {error}", allow_retries=False) from error
    context.log.info(result.message)

    summary = {
        **result.to_summary(),
        "window": window.to_summary(),
        "current_rows_logged": current_rows_logged,
        "dataset_splits_version": dataset_splits.version,
    }
    staging = storage.staging_dir(DRIFT_REPORT)
    (staging / REPORT_HTML).write_text(result.html, encoding="utf-8")
    (staging / REPORT_JSON).write_text(json.dumps(result.json, indent=1, default=str), encoding="utf-8")
    (staging / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    # The IO manager publishes under the same content version, so the link is known before publishing.
    version = content_version(describe_directory(staging))
    version_prefix = f"{asset_prefix(context.asset_key)}/{version}"
    html_uri = backend.uri(f"{version_prefix}/{REPORT_HTML}")
    json_uri = backend.uri(f"{version_prefix}/{REPORT_JSON}")

    metadata: dict[str, Any] = {
        "status": result.status,
        "message": result.message,
        "drifted_columns": dg.MetadataValue.json(result.drifted_columns),
        "drifted_column_count": len(result.drifted_columns),
        "number_of_columns": result.number_of_columns,
        "drift_share_threshold": result.drift_share_threshold,
        "reference_rows": result.reference_rows,
        "current_rows": result.current_rows,
        "current_rows_logged": current_rows_logged,
        "min_rows": result.min_rows,
        "window_start": window.start.isoformat(),
        "window_end": window.end.isoformat(),
        "request_log_batches": window.batches_read,
        "request_log_batches_skipped": len(window.skipped_batches),
        "report_html": _link(html_uri),
        "report_json": _link(json_uri),
        "dataset_splits_version": dataset_splits.version,
    }
    if result.drift_share is not None:
        metadata["drift_share"] = result.drift_share
    if result.columns:
        metadata["columns"] = dg.MetadataValue.md(_columns_markdown(summary))
    if result.notes:
        metadata["notes"] = dg.MetadataValue.json(result.notes)
    artifact = StagedArtifact(
        staging, metadata={"summary": summary, "report_html": html_uri, "report_json": json_uri}
    )
    return artifact_output(artifact, metadata=metadata)


# --------------------------------------------------------------------------------- drift_check + alert


def send_alert_if_configured(summary: dict[str, Any], report_uri: str | None, log: Any) -> str:
    """Post the drift alert to $LLMFT_ALERT_WEBHOOK_URL; returns what happened (for metadata).

    Unset webhook: skipped with a log line. Delivery failure: logged as an error, never raised (the
    check's verdict is the record of the drift; a flaky chat server must not hide it).
    """
    from llmft_assets.monitoring.alerts import WebhookError, send_drift_alert

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


@dg.asset_check(
    asset=DRIFT_REPORT,
    name=DRIFT_CHECK,
    blocking=False,  # nothing downstream to protect; the retraining sensor reads the verdict
    description="Fails when the drift share of served traffic reaches the threshold (and alerts the "
    "webhook); passes with a WARN 'not enough data' when a window is too small to judge.",
)
def drift_check(context: dg.AssetCheckExecutionContext, drift_report: ArtifactHandle) -> dg.AssetCheckResult:
    summary: dict[str, Any] = drift_report.metadata.get("summary") or {}
    status = str(summary.get("status", "missing"))
    report_uri = drift_report.metadata.get("report_html") or drift_report.uri
    metadata: dict[str, Any] = {
        "status": status,
        "report_version": drift_report.version,
        "report_html": _link(str(report_uri)),
        "drifted_columns": dg.MetadataValue.json(summary.get("drifted_columns", [])),
        "reference_rows": int(summary.get("reference_rows", 0) or 0),
        "current_rows": int(summary.get("current_rows", 0) or 0),
    }
    if summary.get("drift_share") is not None:
        metadata["drift_share"] = float(summary["drift_share"])
    if summary.get("drift_share_threshold") is not None:
        metadata["drift_share_threshold"] = float(summary["drift_share_threshold"])
    message = str(summary.get("message", ""))

    if status == "not_enough_data":
        return dg.AssetCheckResult(
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description=message
            if message.lower().startswith("not enough data")
            else f"Not enough data: {message}",
            metadata=metadata,
        )
    if status == "ok":
        return dg.AssetCheckResult(passed=True, description=message, metadata=metadata)
    if status != "drift":
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"drift_report {drift_report.version} has no readable summary (status {status!r})",
            metadata=metadata,
        )
    metadata["alert"] = send_alert_if_configured(summary, str(report_uri), context.log)
    return dg.AssetCheckResult(
        passed=False, severity=dg.AssetCheckSeverity.ERROR, description=message, metadata=metadata
    )


drift_job = dg.define_asset_job(
    "drift_job",
    selection=dg.AssetSelection.assets(DRIFT_REPORT),
    description="The drift report of served traffic against the training data, with its check.",
)


@dg.schedule(
    job=drift_job,
    cron_schedule=settings.get().drift_schedule_cron,  # a schedule's cron is fixed when the code loads
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily drift report over the request log window ending at the tick time.",
)
def drift_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    if context.instance.get_latest_materialization_event(dg.AssetKey("dataset_splits")) is None:
        return dg.SkipReason("no dataset_splits materialized yet: nothing to compare served traffic with")
    tick = context.scheduled_execution_time or datetime.now(UTC)
    tick_iso = tick.astimezone(UTC).isoformat()
    return dg.RunRequest(
        run_key=f"drift-{tick_iso}",
        run_config={"ops": {DRIFT_REPORT: {"config": {"end_time": tick_iso}}}},
        tags={TAG_TRIGGER: "schedule"},
    )


# ------------------------------------------------------------------------------ drift retraining sensor


@dataclass
class RetrainCursor:
    """What the drift sensor remembers between evaluations (JSON in the sensor's cursor)."""

    handled_check_id: int = -1
    last_retrain_at: float | None = None
    pending: dict[str, Any] | None = None  # the drift retraining whose data run we wait for

    @classmethod
    def parse(cls, raw: str | None) -> "RetrainCursor":
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            return cls()  # an unreadable cursor starts over; run keys still prevent duplicates
        return cls(
            handled_check_id=int(data.get("handled_check_id", -1)),
            last_retrain_at=data.get("last_retrain_at"),
            pending=data.get("pending"),
        )

    def dump(self) -> str:
        return json.dumps(
            {
                "handled_check_id": self.handled_check_id,
                "last_retrain_at": self.last_retrain_at,
                "pending": self.pending,
            },
            sort_keys=True,
        )


def _latest_version_of(instance: dg.DagsterInstance, asset: str) -> str | None:
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    return _metadata_text(dict(event.asset_materialization.metadata), "version")


def _latest_adapter_inputs(instance: dg.DagsterInstance) -> tuple[str | None, str | None] | None:
    """(dataset_version, base_model_version) the latest lora_adapter was trained on, if any."""
    event = instance.get_latest_materialization_event(dg.AssetKey("lora_adapter"))
    if event is None or event.asset_materialization is None:
        return None
    metadata = dict(event.asset_materialization.metadata)
    return _metadata_text(metadata, "dataset_version"), _metadata_text(metadata, "base_model_version")


def _fresh_data_run_config(instance: dg.DagsterInstance) -> dict[str, Any]:
    """Re-read the source the current raw_dataset came from (an S3 prefix, a drop...), else defaults."""
    event = instance.get_latest_materialization_event(dg.AssetKey("raw_dataset"))
    if event is None or event.asset_materialization is None:
        return {}
    metadata = dict(event.asset_materialization.metadata)
    source = _metadata_text(metadata, "source")
    if not source:
        return {}
    raw_config = _metadata_text(metadata, "config")
    config = None if raw_config in (None, "None", "null", "") else raw_config
    return {"ops": {"raw_dataset": {"config": {"source": source, "config": config}}}}


def _drift_data_run(instance: dg.DagsterInstance, report_version: str) -> Any:
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=data_job.name, tags={TAG_DRIFT_REPORT: report_version, TAG_RETRAIN_STAGE: "data"}
        ),
        limit=1,
    )
    return runs[0] if runs else None


def _follow_pending(
    context: dg.SensorEvaluationContext, cursor: RetrainCursor
) -> dg.SensorResult | dg.SkipReason:
    """Second stage: once the drift retraining's data run succeeded, start (or hand off) training."""
    pending = dict(cursor.pending or {})
    report_version = str(pending["report_version"])
    run = _drift_data_run(context.instance, report_version)
    if run is None:
        if time.time() - float(pending.get("requested_at", 0)) > PENDING_RUN_TIMEOUT_S:
            cursor.pending = None
            return dg.SensorResult(
                skip_reason=f"data run for drift report {report_version} never appeared; retraining dropped",
                cursor=cursor.dump(),
            )
        return dg.SkipReason(f"waiting for the data run of drift report {report_version} to be created")
    if not run.is_finished:
        return dg.SkipReason(f"waiting for data run {run.run_id} ({run.status.value}) before training")
    cursor.pending = None
    if run.status != dg.DagsterRunStatus.SUCCESS:
        return dg.SensorResult(
            skip_reason=f"data run {run.run_id} ended {run.status.value}: no retraining for drift "
            f"report {report_version} (the next drift event after the cooldown tries again)",
            cursor=cursor.dump(),
        )
    splits_after = _latest_version_of(context.instance, "dataset_splits")
    repository = context.repository_def
    train_sensor_present = repository is not None and repository.has_sensor_def("train_sensor")
    if train_sensor_present and splits_after != pending.get("splits_before"):
        # train_sensor starts one training per new (splits, base model) pair: a second one here would
        # train the same data twice.
        return dg.SensorResult(
            skip_reason=f"new dataset_splits {splits_after}: train_sensor starts the training",
            cursor=cursor.dump(),
        )
    trained_on = _latest_adapter_inputs(context.instance)
    current = (splits_after, _latest_version_of(context.instance, "base_model"))
    if trained_on == current:
        reason = (
            f"drift report {report_version}: the fresh data gave the same dataset_splits {splits_after} and "
            f"the base model is unchanged ({current[1]}); the current lora_adapter was trained on exactly "
            "these, so retraining would reproduce it. Nothing to retrain: drop new data under incoming/."
        )
        context.log.info(reason)
        return dg.SensorResult(skip_reason=reason, cursor=cursor.dump())
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                job_name=train_job.name,
                run_key=f"drift-{report_version}-train",
                tags={
                    TAG_TRIGGER: "drift",
                    TAG_DRIFT_REPORT: report_version,
                    TAG_RETRAIN_STAGE: "train",
                    "llmft/data_run": run.run_id,
                },
            )
        ],
        cursor=cursor.dump(),
    )


@dg.sensor(
    jobs=[data_job, train_job],
    minimum_interval_seconds=settings.get().drift_sensor_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A failed drift_check starts a retraining: data_job (fresh data), then train_job. One "
    "drift report starts one retraining (run keys); retrainings are spaced by "
    "$LLMFT_RETRAIN_COOLDOWN_HOURS (default 24 h).",
)
def drift_retrain_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    cursor = RetrainCursor.parse(context.cursor)
    if cursor.pending:
        return _follow_pending(context, cursor)

    check_key = dg.AssetCheckKey(dg.AssetKey(DRIFT_REPORT), DRIFT_CHECK)
    record = context.instance.get_latest_asset_check_evaluation_record(check_key)
    if record is None or record.event is None or record.event.dagster_event is None:
        return dg.SkipReason("drift_check has not run yet")
    if record.id <= cursor.handled_check_id:
        return dg.SkipReason(f"no drift_check evaluation since #{cursor.handled_check_id}")
    evaluation = record.event.dagster_event.event_specific_data
    passed = getattr(evaluation, "passed", None)
    if passed is None:  # planned, not evaluated yet: look again next time
        return dg.SkipReason("the latest drift_check is still running")
    cursor.handled_check_id = record.id
    if passed:
        return dg.SensorResult(skip_reason="the latest drift_check passed", cursor=cursor.dump())

    check_metadata = dict(evaluation.metadata)
    verdict = _metadata_text(check_metadata, "status")
    if verdict not in (None, "drift"):  # e.g. an unreadable report: worth a look, not a retraining
        return dg.SensorResult(
            skip_reason=f"the latest drift_check failed without a drift verdict (status {verdict!r})",
            cursor=cursor.dump(),
        )
    report_version = _metadata_text(check_metadata, "report_version") or record.run_id
    now = time.time()
    cooldown = retrain_cooldown_s()
    if cursor.last_retrain_at is not None and now - cursor.last_retrain_at < cooldown:
        until = datetime.fromtimestamp(cursor.last_retrain_at + cooldown, UTC).isoformat()
        return dg.SensorResult(
            skip_reason=f"drift in report {report_version}, but retraining is cooling down until {until}",
            cursor=cursor.dump(),
        )
    cursor.last_retrain_at = now
    cursor.pending = {
        "report_version": report_version,
        "requested_at": now,
        "splits_before": _latest_version_of(context.instance, "dataset_splits"),
    }
    context.log.info(f"drift in report {report_version}: starting a retraining (fresh data, then training)")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                job_name=data_job.name,
                run_key=f"drift-{report_version}-data",
                run_config=_fresh_data_run_config(context.instance),
                asset_selection=fresh_data_selection(context.instance),
                tags={TAG_TRIGGER: "drift", TAG_DRIFT_REPORT: report_version, TAG_RETRAIN_STAGE: "data"},
            )
        ],
        cursor=cursor.dump(),
    )


# -------------------------------------------------------------------------------- incoming data sensor


@dataclass(frozen=True)
class IncomingDrop:
    """One drop under incoming/: a top-level file or folder."""

    name: str
    keys: tuple[str, ...]
    is_folder: bool

    @property
    def data_keys(self) -> tuple[str, ...]:
        return tuple(key for key in self.keys if key.lower().endswith(SUPPORTED_SUFFIXES))

    @property
    def ready_marked(self) -> bool:
        return self.is_folder and any(key.rsplit("/", 1)[-1] == DROP_READY_MARKER for key in self.keys)


def list_incoming_drops(backend: StorageBackend) -> list[IncomingDrop]:
    """Top-level entries of `incoming/` with their data keys (hidden and in-progress files left out)."""
    grouped: dict[str, list[str]] = {}
    folders: set[str] = set()
    for key in backend.iter_keys(f"{INCOMING_PREFIX}/"):
        relative = key[len(INCOMING_PREFIX) + 1 :]
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts) or relative.endswith(_IGNORED_SUFFIXES):
            continue
        grouped.setdefault(parts[0], []).append(key)
        if len(parts) > 1:
            folders.add(parts[0])
    return [
        IncomingDrop(name=name, keys=tuple(sorted(keys)), is_folder=name in folders)
        for name, keys in sorted(grouped.items())
    ]


def drop_fingerprint(backend: StorageBackend, drop: IncomingDrop) -> str:
    """Changes whenever the drop's content changes: keys, and sizes + mtimes where the files are local
    (S3 objects appear whole, so their keys suffice)."""
    digest = hashlib.sha256()
    for key in drop.keys:
        digest.update(key.encode())
        local = backend.local_path(key)
        if local is not None:
            try:
                stat = local.stat()
            except OSError:  # removed while listing: the next evaluation sees a new fingerprint
                continue
            digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def incoming_runs_in_flight(instance: dg.DagsterInstance) -> int:
    return instance.get_runs_count(filters=dg.RunsFilter(tags={TAG_TRIGGER: "incoming"}, statuses=_IN_FLIGHT))


def drop_source(backend: StorageBackend, drop: IncomingDrop) -> str:
    """What raw_dataset reads for the drop: a local path, or an s3:// URI (folders end with '/')."""
    key = f"{INCOMING_PREFIX}/{drop.name}"
    local = backend.local_path(key)
    if local is not None:
        return str(local)
    return backend.uri(key) + ("/" if drop.is_folder else "")


@dg.sensor(
    job=data_job,
    minimum_interval_seconds=settings.get().incoming_sensor_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Each new file or folder under <storage root>/incoming/ becomes a data_job run reading "
    f"just that drop (a dataset version). A folder with {DROP_READY_MARKER} is read at once; anything "
    "else once it is unchanged between two evaluations. At most LLMFT_INCOMING_MAX_RUNS such runs are "
    "in flight at once (the rest wait for a later tick); base_model is not re-materialized.",
)
def incoming_data_sensor(
    context: dg.SensorEvaluationContext, storage: StorageResource
) -> dg.SensorResult | dg.SkipReason:
    backend = storage.backend()
    state = json.loads(context.cursor) if context.cursor else {}
    processed: dict[str, str] = dict(state.get("processed", {}))
    previous_pending: dict[str, str] = dict(state.get("pending", {}))
    pending: dict[str, str] = {}
    run_requests: list[dg.RunRequest] = []
    max_runs = settings.get().incoming_max_runs
    free_slots = max(0, max_runs - incoming_runs_in_flight(context.instance))
    waiting_for_slot: list[str] = []
    selection = fresh_data_selection(context.instance)
    for drop in list_incoming_drops(backend):
        fingerprint = drop_fingerprint(backend, drop)
        if processed.get(drop.name) == fingerprint:
            continue
        if not drop.ready_marked and previous_pending.get(drop.name) != fingerprint:
            pending[drop.name] = fingerprint  # still settling (or just seen): look again next time
            continue
        if drop.data_keys and len(run_requests) >= free_slots:
            # Ready, but the pool is full: keep it as settled so a later tick starts it at once.
            pending[drop.name] = fingerprint
            waiting_for_slot.append(drop.name)
            continue
        processed[drop.name] = fingerprint
        if not drop.data_keys:
            # Not data raw_dataset can read: say so once instead of launching a run bound to fail.
            context.log.warning(
                f"drop {drop.name!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} file; left alone"
            )
            continue
        source = drop_source(backend, drop)
        run_requests.append(
            dg.RunRequest(
                run_key=f"incoming-{drop.name}-{fingerprint}",
                run_config={"ops": {"raw_dataset": {"config": {"source": source, "config": None}}}},
                asset_selection=selection,
                tags={
                    TAG_TRIGGER: "incoming",
                    TAG_INCOMING_DROP: drop.name,
                    TAG_INCOMING_FINGERPRINT: fingerprint,
                },
            )
        )
        context.log.info(f"new data drop {drop.name!r} ({len(drop.keys)} files): {source}")
    new_cursor = json.dumps({"processed": processed, "pending": pending}, sort_keys=True)
    if waiting_for_slot:
        context.log.info(
            f"{len(waiting_for_slot)} drop(s) wait for a free slot (at most {max_runs} incoming data "
            f"runs at once): {', '.join(waiting_for_slot)}"
        )
    if run_requests:
        return dg.SensorResult(run_requests=run_requests, cursor=new_cursor)
    settling = sorted(set(pending) - set(waiting_for_slot))
    if waiting_for_slot:
        reason = (
            f"{len(waiting_for_slot)} drop(s) wait for a free slot: {max_runs} incoming data run(s) "
            f"already in flight (LLMFT_INCOMING_MAX_RUNS)"
        )
    elif settling:
        reason = f"waiting for {len(settling)} drop(s) to settle: {', '.join(settling)}"
    else:
        reason = f"no new data under {incoming_uri(backend.root_uri)}/"
    return dg.SensorResult(skip_reason=reason, cursor=new_cursor)


MONITORING_ASSETS = [drift_report]
MONITORING_CHECKS = [drift_check]
MONITORING_JOBS = [drift_job]
MONITORING_SENSORS = [drift_retrain_sensor, incoming_data_sensor]
MONITORING_SCHEDULES = [drift_schedule]
