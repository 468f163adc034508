"""The monitoring automation through Dagster's own test helpers: the incoming-data sensor, the drift
retraining sensor (run keys, cooldown, retraining dataset then training), the daily drift schedule, the alert."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun
from dagster_aws.s3 import S3Resource

from llmft_assets import definitions
from llmft_assets.defs.data.sensors import incoming_data_sensor
from llmft_assets.defs.monitoring.assets import DRIFT_REPORT
from llmft_assets.defs.monitoring.checks import DRIFT_CHECK
from llmft_assets.defs.monitoring.schedules import drift_schedule
from llmft_assets.defs.monitoring.sensors import drift_retrain_sensor
from llmft_assets.defs.storage_resources import StorageResource
from llmft_assets.monitoring.alerts import send_alert_if_configured
from llmft_assets.monitoring.retrain_policy import RetrainCursor
from llmft_assets.storage.incoming import incoming_uri
from llmft_assets_tests.test_monitoring_asset import WebhookReceiver


@pytest.fixture(scope="module")
def repository() -> dg.RepositoryDefinition:
    """The real code location."""
    return definitions.defs.get_repository_def()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def test_definitions_carry_the_monitoring_automation(repository: dg.RepositoryDefinition) -> None:
    assert repository.get_sensor_def("incoming_data_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    assert repository.get_sensor_def("drift_retrain_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    assert {target.job_name for target in repository.get_sensor_def("drift_retrain_sensor").targets} == {
        "retraining_dataset_job",
        "train_job",
    }
    schedule = repository.get_schedule_def("drift_schedule")
    assert schedule.job_name == "drift_job"
    assert schedule.cron_schedule == "0 6 * * *"
    drift_job = repository.get_job("drift_job")
    assert drift_job.asset_layer.executable_asset_keys == {dg.AssetKey(DRIFT_REPORT)}
    assert (
        dg.AssetCheckKey(dg.AssetKey(DRIFT_REPORT), DRIFT_CHECK)
        in drift_job.asset_layer.asset_graph.asset_check_keys
    )
    assert repository.asset_graph.get(dg.AssetKey(DRIFT_REPORT)).group_name == "monitoring"
    assert incoming_uri("s3://bucket/prefix/") == "s3://bucket/prefix/incoming"


# ------------------------------------------------------------------------------------ incoming data


def _storage_resource(root: str) -> StorageResource:
    return StorageResource(root=root, s3=S3Resource())


def _evaluate_incoming(
    instance: dg.DagsterInstance, root: str, cursor: str | None, repository: dg.RepositoryDefinition
) -> tuple[list[dg.RunRequest], str | None, str | None]:
    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        repository_def=repository,
        resources={"storage": _storage_resource(root)},
    ) as context:
        data = incoming_data_sensor.evaluate_tick(context)
    skip = data.skip_message
    return list(data.run_requests or []), data.cursor, skip


def test_incoming_drops_each_start_one_data_run(
    tmp_path: Path, instance: dg.DagsterInstance, repository: dg.RepositoryDefinition
) -> None:
    root = tmp_path / "storage"
    incoming = Path(incoming_uri(str(root)))
    requests, cursor, skip = _evaluate_incoming(instance, str(root), None, repository)
    assert requests == [] and "no new data" in str(skip)

    incoming.mkdir(parents=True)
    (incoming / "batch-001.jsonl").write_text('{"id": "a"}\n')
    (incoming / ".batch-002.jsonl.swp").write_text("editor scratch")  # hidden: never a drop
    # First sighting: the file may still be being copied, so it waits one evaluation.
    requests, cursor, skip = _evaluate_incoming(instance, str(root), cursor, repository)
    assert requests == [] and "settle" in str(skip) and "batch-001.jsonl" in str(skip)

    # A folder drop with the ready marker is read at once; the settled file is read now.
    (incoming / "2025-03-10").mkdir()
    (incoming / "2025-03-10" / "part-0.parquet").write_bytes(b"data")
    (incoming / "2025-03-10" / "_SUCCESS").write_text("")
    requests, cursor, _ = _evaluate_incoming(instance, str(root), cursor, repository)

    by_drop = {request.tags["llmft/incoming_drop"]: request for request in requests}
    assert set(by_drop) == {"batch-001.jsonl", "2025-03-10"}
    data_job = repository.get_job("data_job")
    for name, request in by_drop.items():
        source = request.run_config["ops"]["raw_dataset"]["config"]["source"]
        assert source == str(incoming / name)
        assert request.run_config["ops"]["raw_dataset"]["config"]["config"] is None
        assert request.tags["llmft/trigger"] == "incoming"
        assert request.run_key == f"incoming-{name}-{request.tags['llmft/incoming_fingerprint']}"
        assert dg.validate_run_config(data_job, request.run_config)  # the run config the job accepts

    # Nothing new: no run. The same drop seen again never starts a second run.
    requests, cursor, skip = _evaluate_incoming(instance, str(root), cursor, repository)
    assert requests == [] and "no new data" in str(skip)

    # The file is replaced with new content: a new dataset version, a new run key (after settling).
    (incoming / "batch-001.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    requests, cursor, _ = _evaluate_incoming(instance, str(root), cursor, repository)
    assert requests == []
    requests, cursor, _ = _evaluate_incoming(instance, str(root), cursor, repository)
    (changed,) = requests
    assert changed.tags["llmft/incoming_drop"] == "batch-001.jsonl"
    assert changed.run_key != by_drop["batch-001.jsonl"].run_key
    assert json.loads(cursor or "{}")["pending"] == {}


def test_incoming_drops_run_through_a_bounded_pool_without_rebuilding_the_base_model(
    tmp_path: Path,
    instance: dg.DagsterInstance,
    repository: dg.RepositoryDefinition,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMFT_INCOMING_MAX_RUNS", "2")
    root = tmp_path / "storage"
    incoming = Path(incoming_uri(str(root)))
    incoming.mkdir(parents=True)
    for name in ("d1", "d2", "d3"):
        (incoming / name).mkdir()
        (incoming / name / "part-0.jsonl").write_text('{"id": "a"}\n')
        (incoming / name / "_SUCCESS").write_text("")
    # No base model yet: the first data run builds it too.
    requests, cursor, _ = _evaluate_incoming(instance, str(root), None, repository)
    assert [r.tags["llmft/incoming_drop"] for r in requests] == ["d1", "d2"]  # two slots, three drops
    assert dg.AssetKey("base_model") in requests[0].asset_selection
    for request in requests:
        _add_data_run(instance, request, dg.DagsterRunStatus.STARTED)
    _report_materialization(instance, "base_model", version="b1")

    # Both slots busy: d3 waits, with the reason, and is not forgotten.
    requests, cursor, skip = _evaluate_incoming(instance, str(root), cursor, repository)
    assert requests == [] and "wait for a free slot" in str(skip) and "LLMFT_INCOMING_MAX_RUNS" in str(skip)
    assert json.loads(cursor or "{}")["pending"].keys() == {"d3"}

    # One run finishes: d3 starts at once, without base_model (read from storage, not rebuilt).
    finished = instance.get_run_by_id("run-" + f"incoming-d1-{json.loads(cursor or '{}')['processed']['d1']}")
    assert finished is not None
    instance.delete_run(finished.run_id)
    instance.add_run(finished.with_status(dg.DagsterRunStatus.SUCCESS))
    requests, cursor, _ = _evaluate_incoming(instance, str(root), cursor, repository)
    (request,) = requests
    assert request.tags["llmft/incoming_drop"] == "d3"
    assert dg.AssetKey("base_model") not in request.asset_selection
    assert set(request.asset_selection) == {
        dg.AssetKey(name)
        for name in (
            "raw_dataset",
            "cleaned_dataset",
            "validated_dataset",
            "tokenized_dataset",
            "dataset_splits",
        )
    }


def test_incoming_drop_without_data_files_is_left_alone(
    tmp_path: Path, instance: dg.DagsterInstance, repository: dg.RepositoryDefinition
) -> None:
    root = tmp_path / "storage"
    notes = Path(incoming_uri(str(root))) / "notes"
    notes.mkdir(parents=True)
    (notes / "README.txt").write_text("what this is")
    (notes / "_SUCCESS").write_text("")
    requests, cursor, _ = _evaluate_incoming(instance, str(root), None, repository)
    assert requests == []
    assert "notes" in json.loads(cursor or "{}")["processed"]  # warned once, not retried every tick


def test_incoming_drops_on_s3(
    s3_bucket: str, instance: dg.DagsterInstance, repository: dg.RepositoryDefinition
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    root = f"s3://{s3_bucket}/llmft"
    client.put_object(Bucket=s3_bucket, Key="llmft/incoming/drop-a/part-0.jsonl", Body=b'{"id": 1}\n')
    client.put_object(Bucket=s3_bucket, Key="llmft/incoming/drop-b.jsonl.gz", Body=b"gz")
    requests, cursor, _ = _evaluate_incoming(instance, root, None, repository)
    assert requests == []
    requests, cursor, _ = _evaluate_incoming(instance, root, cursor, repository)
    sources = {
        request.tags["llmft/incoming_drop"]: request.run_config["ops"]["raw_dataset"]["config"]["source"]
        for request in requests
    }
    assert sources == {
        "drop-a": f"{root}/incoming/drop-a/",  # a folder: the trailing slash keeps drop-ab out
        "drop-b.jsonl.gz": f"{root}/incoming/drop-b.jsonl.gz",
    }


# ------------------------------------------------------------------------------------ drift retraining

CHECK_KEY = dg.AssetCheckKey(dg.AssetKey(DRIFT_REPORT), DRIFT_CHECK)


def _report_check(
    instance: dg.DagsterInstance, *, passed: bool, report_version: str, status: str | None = None
) -> None:
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=CHECK_KEY.asset_key,
            check_name=CHECK_KEY.name,
            passed=passed,
            metadata={"report_version": report_version, "status": status or ("ok" if passed else "drift")},
        )
    )


def _report_materialization(instance: dg.DagsterInstance, asset: str, **metadata: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, metadata=metadata))


def _evaluate_drift(
    instance: dg.DagsterInstance, cursor: str | None, repository: dg.RepositoryDefinition | None
) -> tuple[list[dg.RunRequest], str | None, str | None]:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=repository)
    data = drift_retrain_sensor.evaluate_tick(context)
    return list(data.run_requests or []), data.cursor, data.skip_message


def _add_data_run(
    instance: dg.DagsterInstance, request: dg.RunRequest, status: dg.DagsterRunStatus
) -> DagsterRun:
    """What the daemon does with the incoming sensor's request: a data_job run carrying its tags."""
    run = DagsterRun(job_name="data_job", run_id=f"run-{request.run_key}", tags=request.tags, status=status)
    instance.delete_run(run.run_id)
    return instance.add_run(run)


