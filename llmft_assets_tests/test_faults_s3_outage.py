"""Faults: the S3-compatible server goes away in the middle of a materialization.

moto keeps its buckets in memory, so restarting it would wipe the very state we want to inspect.
A TCP proxy (tcp_proxy.py) sits between the run and moto instead: stopping the proxy refuses new
connections and resets live ones, which is what a client sees when the server stops. The proxy cuts
on a chosen upload (request line match), so the outage always lands mid-publish of a known asset.

The runs are real `dagster asset materialize` processes (LLMFT_S3_ATTEMPTS is read at import).
Either way, storage must stay consistent: every LATEST.json names a version whose manifest exists
and whose files verify against it; a version prefix without a manifest is referenced by nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from llmft_assets.storage import StorageBackend, fetch_artifact, open_storage
from llmft_assets.storage.backend import make_s3_client
from llmft_assets.storage.publish import MANIFEST_NAME, POINTER_NAME, latest_version, list_versions
from llmft_assets_tests.conftest import S3_TEST_ENV
from llmft_assets_tests.tcp_proxy import Fault, TcpProxy

pytestmark = pytest.mark.slow

DAGSTER = str(Path(sys.executable).parent / "dagster")
REPO = Path(__file__).resolve().parents[1]
CHAIN = [
    "raw_dataset",
    "cleaned_dataset",
    "validated_dataset",
    "base_model",
    "tokenized_dataset",
    "dataset_splits",
]
CHAIN_CONFIG = {
    # In-process executor: one import of the code location instead of one per step; the storage
    # path under test is the same.
    "execution": {"config": {"in_process": {}}},
    "ops": {
        "raw_dataset": {"config": {"source": "sample", "config": "all", "max_rows": 300}},
        "base_model": {"config": {"pretrain_steps": 0}},
        "tokenized_dataset": {"config": {"max_seq_len": 512}},
        "dataset_splits": {"config": {"validation_fraction": 0.1, "test_fraction": 0.1, "salt": "first"}},
    },
}
SHORT_OUTAGE_S = 3.0  # well inside the default retry budget (5 attempts, backoff up to 8 s)
RUN_TIMEOUT_S = 240
VERSION = r"[0-9a-f]{16}"


# ------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class StorageState:
    latest: dict[str, str]  # asset -> version LATEST.json points to
    complete: dict[str, list[str]]  # asset -> versions with a manifest
    incomplete: dict[str, list[str]]  # asset -> version prefixes without a manifest


def check_storage_consistent(backend: StorageBackend, cache_dir: Path) -> StorageState:
    """Assert the publish protocol's promise over every asset in storage and describe what is there.

    pointer -> manifest -> files whose sha256 match (fetch_artifact verifies them on download);
    every version prefix without a manifest is unreferenced.
    """
    keys = backend.list("assets/")
    assets = sorted({key.split("/")[1] for key in keys})
    latest: dict[str, str] = {}
    complete: dict[str, list[str]] = {}
    incomplete: dict[str, list[str]] = {}
    for asset in assets:
        prefix = f"assets/{asset}"
        versions_with_files = {
            key.split("/")[2] for key in keys if key.startswith(prefix + "/") and key.count("/") >= 3
        }
        complete[asset] = list_versions(backend, prefix)
        incomplete[asset] = sorted(versions_with_files - set(complete[asset]))
        pointer_version = latest_version(backend, prefix)
        if pointer_version is None:
            continue
        latest[asset] = pointer_version
        assert pointer_version in complete[asset], (
            f"{asset}: LATEST.json -> {pointer_version} has no manifest"
        )
        pointer = json.loads(backend.get_bytes(f"{prefix}/{POINTER_NAME}"))
        assert pointer["manifest_key"] == f"{prefix}/{pointer_version}/{MANIFEST_NAME}"
        artifact, local = fetch_artifact(backend, prefix, cache_dir)  # raises on a checksum mismatch
        listed = {entry.path for entry in artifact.files}
        stored = {
            key[len(f"{prefix}/{pointer_version}/") :]
            for key in keys
            if key.startswith(f"{prefix}/{pointer_version}/") and not key.endswith(MANIFEST_NAME)
        }
        assert stored == listed, f"{asset}/{pointer_version}: stored {stored} != manifest {listed}"
        for entry in artifact.files:
            assert (local / entry.path).stat().st_size == entry.size
    return StorageState(latest=latest, complete=complete, incomplete=incomplete)


def run_env(
    root: str, endpoint: str, llmft_home: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "LLMFT_", "DAGSTER_", "MLFLOW_"))
    }
    dagster_home = llmft_home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    env.update(S3_TEST_ENV)
    env.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "LLMFT_STORAGE": root,
            "LLMFT_HOME": str(llmft_home),
            "DAGSTER_HOME": str(dagster_home),
            **(extra or {}),
        }
    )
    return env


def start_materialize(
    assets: list[str], run_config: dict, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """`dagster asset materialize` in its own process group (stopped by its own pid if it hangs)."""
    command = [
        DAGSTER,
        "asset",
        "materialize",
        "-m",
        "llmft_assets.definitions",
        "--select",
        ",".join(assets),
        "--config-json",
        json.dumps(run_config),
    ]
    log = log_path.open("wb")
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for_run(
    process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = RUN_TIMEOUT_S
) -> tuple[int, str]:
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # our own process group only
        process.wait(timeout=30)
        pytest.fail(f"materialization did not finish in {timeout_s}s:\n{log_path.read_text()[-4000:]}")
    return returncode, log_path.read_text(errors="replace")


def puts_to(proxy: TcpProxy, pattern: str) -> list[str]:
    return [path for method, path in proxy.stats.requests if method == "PUT" and re.search(pattern, path)]


# ------------------------------------------------------------------------------------- fixtures


@dataclass
class OutageSetup:
    bucket: str
    root: str
    proxy: TcpProxy
    home: Path
    backend: StorageBackend  # talks to moto directly, never through the proxy


@pytest.fixture(scope="module")
def outage_setup(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageSetup]:
    bucket = f"llmft-faults-s3-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    moto_port = int(s3_endpoint.rsplit(":", 1)[1])
    root = f"s3://{bucket}/llmft"
    with TcpProxy("127.0.0.1", moto_port) as proxy:
        yield OutageSetup(
            bucket=bucket,
            root=root,
            proxy=proxy,
            home=tmp_path_factory.mktemp("faults_s3_home"),
            backend=open_storage(root, s3_client=make_s3_client(s3_endpoint)),
        )


@dataclass(frozen=True)
class ChainOutcome:
    returncode: int
    output: str
    fault: Fault
    down_s: float


@pytest.fixture(scope="module")
def chain_after_short_outage(outage_setup: OutageSetup) -> ChainOutcome:
    """The whole data chain, with S3 gone for a few seconds in the middle of tokenized_dataset's upload."""
    setup = outage_setup
    fault = setup.proxy.arm(
        Fault("PUT", rf"/{setup.bucket}/llmft/assets/tokenized_dataset/{VERSION}/data\.parquet", action="cut")
    )
    log_path = setup.home / "chain-short-outage.log"
    process = start_materialize(
        CHAIN, CHAIN_CONFIG, run_env(setup.root, setup.proxy.url, setup.home), log_path
    )
    try:
        assert fault.triggered.wait(RUN_TIMEOUT_S), "the run never uploaded tokenized_dataset"
        cut_at = time.monotonic()
        time.sleep(SHORT_OUTAGE_S)
        setup.proxy.start()  # the same port: the run's client reconnects to the same endpoint
        down_s = time.monotonic() - cut_at
    finally:
        setup.proxy.start()
        returncode, output = wait_for_run(process, log_path)
    return ChainOutcome(returncode=returncode, output=output, fault=fault, down_s=down_s)


