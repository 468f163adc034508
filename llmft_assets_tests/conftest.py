"""Shared fixtures: an isolated LLMFT_HOME per test and a real S3-compatible server on loopback.

The whole session runs with its own homes: before any test module is imported, LLMFT_HOME, DAGSTER_HOME,
BENTOML_HOME (and MLflow's default under LLMFT_HOME) point into a temporary folder, and every subprocess
inherits them. The checkout's own `.llmft/` (the demo's storage, MLflow, Dagster home and BentoML store)
is hashed at the start and at the end; a session that changed it fails, loudly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmft_assets_tests.servers import moto_server

CHECKOUT_HOME_NAME = ".llmft"  # under pytest's rootdir: the checkout's own working root
# Variables that name a user's store; the session replaces them before anything reads them.
SESSION_HOME_DIRS = {"LLMFT_HOME": "", "DAGSTER_HOME": "dagster_home", "BENTOML_HOME": "bentoml"}
_SESSION_HOME = pytest.StashKey[Path]()
_CHECKOUT_DIGEST = pytest.StashKey[str]()
SESSION_UNSET = ("LLMFT_STORAGE", "MLFLOW_TRACKING_URI", "LLMFT_MODEL_DIR", "LLMFT_BENTO_MODEL")


def tree_digest(root: Path) -> str:
    """sha256 over every path, file content and link target under `root` ("absent" when missing)."""
    if not root.exists():
        return "absent"
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            if path.is_symlink():
                digest.update(b"L" + os.readlink(path).encode())
            elif path.is_file():
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            digest.update(b"\n")
    return digest.hexdigest()


def pytest_configure(config: pytest.Config) -> None:
    session_home = Path(tempfile.mkdtemp(prefix="llmft-test-session-"))
    for variable, sub in SESSION_HOME_DIRS.items():
        path = session_home / sub if sub else session_home
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)
    for variable in SESSION_UNSET:
        os.environ.pop(variable, None)
    config.stash[_SESSION_HOME] = session_home
    config.stash[_CHECKOUT_DIGEST] = tree_digest(config.rootpath / CHECKOUT_HOME_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    session_home = config.stash.get(_SESSION_HOME, None)
    if session_home is not None:
        shutil.rmtree(session_home, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_CHECKOUT_DIGEST, None)
    if before is None:
        return
    checkout_home = session.config.rootpath / CHECKOUT_HOME_NAME
    after = tree_digest(checkout_home)
    if after != before:
        message = (
            f"\n\n!!! The test session changed the checkout's {checkout_home} (tree sha256 {before[:12]} -> "
            f"{after[:12]}): a test wrote into the user's storage, MLflow, Dagster home or BentoML store !!!\n"
        )
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


S3_TEST_ENV = {
    # moto accepts any credentials; these are obviously fake and exist only for the test server.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def llmft_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "llmft_home"
    home.mkdir()
    monkeypatch.setenv("LLMFT_HOME", str(home))
    monkeypatch.delenv("LLMFT_STORAGE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One moto_server process for the session; tests use their own bucket names."""
    saved = {key: os.environ.get(key) for key in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    try:
        with moto_server() as endpoint:
            yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the test server with AWS_ENDPOINT_URL pointing at it; returns its name."""
    import re

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for key, value in S3_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
