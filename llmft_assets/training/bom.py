"""Bill of materials for a trained adapter: what went in, so the adapter can be reproduced and audited.

Pure: no Dagster import; library versions are read from package metadata, not by importing them.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from llmft_assets.training.config import TrainingConfig

BOM_FILENAME = "bill_of_materials.json"
BOM_SCHEMA_VERSION = "1"
_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "tokenizers", "llmft")


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def detect_code_version(repo_dir: Path | None = None) -> str:
    """`git:<commit>[-dirty]` when the code runs from a git checkout, else `llmft==<package version>`."""
    cwd = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"llmft=={_package_version('llmft') or 'unknown'}"
    if not commit:
        return f"llmft=={_package_version('llmft') or 'unknown'}"
    return f"git:{commit}{'-dirty' if status else ''}"


def bill_of_materials(
    *,
    base_model_info: dict[str, Any],
    dataset_version: str,
    dataset_license: str = "CC-BY-NC-SA-4.0",
    config: TrainingConfig,
    seed: int,
    code_version: str | None = None,
) -> dict[str, Any]:
    """The adapter's bill of materials (JSON-able).

    `base_model_info` is what the caller knows of the base model: id, revision, tokenizer and
    chat-template hashes (kept verbatim). `code_version` defaults to the git commit or package version.
    """
    if not dataset_version:
        raise ValueError("dataset_version must name the exact dataset artifact version")
    if not isinstance(base_model_info, dict) or not base_model_info:
        raise ValueError("base_model_info must be a non-empty dict (at least the base model id)")
    return {
        "schema_version": BOM_SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "base_model": dict(base_model_info),
        "dataset": {"version": dataset_version, "license": dataset_license},
        "training_config": config.model_dump(mode="json"),
        "method": "qlora" if config.qlora else "lora",
        "seed": int(seed),
        "code_version": code_version or detect_code_version(),
        "libraries": {name: _package_version(name) for name in _LIBRARIES},
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
