"""Faults: the run worker dies mid-run on the production instance (deploy/dagster.yaml, PostgreSQL).

The run goes the way it goes in production: submitted to the QueuedRunCoordinator, dequeued by the
daemon's queue iteration, launched by the DefaultRunLauncher into a worker process of the code server
(`dagster api grpc`, started by this test through a WorkspaceProcessContext). A TCP proxy in front of
moto holds the worker's upload of dataset_splits, so the kill lands in the middle of publishing: one
file of the new version is in S3, the rest and the manifest are not.

Two ways to lose the worker:
- only the worker (the OOM killer): the code server watches its run processes and fails the run;
- the worker with its code server (the host is gone): nobody reports, the run stays STARTED. The
  DefaultRunLauncher cannot check a worker's health, so the daemon's run monitoring only fails it
  once deploy/dagster.yaml's max_runtime_seconds (48 h) has passed; the test moves the monitoring
  clock past that bound instead of waiting.
Then the daemon's own run-retry and queue iterations re-execute from failure on a fresh code server,
and the asset ends complete and consistent: pointer -> manifest -> verified files, and no half-written
version referenced by anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from llmft_assets.storage import open_storage
from llmft_assets.storage.backend import make_s3_client
from llmft_assets_tests.conftest import S3_TEST_ENV
from llmft_assets_tests.tcp_proxy import Fault, TcpProxy
from llmft_assets_tests.test_faults_s3_outage import VERSION, check_storage_consistent
from llmft_assets_tests.test_postgres_deploy import (  # noqa: F401 (postgres_database is a fixture)
    PostgresDatabase,
    instance_from_deploy_yaml,
    point_dagster_yaml_at,
    postgres_database,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOCATION = "llmft"
DATA_JOB_CONFIG = {
    # One worker process, as a run pod is: killing it kills the whole execution.
    "execution": {"config": {"in_process": {}}},
    "ops": {
        "raw_dataset": {"config": {"source": "sample", "config": "all", "max_rows": 300}},
        "base_model": {"config": {"pretrain_steps": 0}},
        "tokenized_dataset": {"config": {"max_seq_len": 512}},
        "dataset_splits": {"config": {"validation_fraction": 0.1, "test_fraction": 0.1}},
    },
}
LOGGER = logging.getLogger("llmft.tests.faults_run_worker")


def _wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s:.0f}s")


def _parent_pid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


def _worker_pid(instance: Any, run_id: str) -> int | None:
    from dagster import DagsterEventType

    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        pid = event.event_specific_data.metadata.get("pid") if event and event.event_specific_data else None
        if pid is not None and "Started process for run" in (event.message or ""):
            return int(pid.value)
    return None


def _submit_data_job(context: Any, instance: Any) -> str:
    """What `dagster job launch -j data_job` does: a run with a remote origin, handed to the queue."""
    from dagster._core.definitions.selector import JobSubsetSelector

    workspace = context.create_request_context()
    location = workspace.get_code_location(LOCATION)
    (repository,) = location.get_repositories().values()
    remote_job = location.get_job(
        JobSubsetSelector(
            location_name=LOCATION, repository_name=repository.name, job_name="data_job", op_selection=None
        )
    )
    plan = location.get_execution_plan(
        remote_job, DATA_JOB_CONFIG, step_keys_to_execute=None, known_state=None, instance=instance
    )
    run = instance.create_run(
        job_name=remote_job.name,
        run_id=None,
        run_config=DATA_JOB_CONFIG,
        resolved_op_selection=None,
        step_keys_to_execute=plan.execution_plan_snapshot.step_keys_to_execute,
        op_selection=None,
        status=None,
        root_run_id=None,
        parent_run_id=None,
        tags=remote_job.tags,
        job_snapshot=remote_job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot,
        parent_job_snapshot=remote_job.parent_job_snapshot,
        remote_job_origin=remote_job.get_remote_origin(),
        job_code_origin=remote_job.get_python_origin(),
        asset_selection=None,
        asset_check_selection=None,
        asset_graph=repository.asset_graph,
    )
    instance.submit_run(run.run_id, workspace)
    return run.run_id


def _dequeue(context: Any) -> None:
    """One iteration of the daemon's run queue: launches queued runs through the run launcher."""
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
    try:
        errors = [error for error in daemon.run_iteration(context) if error is not None]
    finally:
        daemon.__exit__(None, None, None)  # its thread pool, if it made one
    assert not errors, errors


