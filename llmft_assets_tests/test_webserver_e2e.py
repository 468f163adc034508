"""End to end through the webserver, as a person in the UI would do it.

`dagster dev` (webserver + daemon) runs on loopback in its own process group with DAGSTER_HOME and
LLMFT_HOME in temporary folders. Through the GraphQL API the test launches 'Materialize all' (the
`__ASSET_JOB` with every asset of the location and a small run config), waits for every asset to
succeed, then drops a file into `<storage>/incoming/` and sees `incoming_data_sensor` launch a
`data_job` run that reads it. The process group is stopped at the end, whatever happened.

`LLMFT_E2E_WORKSPACE` may name another workspace.yaml (default: the repository's own).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq
import pytest

from llmft_assets_tests.servers import LOOPBACK, ServerProcess, free_port, start_process

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCATION = "llmft"
REPOSITORY = "__repository__"
MATERIALIZE_ALL_TIMEOUT_S = float(os.environ.get("LLMFT_E2E_RUN_TIMEOUT_S", "1200"))
# Small enough for a 2-core CPU machine; keys only for the assets the location has.
SMALL_CONFIG: dict[str, dict[str, Any]] = {
    "raw_dataset": {"source": "sample", "config": "all", "max_rows": 200},
    "base_model": {"pretrain_steps": 0},
    "tokenized_dataset": {"max_seq_len": 512},
    "dataset_splits": {"validation_fraction": 0.1, "test_fraction": 0.1},
    "lora_adapter": {"max_steps": 4, "per_device_train_batch_size": 4, "save_steps": 4, "logging_steps": 1},
    # Four steps on an untrained tiny model learn nothing: this plumbing test opens the gate's thresholds
    # wide (the gate's decisions are tested in test_eval_gate.py and test_release_gate_e2e.py).
    "eval_report": {
        "max_rows": 8,
        "max_new_tokens": 32,
        "compare_champion": False,
        "gate": {
            "alpha": 1.0,
            "min_accuracy_gain": -1.0,
            "min_format_compliance": 0.0,
            "min_finish_rate": 0.0,
            "max_perplexity_ratio": 1000.0,
        },
    },
    "model_bento": {"require_champion": False, "build_bento": False},
}
# Sensors that would start more work while the test runs (a second training after 'Materialize
# all' already trained): stopped through the API first, as a person would toggle them in the UI.
KEEP_RUNNING = {"incoming_data_sensor", "drift_retrain_sensor"}
T = TypeVar("T")


class GraphQL:
    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]


def wait_for(description: str, probe: Callable[[], T | None], timeout_s: float, server: ServerProcess) -> T:
    """Poll `probe` until it returns something; fail with the server log tail on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"dagster dev exited while waiting for {description}:\n{server.log_tail()}")
        value = probe()
        if value is not None:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {description}:\n{server.log_tail()}")


@pytest.fixture
def dagster_dev(tmp_path: Path) -> Iterator[tuple[GraphQL, ServerProcess, Path]]:
    llmft_home = tmp_path / "llmft_home"
    dagster_home = tmp_path / "dagster_home"
    llmft_home.mkdir()
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = dict(os.environ)
    for name in ("LLMFT_STORAGE", "MLFLOW_TRACKING_URI", "LLMFT_ALERT_WEBHOOK_URL", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    env.update(
        {
            "LLMFT_HOME": str(llmft_home),
            "DAGSTER_HOME": str(dagster_home),
            "LLMFT_INCOMING_SENSOR_INTERVAL_S": "5",
            "LLMFT_DRIFT_SENSOR_INTERVAL_S": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    workspace = os.environ.get("LLMFT_E2E_WORKSPACE") or str(REPO_ROOT / "workspace.yaml")
    port = free_port()
    dagster = Path(sys.executable).parent / "dagster"
    server = start_process(
        [str(dagster), "dev", "-w", workspace, "-h", LOOPBACK, "-p", str(port)],
        f"http://{LOOPBACK}:{port}/server_info",
        timeout=240,
        env=env,
        cwd=REPO_ROOT,
        log_path=tmp_path / "dagster-dev.log",
    )
    try:
        yield GraphQL(f"http://{LOOPBACK}:{port}/graphql"), server, llmft_home
    finally:
        server.stop(grace_seconds=20)


LOCATION_STATUS = """
query { workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""
ASSET_NODES = """
query { assetNodes { assetKey { path } groupName isExecutable isMaterializable } }
"""
SENSORS = """
query Sensors($selector: RepositorySelector!) { sensorsOrError(repositorySelector: $selector) {
  __typename ... on Sensors { results { name sensorState { id status } } } } }
"""
STOP_SENSOR = """
mutation Stop($id: String!) { stopSensor(id: $id) { __typename
  ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message } } }
"""
LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) { launchRun(executionParams: $executionParams) {
  __typename
  ... on LaunchRunSuccess { run { runId status } }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on PythonError { message stack }
  ... on InvalidSubsetError { message }
  ... on InvalidStepError { invalidStepKey }
  ... on InvalidOutputError { stepKey invalidOutputName }
} }
"""
RUN_STATUS = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename
  ... on Run { runId status jobName stepStats { stepKey status } tags { key value } } } }
"""
RUN_FAILURES = """
query Logs($runId: ID!) { logsForRun(runId: $runId) { __typename ... on EventConnection { events {
  __typename ... on ExecutionStepFailureEvent { stepKey error { message } }
  ... on RunFailureEvent { message } } } } }
"""
RUNS_BY_TAG = """
query Runs($key: String!, $value: String!) { runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
  __typename ... on Runs { results { runId status jobName tags { key value } } } } }
