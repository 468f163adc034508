"""deploy/dagster.yaml and the MLflow server on the PostgreSQL at 127.0.0.1:5432 (scripts/ensure_postgres.sh).

Each test creates and drops its own database (``llmft_test_<random>``); S3 is a local moto server.
"""

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from dagster import AssetExecutionContext, Definitions, FilesystemIOManager, MaterializeResult, asset

REPO = Path(__file__).resolve().parents[1]
DAGSTER_YAML = REPO / "deploy" / "dagster.yaml"
PG_HOST = os.environ.get("LLMFT_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LLMFT_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("LLMFT_TEST_PG_USER", "postgres")
BIN = Path(sys.executable).parent


def _pg_connect(database: str) -> Any:
    import psycopg2

    return psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database, connect_timeout=5)


@dataclass(frozen=True)
class PostgresDatabase:
    name: str

    @property
    def sqlalchemy_url(self) -> str:
        # psycopg2 explicitly: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3.
        return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.name}"

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        connection = _pg_connect(self.name)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()


@pytest.fixture
def postgres_database() -> Iterator[PostgresDatabase]:
    """A fresh database of our own on the shared server, dropped afterwards."""
    try:
        admin = _pg_connect("postgres")
    except Exception as error:
        pytest.skip(
            f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT} (run scripts/ensure_postgres.sh): {error}"
        )
    admin.autocommit = True
    name = f"llmft_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PostgresDatabase(name)
    finally:
        with admin.cursor() as cursor:
            # FORCE: a pooled connection left by the code under test must not keep the database alive.
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_http(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


@dataclass
class ManagedServer:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # our own process group only
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


def start_server(
    command: list[str], health_path: str, port: int, env: dict[str, str], log_path: Path, timeout_s: float
) -> ManagedServer:
    log = log_path.open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ManagedServer(url=f"http://127.0.0.1:{port}", process=process)
    try:
        _wait_for_http(server.url + health_path, process, timeout_s)
    except Exception:
        server.stop()
        raise RuntimeError(f"{command[0]} did not start; log:\n{log_path.read_text()[-3000:]}") from None
    return server


def start_moto(tmp_path: Path, port: int | None = None) -> ManagedServer:
    port = port or _free_port()
    return start_server(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        "/moto-api/",
        port,
        {**os.environ},
        tmp_path / f"moto-{port}.log",
        timeout_s=30,
    )


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagedServer]:
    server = start_moto(tmp_path)
    # The standard variables every llmft component (and boto3 itself) reads; dummy credentials.
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    try:
        yield server
    finally:
        server.stop()


def _s3_client(server: ManagedServer) -> Any:
    return boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")


def point_dagster_yaml_at(monkeypatch: pytest.MonkeyPatch, database: PostgresDatabase, bucket: str) -> None:
    for name, value in {
        "DAGSTER_PG_HOST": PG_HOST,
        "DAGSTER_PG_PORT": str(PG_PORT),
        "DAGSTER_PG_USER": PG_USER,
        "DAGSTER_PG_PASSWORD": "",  # trust auth on the test server
        "DAGSTER_PG_DB": database.name,
        "DAGSTER_COMPUTE_LOGS_BUCKET": bucket,
        "DAGSTER_COMPUTE_LOGS_PREFIX": "dagster/compute-logs",
    }.items():
        monkeypatch.setenv(name, value)


def instance_from_deploy_yaml(dagster_home: Path) -> Any:
    from dagster import DagsterInstance

    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(DAGSTER_YAML, dagster_home / "dagster.yaml")
    return DagsterInstance.from_config(str(dagster_home))


# ------------------------------------------------------------------------------------- dagster


def _small_asset_job(output_dir: Path) -> Any:
    """Two assets and a job over them: the smallest real materialization.

    ``numbers`` waits until the run in the other slot has started too, so a passing test proves
    that two runs were in progress on the instance at the same time.
    """

    @asset
    def numbers(context: AssetExecutionContext) -> list[int]:
        slot = int(context.run.tags["llmft/test-slot"])
        (output_dir / f"started-{slot}").touch()
        deadline = time.monotonic() + 90
        while not (output_dir / f"started-{1 - slot}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the other run never started: runs did not overlap")
            time.sleep(0.1)
        print("numbers: computing")  # lands in the compute logs
        return list(range(100))

    @asset
    def numbers_total(context: AssetExecutionContext, numbers: list[int]) -> MaterializeResult:
        total = sum(numbers)
        (output_dir / f"total-{context.run_id}.txt").write_text(str(total))
        return MaterializeResult(metadata={"total": total})

    definitions = Definitions(
        assets=[numbers, numbers_total],
        resources={"io_manager": FilesystemIOManager(base_dir=str(output_dir / "io"))},
    )
    return definitions.resolve_implicit_global_asset_job_def()


def materialize_in_own_process(dagster_home: str, output_dir: str, slot: int) -> tuple[str, bool]:
    """One run worker: its own process, as on a real deployment (and because Dagster's logging
    setup is not safe for two runs in one process)."""
    instance = instance_from_deploy_yaml(Path(dagster_home))
    try:
        result = _small_asset_job(Path(output_dir)).execute_in_process(
            instance=instance, tags={"llmft/test-slot": str(slot)}, raise_on_error=False
        )
        return result.run_id, result.success
    finally:
        instance.dispose()