@pytest.fixture
def proxied_s3(s3_endpoint: str) -> Iterator[tuple[TcpProxy, str]]:
    bucket = f"llmft-faults-worker-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    moto_port = int(s3_endpoint.rsplit(":", 1)[1])
    with TcpProxy("127.0.0.1", moto_port) as proxy:
        yield proxy, bucket


@pytest.mark.parametrize("lost", ["worker", "worker_and_code_server"])
def test_killed_run_worker_leaves_a_consistent_asset_after_monitoring_and_retry(
    lost: str,
    postgres_database: PostgresDatabase,  # noqa: F811 (the imported fixture)
    proxied_s3: tuple[TcpProxy, str],
    s3_endpoint: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """lost="worker": the OOM killer takes the run worker; its code server notices and fails the run.
    lost="worker_and_code_server": the host is gone; nobody reports, the run stays STARTED until run
    monitoring's max runtime fails it; the retry runs from a new code server (a new host)."""
    from dagster import DagsterEventType, DagsterRunStatus
    from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RETRY_NUMBER_TAG, WILL_RETRY_TAG
    from dagster._daemon.auto_run_reexecution.auto_run_reexecution import (
        consume_new_runs_for_automatic_reexecution,
    )
    from dagster._daemon.monitoring import run_monitoring

    proxy, bucket = proxied_s3
    root = f"s3://{bucket}/llmft"
    # Everything the code server and its run workers inherit: storage and compute logs through the
    # proxy, run/event storage in our own PostgreSQL database.
    for key, value in {
        **S3_TEST_ENV,
        "AWS_ENDPOINT_URL": proxy.url,
        "LLMFT_STORAGE": root,
        "LLMFT_HOME": str(tmp_path / "llmft_home"),
    }.items():
        monkeypatch.setenv(key, value)
    point_dagster_yaml_at(monkeypatch, postgres_database, bucket)
    dagster_home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    instance = instance_from_deploy_yaml(dagster_home)
    direct = open_storage(root, s3_client=make_s3_client(s3_endpoint))  # our view, not through the proxy
    hold = proxy.arm(Fault("PUT", rf"/llmft/assets/dataset_splits/{VERSION}/train\.parquet", action="hold"))
    try:
        with code_location(instance) as context:
            run_id = _submit_data_job(context, instance)
            assert instance.get_run_by_id(run_id).status == DagsterRunStatus.QUEUED
            _dequeue(context)

            # The worker is now stuck in the middle of publishing dataset_splits.
            assert hold.triggered.wait(180), "the run never reached the dataset_splits upload"
            assert hold.matched_path is not None
            half_version = hold.matched_path.split("/")[-2]
            assert direct.exists(f"assets/dataset_splits/{half_version}/test.parquet")
            worker_pid = _wait_for(lambda: _worker_pid(instance, run_id), 30, "the worker's pid")
            code_server_pid = _parent_pid(worker_pid)
            # We only ever kill what this test started: the code server is our child, the worker its.
            assert _parent_pid(code_server_pid) == os.getpid(), "the run worker is not ours"
            if lost == "worker_and_code_server":
                os.kill(code_server_pid, signal.SIGKILL)  # first, so it cannot report the worker's death
            os.kill(worker_pid, signal.SIGKILL)
            _wait_for(lambda: _gone(worker_pid), 30, "the killed worker to exit")
            proxy.release()

            # Storage right after the crash: the upstream assets and a half-written, unreferenced version.
            crashed = check_storage_consistent(direct, tmp_path / "cache-crashed")
            assert "dataset_splits" not in crashed.latest
            assert crashed.incomplete["dataset_splits"] == [half_version]
            assert {"raw_dataset", "cleaned_dataset", "validated_dataset", "tokenized_dataset"} <= set(
                crashed.latest
            )

            if lost == "worker":
                # The code server watches its run processes and reports the crash itself.
                _wait_for(
                    lambda: instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE,
                    30,
                    "the code server to fail the run",
                )
                messages = [
                    record.message
                    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
                ]
                assert any("was terminated by signal 9 (SIGKILL)" in message for message in messages), (
                    messages
                )
            else:
                # Nobody told Dagster: the run is STARTED, and monitoring within the bound leaves it so.
                time.sleep(2)
                assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED
                _monitor(context)
                assert instance.get_run_by_id(run_id).status == DagsterRunStatus.STARTED
                # Past deploy/dagster.yaml's max_runtime_seconds the same monitoring fails the run.
                bound_s = instance.run_monitoring_max_runtime_seconds
                assert bound_s == 172800
                real_clock = run_monitoring.get_current_timestamp
                monkeypatch.setattr(
                    run_monitoring, "get_current_timestamp", lambda: real_clock() + bound_s + 60
                )
                _monitor(context)
                assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE

        failed = instance.get_run_by_id(run_id)
        assert failed.tags.get(WILL_RETRY_TAG) == "true"  # run_retries: enabled, max_retries 2
        # A new code server (after a lost host: a new host) and the daemon's run-retry iteration:
        # a re-execution from failure, through the queue again.
        with code_location(instance) as context:
            record = instance.get_run_record_by_id(run_id)
            list(consume_new_runs_for_automatic_reexecution(context, [record], LOGGER))
            (retry,) = [run for run in instance.get_runs() if run.tags.get(PARENT_RUN_ID_TAG) == run_id]
            assert retry.tags.get(RETRY_NUMBER_TAG) == "1"
            # Only what did not finish runs again: dataset_splits (and its check), not the upstream.
            retried_steps = set(retry.step_keys_to_execute or [])
            assert "dataset_splits" in retried_steps
            assert all(key.startswith("dataset_splits") for key in retried_steps), retried_steps
            _dequeue(context)
            _wait_for(lambda: instance.get_run_by_id(retry.run_id).is_finished, 180, "the retry run", 1)
            assert instance.get_run_by_id(retry.run_id).status == DagsterRunStatus.SUCCESS

        # The asset is complete and consistent: pointer -> manifest -> verified files, nothing half-written.
        recovered = check_storage_consistent(direct, tmp_path / "cache-recovered")
        assert recovered.latest["dataset_splits"] == half_version  # same content, same version: completed
        assert all(not versions for versions in recovered.incomplete.values()), recovered.incomplete
        event = instance.get_latest_materialization_event(_asset_key("dataset_splits"))
        assert event is not None and event.run_id == retry.run_id
        assert event.asset_materialization is not None
        assert event.asset_materialization.metadata["version"].value == half_version
    finally:
        instance.dispose()


@contextlib.contextmanager
def code_location(instance: Any) -> Iterator[Any]:
    """The llmft code location served by its own `dagster api grpc` process, as the daemon loads it.

    On exit the server is told to stop and is waited for: left alone it lingers until its heartbeat
    times out (45 s), and outliving the test's database it would never finish its own cleanup.
    """
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget

    target = ModuleTarget(
        module_name="llmft_assets.definitions",
        attribute=None,
        working_directory=str(REPO),
        location_name=LOCATION,
    )
    before = _our_code_servers()
    started: set[int] = set()
    try:
        with WorkspaceProcessContext(instance, target) as context:
            started = _our_code_servers() - before
            try:
                yield context
            finally:
                with contextlib.suppress(Exception):  # already dead when the test killed it
                    context.create_request_context().get_code_location(LOCATION).client.shutdown_server()
    finally:
        _stop_our_processes(started or (_our_code_servers() - before))


def _our_code_servers() -> set[int]:
    """Code servers of llmft that this test process started (its direct children)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if (
                _parent_pid(int(entry.name)) == os.getpid()
                and b"grpc" in command
                and b"llmft_assets.definitions" in command
            ):
                found.add(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _stop_our_processes(pids: set[int], grace_s: float = 30.0) -> None:
    deadline = time.monotonic() + grace_s
    while any(not _gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # by its own pid: a code server this test started


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _asset_key(name: str) -> Any:
    from dagster import AssetKey

    return AssetKey(name)


def _monitor(context: Any) -> None:
    """One iteration of the daemon's run monitoring."""
    from dagster._daemon.monitoring.run_monitoring import execute_run_monitoring_iteration

    errors = [error for error in execute_run_monitoring_iteration(context, LOGGER) if error is not None]
    assert not errors, errors
