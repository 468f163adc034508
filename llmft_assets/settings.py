"""Environment -> typed settings. Every variable the project reads is named here (and in .env.example)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "LLMFT_HOME"  # local working root: storage (default), caches, embedded MLflow, Dagster home
ENV_STORAGE = "LLMFT_STORAGE"  # storage root: a local path or s3://bucket/prefix
ENV_BASE_MODEL = "LLMFT_BASE_MODEL"  # "tiny" (default) or a hub id / local path
ENV_MLFLOW_URI = "MLFLOW_TRACKING_URI"
ENV_API_KEY = "LLMFT_API_KEY"
ENV_API_KEY_FILE = "LLMFT_API_KEY_FILE"
ENV_ALERT_WEBHOOK = "LLMFT_ALERT_WEBHOOK_URL"
ENV_LICENSE_POLICY = "LLMFT_LICENSE_POLICY"  # "commercial" or allowed licences "apache-2.0,mit" (unset: any)


def llmft_home() -> Path:
    """The local working root; `./.llmft` of the current directory unless LLMFT_HOME says otherwise."""
    return Path(os.environ.get(ENV_HOME) or Path.cwd() / ".llmft").expanduser().resolve()


def storage_root() -> str:
    """The artifact storage root as a URI-ish string: an absolute local path or `s3://bucket/prefix`."""
    configured = os.environ.get(ENV_STORAGE, "").strip()
    if not configured:
        return str(llmft_home() / "storage")
    if configured.startswith("s3://"):
        return configured.rstrip("/")
    if configured.startswith("file://"):
        configured = configured[len("file://") :]
    if "://" in configured:
        raise ValueError(
            f"{ENV_STORAGE}={configured!r}: unsupported scheme; use a local path or s3://bucket/prefix"
        )
    return str(Path(configured).expanduser().resolve())


def cache_dir(*parts: str) -> Path:
    path = llmft_home().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
