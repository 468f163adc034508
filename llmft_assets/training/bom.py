"""Bill of materials for a trained adapter: what went in, so the adapter can be reproduced and audited.

Pure: no Dagster import; library versions are read from package metadata, not by importing them.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from llmft_assets.training.config import TrainingConfig
from llmft_assets.training.licenses import UNKNOWN

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


def portable_uri(uri: str) -> str:
    """A storage URI without the build machine's paths: ``s3://`` URIs as they are, a local storage path
    as its part from ``assets/`` or ``checkpoints/`` on (what is the same on every machine)."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    parts = PurePosixPath(uri.removeprefix("file://")).parts
    for marker in ("assets", "checkpoints"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) :])
    return PurePosixPath(uri).name


def portable_model_id(model_id: str) -> str:
    """A hub id as it is; a local directory as ``local:<folder name>`` (its absolute path stays home)."""
    if model_id.startswith(("/", "~", ".")) or "\\" in model_id:
        return f"local:{PurePosixPath(model_id).name}"
    return model_id


def make_adapter_config_portable(adapter_dir: Path, base_model_id: str) -> None:
    """Set ``base_model_name_or_path`` in the adapter's ``adapter_config.json`` to the base model's portable id.

    peft records the folder the base model was loaded from, a path on the build machine, which would then
    travel into MLflow, the bento and every copy of the adapter.
    """
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = portable_model_id(base_model_id)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _portable_base_info(info: dict[str, Any]) -> dict[str, Any]:
    portable = {key: value for key, value in info.items() if key != "path"}
    if isinstance(portable.get("model_id"), str):
        portable["model_id"] = portable_model_id(portable["model_id"])
    if isinstance(portable.get("artifact_uri"), str):
        portable["artifact_uri"] = portable_uri(portable["artifact_uri"])
    return portable


def bill_of_materials(
    *,
    base_model_info: dict[str, Any],
    dataset_version: str,
    dataset: dict[str, Any] | None,
    config: TrainingConfig,
    seed: int,
    code_version: str | None = None,
    dataset_asset: str = "dataset_splits",
) -> dict[str, Any]:
    """The adapter's bill of materials (JSON-able, with no absolute path of the build machine).

    `base_model_info` is what the caller knows of the base model: id, revision, licence, tokenizer and
    chat-template hashes. `dataset` is what the data chain recorded of the source: source, config,
    licence and where the licence came from; None (an artifact made before that was recorded) gives
    licence ``unknown``, never a guessed one. `dataset_asset` is the dataset asset `dataset_version` is a
    version of (dataset_splits, retraining_dataset, sharded_dataset_splits). `code_version` defaults to
    the git commit or package version.
    """
    if not dataset_version:
        raise ValueError("dataset_version must name the exact dataset artifact version")
    if not isinstance(base_model_info, dict) or not base_model_info:
        raise ValueError("base_model_info must be a non-empty dict (at least the base model id)")
    base = _portable_base_info(base_model_info)
    base.setdefault("license", UNKNOWN)
    base.setdefault("license_source", "not recorded with the base model")
    recorded = dict(dataset or {})
    source = recorded.get("source")
    if isinstance(source, str) and source.startswith(("/", "~", ".", "file://")):
        recorded["source"] = f"local:{PurePosixPath(source).name}"
    return {
        "schema_version": BOM_SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "base_model": base,
        "dataset": {
            "asset": dataset_asset,
            "version": dataset_version,
            "source": recorded.get("source", UNKNOWN),
            "config": recorded.get("config"),
            "license": recorded.get("license") or UNKNOWN,
            "license_source": recorded.get("license_source") or "not recorded with the dataset",
        },
        "training_config": config.model_dump(mode="json"),
        "method": "qlora" if config.qlora else "lora",
        "seed": int(seed),
        "code_version": code_version or detect_code_version(),
        "libraries": {name: _package_version(name) for name in _LIBRARIES},
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