def _add_dataset_run(
    instance: dg.DagsterInstance, request: dg.RunRequest, status: dg.DagsterRunStatus
) -> DagsterRun:
    """What the daemon does with the sensor's request: a retraining_dataset_job run carrying its tags."""
    run = DagsterRun(
        job_name="retraining_dataset_job", run_id=f"run-{request.run_key}", tags=request.tags, status=status
    )
    instance.delete_run(run.run_id)
    return instance.add_run(run)


def _llmft_tags(request: dg.RunRequest) -> dict[str, str]:
    return {key: value for key, value in request.tags.items() if key.startswith("llmft/")}


def test_drift_builds_the_retraining_dataset_then_trains_on_it_once(
    instance: dg.DagsterInstance, repository: dg.RepositoryDefinition, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmft_assets.defs.evaluation.sensors import release_sensor

    monkeypatch.setenv("LLMFT_RETRAIN_COOLDOWN_HOURS", "24")
    requests, cursor, skip = _evaluate_drift(instance, None, repository)
    assert requests == [] and skip == "drift_check has not run yet"

    _report_check(instance, passed=True, report_version="r0")
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert requests == [] and skip == "the latest drift_check passed"

    # A failed check that is not a drift verdict (an unreadable report) is no reason to retrain.
    _report_check(instance, passed=False, report_version="r00", status="missing")
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert (
        requests == [] and skip == "the latest drift_check failed without a drift verdict (status 'missing')"
    )

    _report_check(instance, passed=False, report_version="r1")
    requests, cursor, _ = _evaluate_drift(instance, cursor, repository)
    (dataset_request,) = requests
    assert dataset_request.job_name == "retraining_dataset_job"
    assert dataset_request.run_key == "drift-r1-retraining-dataset"
    assert _llmft_tags(dataset_request) == {
        "llmft/trigger": "drift",
        "llmft/drift_report_version": "r1",
        "llmft/retrain_stage": "retraining_dataset",
    }

    # The same failed evaluation seen again never starts a second retraining.
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert requests == [] and skip == "waiting for the retraining_dataset run of drift report r1"

    _add_dataset_run(instance, dataset_request, dg.DagsterRunStatus.STARTED)
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert (
        requests == []
        and skip == "waiting for retraining_dataset run run-drift-r1-retraining-dataset (STARTED)"
    )

    # The retraining dataset is built: train_job trains lora_adapter on it (its run config says so).
    _report_materialization(instance, "retraining_dataset", version="rd-1")
    dataset_run = _add_dataset_run(instance, dataset_request, dg.DagsterRunStatus.SUCCESS)
    requests, cursor, _ = _evaluate_drift(instance, cursor, repository)
    (train_request,) = requests
    assert train_request.job_name == "train_job"
    assert train_request.run_key == "drift-r1-train"
    assert train_request.run_config == {
        "ops": {"lora_adapter": {"config": {"training_data": "retraining_dataset"}}}
    }
    assert dg.validate_run_config(repository.get_job("train_job"), train_request.run_config)
    assert _llmft_tags(train_request) == {
        "llmft/trigger": "drift",
        "llmft/drift_report_version": "r1",
        "llmft/retrain_stage": "train",
        "llmft/retraining_dataset_version": "rd-1",
        "llmft/retraining_dataset_run": dataset_run.run_id,
    }
    assert RetrainCursor.parse(cursor).pending is None

    # The adapter it trains is evaluated and released by release_sensor (release_job), as any adapter.
    _report_materialization(instance, "lora_adapter", version="a-rd-1", dataset_version="rd-1")
    with dg.build_sensor_context(instance=instance, repository_def=repository) as context:
        release = release_sensor.evaluate_tick(context)
    assert [(r.run_key, _llmft_tags(r)) for r in release.run_requests] == [
        ("adapter-a-rd-1", {"llmft/adapter": "a-rd-1"})
    ]

    # A new drift inside the cooldown: noted, no run.
    _report_check(instance, passed=False, report_version="r2")
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert requests == [] and "drift in report r2, but retraining is cooling down until" in str(skip)
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert requests == [] and "no drift_check evaluation since" in str(skip)


def test_drift_with_nothing_new_to_train_on_is_skipped_with_a_reason(
    instance: dg.DagsterInstance, repository: dg.RepositoryDefinition, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMFT_RETRAIN_COOLDOWN_HOURS", "0")
    _report_materialization(instance, "base_model", version="base-1")
    _report_materialization(
        instance, "lora_adapter", version="a1", dataset_version="rd-1", base_model_version="base-1"
    )
    _report_check(instance, passed=False, report_version="r1")
    (dataset_request,), cursor, _ = _evaluate_drift(instance, None, repository)
    _report_materialization(instance, "retraining_dataset", version="rd-1")
    _add_dataset_run(instance, dataset_request, dg.DagsterRunStatus.SUCCESS)
    # The same retraining dataset (rd-1) and base model the adapter was trained on: nothing to retrain.
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert requests == []
    assert "retraining_dataset rd-1 is the one the current lora_adapter was trained on" in str(skip)
    assert RetrainCursor.parse(cursor).pending is None

    # Same dataset, but a new base model since that adapter: that is something new, so it trains.
    _report_materialization(instance, "base_model", version="base-2")
    _report_check(instance, passed=False, report_version="r2")
    (dataset_request,), cursor, _ = _evaluate_drift(instance, cursor, repository)
    _add_dataset_run(instance, dataset_request, dg.DagsterRunStatus.SUCCESS)
    (train_request,), cursor, _ = _evaluate_drift(instance, cursor, repository)
    assert train_request.job_name == "train_job" and train_request.run_key == "drift-r2-train"


def test_a_failed_retraining_dataset_run_stops_that_retraining_and_the_next_drift_starts_anew(
    instance: dg.DagsterInstance, repository: dg.RepositoryDefinition, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMFT_RETRAIN_COOLDOWN_HOURS", "0")
    _report_check(instance, passed=False, report_version="r1")
    (first,), cursor, _ = _evaluate_drift(instance, None, repository)
    _add_dataset_run(instance, first, dg.DagsterRunStatus.FAILURE)
    requests, cursor, skip = _evaluate_drift(instance, cursor, repository)
    assert requests == []
    assert skip == (
        "retraining_dataset run run-drift-r1-retraining-dataset ended FAILURE: no retraining for drift report "
        "r1 (the next drift event after the cooldown tries again)"
    )
    assert RetrainCursor.parse(cursor).pending is None

    _report_check(instance, passed=False, report_version="r2")
    (second,), cursor, _ = _evaluate_drift(instance, cursor, repository)
    assert second.job_name == "retraining_dataset_job"
    assert second.run_key == "drift-r2-retraining-dataset" != first.run_key


def test_retrain_cursor_survives_garbage() -> None:
    assert RetrainCursor.parse("not json") == RetrainCursor()
    cursor = RetrainCursor(handled_check_id=3, last_retrain_at=10.0, pending={"report_version": "x"})
    assert RetrainCursor.parse(cursor.dump()) == cursor


def test_real_failed_drift_check_is_seen_by_the_sensor(
    llmft_home: Path,
    tmp_path: Path,
    instance: dg.DagsterInstance,
    repository: dg.RepositoryDefinition,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """drift_report + drift_check really materialized into the instance; the sensor reads that."""
    from datetime import timedelta

    from llmft_assets.defs.monitoring.retraining import retraining_run_config
    from llmft_assets.storage import open_storage
    from llmft_assets_tests.test_monitoring_asset import (
        WINDOW_DAY,
        WINDOW_END,
        log_requests,
        materialize_drift,
        publish_fake_splits,
        synthetic_pairs,
    )

    monkeypatch.delenv("LLMFT_ALERT_WEBHOOK_URL", raising=False)
    backend = open_storage(str(llmft_home / "storage"))
    publish_fake_splits(backend, tmp_path)
    log_requests(
        backend,
        synthetic_pairs(120, shifted=True, seed=11),
        start=WINDOW_END - timedelta(days=1),
        spacing=timedelta(minutes=10),
        batch="shifted",
    )
    result = materialize_drift(instance)
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert evaluation.metadata["alert"].value == "skipped (no webhook configured)"

    requests, cursor, _ = _evaluate_drift(instance, None, repository)
    (request,) = requests
    version = evaluation.metadata["report_version"].value
    assert request.run_key == f"drift-{version}-retraining-dataset"
    # The retraining follows the day whose check failed (the check is partitioned like the report).
    assert request.run_config == retraining_run_config(WINDOW_DAY)
    assert dg.validate_run_config(repository.get_job("retraining_dataset_job"), request.run_config)

    # A backfill of an older day that drifted too: history, not a live drift event.
    log_requests(
        backend,
        synthetic_pairs(120, shifted=True, seed=12),
        start=WINDOW_END - timedelta(days=3),
        spacing=timedelta(minutes=10),
        batch="shifted-earlier",
    )
    older = materialize_drift(instance, day="2025-03-08")
    (old_evaluation,) = older.get_asset_check_evaluations()
    assert not old_evaluation.passed
    cursor = RetrainCursor.parse(cursor)
    cursor.pending, cursor.last_retrain_at = None, None  # that retraining done, no cooldown
    requests, _, skip = _evaluate_drift(instance, cursor.dump(), repository)
    old_version = old_evaluation.metadata["report_version"].value
    assert requests == [] and skip == (
        f"drift in report {old_version} for 2025-03-08, a day older than the newest report's ({WINDOW_DAY}): "
        "a backfill of past traffic, not a live drift event"
    )


# ------------------------------------------------------------------------------------ schedule + alert


def test_daily_drift_schedule(instance: dg.DagsterInstance, repository: dg.RepositoryDefinition) -> None:
    tick = datetime(2025, 3, 10, 6, 0, tzinfo=UTC)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
    data = drift_schedule.evaluate_tick(context)
    assert not data.run_requests and "no dataset_splits" in str(data.skip_message)

    _report_materialization(instance, "dataset_splits", version="splits-1")
    data = drift_schedule.evaluate_tick(
        dg.build_schedule_context(instance=instance, scheduled_execution_time=tick)
    )
    (request,) = data.run_requests or []
    # The 06:00 tick of 03-10 reports the last complete day, 03-09 (drift_report's partition).
    assert (request.partition_key, request.run_key) == ("2025-03-09", "drift-2025-03-09")
    assert request.tags["dagster/partition"] == "2025-03-09" and request.tags["llmft/trigger"] == "schedule"
    assert request.run_config == {}
    job = repository.get_job("drift_job")
    assert job.partitions_def is not None and "2025-03-10" in job.partitions_def.get_partition_keys(
        current_time=tick
    )  # end_offset=1: today's partition exists too
    # Daily at 06:00 UTC: consecutive ticks are a day apart.
    from dagster._utils.schedules import cron_string_iterator

    ticks = cron_string_iterator(
        tick.timestamp(), drift_schedule.cron_schedule, drift_schedule.execution_timezone
    )
    first, second = next(ticks), next(ticks)
    assert (second - first).total_seconds() == 24 * 3600 and first.hour == 6


def test_alert_goes_to_the_configured_webhook(monkeypatch: pytest.MonkeyPatch) -> None:
    log = dg.get_dagster_logger("test-alert")
    summary = {
        "status": "drift",
        "message": "Drift detected: 2 of 3 columns drifted",
        "drift_share": 0.67,
        "drift_share_threshold": 0.5,
        "drifted_columns": ["prompt", "prompt_words"],
        "number_of_columns": 3,
        "reference_rows": 100,
        "current_rows": 80,
    }
    monkeypatch.delenv("LLMFT_ALERT_WEBHOOK_URL", raising=False)
    assert send_alert_if_configured(summary, "s3://b/report.html", log) == "skipped (no webhook configured)"

    with WebhookReceiver() as receiver:
        monkeypatch.setenv("LLMFT_ALERT_WEBHOOK_URL", receiver.url)
        assert send_alert_if_configured(summary, "s3://b/report.html", log) == "sent"
    (alert,) = receiver.received
    assert "0.67" in alert["body"]["text"] and "s3://b/report.html" in alert["body"]["text"]
    assert "`prompt`" in json.dumps(alert["body"]["blocks"])

    # A webhook that rejects the alert: reported, never raised, and the secret URL is not echoed.
    monkeypatch.setenv("LLMFT_ALERT_WEBHOOK_URL", "ftp://example.invalid/secret-path")
    outcome = send_alert_if_configured(summary, None, log)
    assert outcome.startswith("failed") and "secret-path" not in outcome
