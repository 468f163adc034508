"""Shared fixtures: an isolated LLMFT_HOME per test and a real S3-compatible server on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmft_assets_tests.servers import moto_server

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