@pytest.mark.slow
def test_deploy_dagster_yaml_runs_two_materializations_at_once_on_postgres(
    postgres_database: PostgresDatabase,
    s3_server: ManagedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster import DagsterRunStatus
    from dagster_postgres import PostgresRunStorage

    bucket = "llmft-compute-logs"
    _s3_client(s3_server).create_bucket(Bucket=bucket)
    point_dagster_yaml_at(monkeypatch, postgres_database, bucket)
    dagster_home = tmp_path / "dagster_home"
    instance = instance_from_deploy_yaml(dagster_home)  # creates the schema once, before the workers
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert instance.run_monitoring_enabled and instance.run_retries_enabled

        spawn = multiprocessing.get_context("spawn")  # workers inherit the env set above
        with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
            futures = [
                pool.submit(materialize_in_own_process, str(dagster_home), str(tmp_path), slot)
                for slot in (0, 1)
            ]
            outcomes = [future.result(timeout=240) for future in futures]
        assert all(success for _, success in outcomes), outcomes
        run_ids = {run_id for run_id, _ in outcomes}
        assert len(run_ids) == 2

        # Both runs are recorded in PostgreSQL itself, not in some local fallback.
        rows = postgres_database.query("SELECT run_id, status FROM runs")
        assert {run_id for run_id, status in rows if status == DagsterRunStatus.SUCCESS.value} == run_ids
        materializations = postgres_database.query(
            "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
        )
        assert materializations[0][0] == 4
        records = instance.get_run_records()
        assert max(r.start_time for r in records) < min(r.end_time for r in records), "runs did not overlap"
        for run_id in run_ids:
            assert (tmp_path / f"total-{run_id}.txt").read_text() == "4950"

        # The gpu pool limit lives in the same storage (dagster instance concurrency set gpu 1).
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
    finally:
        instance.dispose()


@pytest.mark.slow
def test_s3_compute_log_manager_of_deploy_yaml_uploads_logs(
    postgres_database: PostgresDatabase,
    s3_server: ManagedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    bucket = "llmft-compute-logs"
    s3 = _s3_client(s3_server)
    s3.create_bucket(Bucket=bucket)
    point_dagster_yaml_at(monkeypatch, postgres_database, bucket)
    instance = instance_from_deploy_yaml(tmp_path / "dagster_home")
    try:
        manager = instance.compute_log_manager
        assert isinstance(manager, S3ComputeLogManager)
        from dagster._core.storage.compute_log_manager import ComputeIOType
        from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION

        log_key = ["llmft-test-run", tmp_path.name, "numbers"]
        # What a step's capture leaves on local disk, then the upload the manager does when the step ends.
        # (capture_logs itself mirrors fds through `tail -F`, whose clean-up hangs under pytest's capture.)
        lines = {ComputeIOType.STDOUT: b"training step 1: loss 1.23\n", ComputeIOType.STDERR: b""}
        for io_type, data in lines.items():
            local = Path(manager.local_manager.get_captured_local_path(log_key, IO_TYPE_EXTENSION[io_type]))
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
            manager.upload_to_cloud_storage(log_key, io_type)
        keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert keys and all(key.startswith("dagster/compute-logs/") for key in keys)
        stdout = manager.get_log_data(log_key).stdout
        assert stdout is not None and b"loss 1.23" in stdout
        assert manager.is_capture_complete(log_key)
    finally:
        instance.dispose()


# -------------------------------------------------------------------------------------- mlflow


@pytest.fixture
def mlflow_on_postgres(
    postgres_database: PostgresDatabase, s3_server: ManagedServer, tmp_path: Path
) -> Iterator[tuple[ManagedServer, PostgresDatabase, Callable[[], Any]]]:
    """`mlflow server` as deploy/k8s/mlflow.yaml runs it: PostgreSQL backend, proxied S3 artifacts."""
    bucket = "llmft-artifacts"
    s3 = _s3_client(s3_server)
    s3.create_bucket(Bucket=bucket)
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": postgres_database.sqlalchemy_url,
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/llmft/mlflow",
        "MLFLOW_S3_ENDPOINT_URL": s3_server.url,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    server = start_server(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--serve-artifacts",
        ],
        "/health",
        port,
        env,
        tmp_path / "mlflow.log",
        timeout_s=120,
    )
    try:
        yield server, postgres_database, lambda: s3.list_objects_v2(Bucket=bucket, Prefix="llmft/mlflow/")
    finally:
        server.stop()


@pytest.mark.slow
def test_mlflow_server_with_postgres_backend_tracks_and_registers(
    mlflow_on_postgres: tuple[ManagedServer, PostgresDatabase, Callable[[], Any]],
    tmp_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    server, database, list_artifacts = mlflow_on_postgres
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    experiment_id = client.create_experiment("llmft-deploy-test")
    run = client.create_run(experiment_id, tags={"llmft.asset": "lora_adapter"})
    run_id = run.info.run_id
    client.log_param(run_id, "lora_r", 16)
    client.log_metric(run_id, "eval_loss", 1.25, step=1)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text('{"r": 16}')
    client.log_artifacts(run_id, str(adapter_dir), artifact_path="adapter")
    client.set_terminated(run_id)

    client.create_registered_model("llmft-qwen2.5-lora")
    version = client.create_model_version(
        "llmft-qwen2.5-lora", source=f"runs:/{run_id}/adapter", run_id=run_id
    )
    client.set_registered_model_alias("llmft-qwen2.5-lora", "champion", version.version)

    assert client.get_run(run_id).data.metrics["eval_loss"] == 1.25
    champion = client.get_model_version_by_alias("llmft-qwen2.5-lora", "champion")
    assert champion.version == version.version == "1"
    # Tracking and registry rows are in PostgreSQL; artifact bytes went through the server to S3.
    assert database.query("SELECT key, value FROM params WHERE run_uuid = %s", run_id) == [("lora_r", "16")]
    assert database.query("SELECT name, version FROM model_versions") == [("llmft-qwen2.5-lora", 1)]
    keys = [item["Key"] for item in list_artifacts().get("Contents", [])]
    assert any(key.endswith("adapter/adapter_config.json") for key in keys), keys