# ---------------------------------------------------------------------------------------- tests


def test_short_s3_outage_mid_upload_is_retried_and_the_run_succeeds(
    outage_setup: OutageSetup, chain_after_short_outage: ChainOutcome, tmp_path: Path
) -> None:
    outcome = chain_after_short_outage
    assert outcome.returncode == 0, outcome.output[-4000:]
    assert outcome.down_s >= SHORT_OUTAGE_S
    # The outage really hit that upload: its PUT reached the proxy, was cut, and was sent again.
    cut_path = outcome.fault.matched_path
    assert cut_path is not None
    assert len(puts_to(outage_setup.proxy, re.escape(cut_path) + "$")) >= 2

    state = check_storage_consistent(outage_setup.backend, tmp_path / "cache")
    assert set(state.latest) == set(CHAIN)
    assert state.latest["tokenized_dataset"] in cut_path
    assert all(not versions for versions in state.incomplete.values()), state.incomplete


def test_long_s3_outage_fails_the_run_clearly_and_leaves_no_referenced_half_artifact(
    outage_setup: OutageSetup, chain_after_short_outage: ChainOutcome, tmp_path: Path
) -> None:
    assert chain_after_short_outage.returncode == 0, "needs the complete chain of the first test"
    setup = outage_setup
    before = check_storage_consistent(setup.backend, tmp_path / "cache-before")
    old_splits = before.latest["dataset_splits"]

    # New salt -> new split content -> a new version. Cut at its second file (test.parquet is up
    # already, so a half-written version prefix exists) and stay down past a small retry budget.
    new_config = json.loads(json.dumps(CHAIN_CONFIG))
    new_config["ops"]["dataset_splits"]["config"]["salt"] = "second"
    fault = setup.proxy.arm(
        Fault("PUT", rf"/llmft/assets/dataset_splits/(?!{old_splits}){VERSION}/train\.parquet", action="cut")
    )
    env = run_env(setup.root, setup.proxy.url, setup.home, {"LLMFT_S3_ATTEMPTS": "2"})
    log_path = tmp_path / "splits-long-outage.log"
    started = time.monotonic()
    process = start_materialize(["dataset_splits"], new_config, env, log_path)
    try:
        assert fault.triggered.wait(RUN_TIMEOUT_S), "the run never uploaded the new dataset_splits"
        returncode, output = wait_for_run(process, log_path)  # S3 stays down until the run gave up
    finally:
        setup.proxy.start()
    assert returncode != 0, output[-4000:]
    assert time.monotonic() - started < RUN_TIMEOUT_S

    # A clear error: the storage layer's StorageError, naming the object's s3:// URI and the cause.
    failed_uri = re.search(
        rf"S3 operation on (s3://{setup.bucket}/llmft/assets/dataset_splits/({VERSION})/train\.parquet) failed: "
        r"Could not connect to the endpoint URL",
        output,
    )
    assert failed_uri is not None, output[-4000:]
    assert "StorageError" in output
    new_splits = failed_uri.group(2)
    assert new_splits != old_splits

    # Readers still get the old, complete version; the half-written one is referenced by nothing.
    after = check_storage_consistent(setup.backend, tmp_path / "cache-after")
    assert after.latest == before.latest
    assert after.incomplete["dataset_splits"] == [new_splits]
    assert setup.backend.exists(f"assets/dataset_splits/{new_splits}/test.parquet")
    assert not setup.backend.exists(f"assets/dataset_splits/{new_splits}/train.parquet")

    # With S3 back, running it again publishes the same content into the same version and completes it.
    log_path = tmp_path / "splits-recovery.log"
    env = run_env(setup.root, setup.proxy.url, setup.home)
    returncode, output = wait_for_run(
        start_materialize(["dataset_splits"], new_config, env, log_path), log_path
    )
    assert returncode == 0, output[-4000:]
    recovered = check_storage_consistent(setup.backend, tmp_path / "cache-recovered")
    assert recovered.latest["dataset_splits"] == new_splits
    assert recovered.incomplete["dataset_splits"] == []
    assert {old_splits, new_splits} <= set(recovered.complete["dataset_splits"])