"""
LATEST_MATERIALIZATIONS = """
query { assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId } } }
"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def _location_loaded(graphql: GraphQL) -> bool | None:
    entries = graphql(LOCATION_STATUS)["workspaceOrError"]["locationEntries"]
    entry = next((item for item in entries if item["name"] == LOCATION), None)
    if entry is None or entry["loadStatus"] != "LOADED":
        return None
    location = entry["locationOrLoadError"]
    assert location["__typename"] == "RepositoryLocation", f"code location failed to load: {location}"
    return True


def _run_failures(graphql: GraphQL, run_id: str) -> list[str]:
    events = graphql(RUN_FAILURES, runId=run_id)["logsForRun"].get("events", [])
    return [
        f"{event.get('stepKey', 'run')}: {(event.get('error') or {}).get('message') or event.get('message')}"
        for event in events
        if event["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")
    ]


def _sample_rows(count: int) -> list[dict[str, Any]]:
    """Rows in R1-Distill-SFT's own v1 schema, from the bundled sample."""
    sample = REPO_ROOT / "llmft_assets" / "sample_data" / "r1_distill_sft_v1.parquet"
    return pq.read_table(sample).slice(0, count).to_pylist()


def test_materialize_all_then_incoming_drop_starts_a_data_run(
    dagster_dev: tuple[GraphQL, ServerProcess, Path],
) -> None:
    graphql, server, llmft_home = dagster_dev
    wait_for("the code location to load", lambda: _location_loaded(graphql), 240, server)

    # The sensors a person sees in the UI: the monitoring ones must be running by default.
    selector = {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION}
    sensors = graphql(SENSORS, selector=selector)["sensorsOrError"]["results"]
    states = {sensor["name"]: sensor["sensorState"] for sensor in sensors}
    assert set(states) >= KEEP_RUNNING, f"monitoring sensors are not in the code location: {sorted(states)}"
    assert all(states[name]["status"] == "RUNNING" for name in KEEP_RUNNING)
    for name, state in states.items():
        if name not in KEEP_RUNNING and state["status"] == "RUNNING":
            stopped = graphql(STOP_SENSOR, id=state["id"])["stopSensor"]
            assert stopped["__typename"] == "StopSensorMutationResult", stopped

    # 'Materialize all': every materializable asset of the location in one __ASSET_JOB run.
    nodes = graphql(ASSET_NODES)["assetNodes"]
    # retraining_dataset included: with no served traffic yet it carries the current splits over unchanged.
    # The data_shards group is partitioned by source shard: it runs per partition (a backfill over
    # registered shards, test_data_shards.py), never in one unpartitioned run.
    asset_paths = [
        node["assetKey"]["path"]
        for node in nodes
        if node["isMaterializable"] and node["groupName"] != "data_shards"
    ]
    names = {path[-1] for path in asset_paths}
    assert {"raw_dataset", "dataset_splits", "drift_report", "retraining_dataset"} <= names, sorted(names)
    run_config = {"ops": {name: {"config": config} for name, config in SMALL_CONFIG.items() if name in names}}
    launched = graphql(
        LAUNCH_RUN,
        executionParams={
            "selector": {
                **selector,
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": p} for p in asset_paths],
            },
            "runConfigData": run_config,
            "mode": "default",
            # drift_report is daily-partitioned: the UI's 'Materialize all' asks which partition; one
            # partition (today's) makes one run, whose tag the unpartitioned assets ignore.
            "executionMetadata": {
                "tags": [
                    {"key": "llmft/e2e", "value": "materialize-all"},
                    {"key": "dagster/partition", "value": datetime.now(UTC).strftime("%Y-%m-%d")},
                ]
            },
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    def finished_status() -> str | None:
        status = graphql(RUN_STATUS, runId=run_id)["runOrError"]["status"]
        return status if status in FINISHED else None

    status = wait_for("'Materialize all' to finish", finished_status, MATERIALIZE_ALL_TIMEOUT_S, server)
    assert status == "SUCCESS", "\n".join(_run_failures(graphql, run_id)) or server.log_tail()
    latest = {
        tuple(node["assetKey"]["path"]): (node["assetMaterializations"] or [{}])[0].get("runId")
        for node in graphql(LATEST_MATERIALIZATIONS)["assetNodes"]
    }
    assert all(latest[tuple(path)] == run_id for path in asset_paths), latest

    # A person drops new raw data into the storage root's incoming/ prefix.
    incoming = llmft_home / "storage" / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    drop = incoming / "drop-e2e.jsonl"
    staging = incoming / ".drop-e2e.jsonl.tmp"  # hidden while being written, then renamed whole
    staging.write_text("".join(json.dumps(row, default=str) + "\n" for row in _sample_rows(24)))
    staging.rename(drop)

    def sensor_run() -> dict[str, Any] | None:
        runs = graphql(RUNS_BY_TAG, key="llmft/incoming_drop", value=drop.name)["runsOrError"]["results"]
        return runs[0] if runs else None

    run = wait_for("incoming_data_sensor to launch a run for the drop", sensor_run, 180, server)
    assert run["jobName"] == "data_job"
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    assert tags["llmft/trigger"] == "incoming"
    assert tags["dagster/sensor_name"] == "incoming_data_sensor"

    def raw_dataset_done() -> str | None:
        details = graphql(RUN_STATUS, runId=run["runId"])["runOrError"]
        steps = {step["stepKey"]: step["status"] for step in details["stepStats"]}
        if steps.get("raw_dataset") in ("SUCCESS", "FAILURE") or details["status"] in FINISHED:
            return steps.get("raw_dataset") or details["status"]
        return None

    # The sensor's run read the drop: raw_dataset succeeded on it.
    raw_status = wait_for("the drop's raw_dataset step", raw_dataset_done, 300, server)
    assert raw_status == "SUCCESS", "\n".join(_run_failures(graphql, run["runId"]))