# ------------------------------------------------------------ flaky S3, below the Dagster layer


@pytest.fixture
def flaky_backend(outage_setup: OutageSetup) -> Iterator[tuple[TcpProxy, StorageBackend]]:
    """The storage backend as the IO manager builds it (dagster-aws S3Resource client), through the
    proxy; 2 botocore attempts per call so that a few faults exhaust botocore's own retries."""
    from dagster_aws.s3 import S3Resource

    client = S3Resource(endpoint_url=outage_setup.proxy.url, max_attempts=2).get_client()
    yield outage_setup.proxy, open_storage(f"s3://{outage_setup.bucket}/flaky", s3_client=client)
    outage_setup.proxy.clear_faults()


@pytest.mark.parametrize("action", ["reset", "respond"])
@pytest.mark.parametrize("operation", ["put_file", "put_bytes", "get_bytes"])
def test_resets_and_throttling_beyond_botocore_retries_are_retried_by_storage(
    flaky_backend: tuple[TcpProxy, StorageBackend], action: str, operation: str, tmp_path: Path
) -> None:
    proxy, backend = flaky_backend
    payload = os.urandom(200_000)
    source = tmp_path / "artifact.bin"
    source.write_bytes(payload)
    key = f"{action}/{operation}.bin"
    if operation == "get_bytes":
        backend.put_bytes(key, payload)
    # reset: connections reset mid-request; respond: 503 SlowDown, as S3 answers when it throttles.
    # Three in a row: more than the client's 2 attempts, so only the storage layer's retry helps.
    fault = proxy.arm(
        Fault(
            "GET" if operation == "get_bytes" else "PUT", rf"/flaky/{re.escape(key)}$", action=action, times=3
        )
    )
    if operation == "put_file":
        backend.put_file(key, source)
    elif operation == "put_bytes":
        backend.put_bytes(key, payload)
    else:
        assert backend.get_bytes(key) == payload
    assert fault.hits == 3
    assert backend.get_bytes(key) == payload


def test_access_denied_is_not_retried_and_names_the_uri(
    flaky_backend: tuple[TcpProxy, StorageBackend], tmp_path: Path
) -> None:
    from llmft_assets.storage import StorageError

    proxy, backend = flaky_backend
    source = tmp_path / "artifact.bin"
    source.write_bytes(b"x" * 1000)
    fault = proxy.arm(
        Fault(
            "PUT", r"/flaky/denied\.bin$", action="respond", status=403, error_code="AccessDenied", times=50
        )
    )
    with pytest.raises(
        StorageError, match=r"S3 operation on s3://.+/flaky/denied\.bin failed: .*AccessDenied"
    ):
        backend.put_file("denied.bin", source)
    assert fault.hits == 1  # a permission error is final: no retry storm against S3
