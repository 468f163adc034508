"""Content fingerprints of every table the data chain publishes, to prove a change keeps its outputs.

A fingerprint is, per published Parquet file, the row count and a sha256 per column over the column's
values in row order (canonical JSON): file bytes, compression and row-group layout may change, the
rows, ids, tokens, labels and split membership may not.

    PYTHONPATH=. python -m llmft_assets_tests.data_fingerprints OUT.json   # regenerate (at main)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# The whole bundled sample (v0 + v1), a sequence limit that truncates some rows, splits big enough to
# have near-duplicate groups in every split.
SAMPLE_RUN_CONFIG: dict[str, Any] = {
    "ops": {
        "raw_dataset": {"config": {"source": "sample", "config": "all", "batch_size": 500}},
        "base_model": {"config": {"pretrain_steps": 0}},
        "tokenized_dataset": {"config": {"max_seq_len": 512, "batch_size": 300}},
        "dataset_splits": {"config": {"validation_fraction": 0.1, "test_fraction": 0.1}},
    }
}
FINGERPRINTED_ASSETS = (
    "raw_dataset",
    "cleaned_dataset",
    "validated_dataset",
    "tokenized_dataset",
    "dataset_splits",
)


def table_fingerprint(path: Path) -> dict[str, Any]:
    table = pq.read_table(path)
    columns = {}
    for name in sorted(table.column_names):
        digest = hashlib.sha256()
        for value in table.column(name).to_pylist():
            digest.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode() + b"\n")
        columns[name] = digest.hexdigest()
    return {"rows": table.num_rows, "columns": columns}


def chain_fingerprints(storage_root: Path) -> dict[str, dict[str, Any]]:
    """Materialize the data assets on the bundled sample into `storage_root`; fingerprint what they published."""
    import dagster as dg

    from llmft_assets.definitions import DATA_ASSETS, build_resources
    from llmft_assets.storage import open_storage
    from llmft_assets.storage.publish import fetch_artifact

    result = dg.materialize(
        DATA_ASSETS,
        resources=build_resources(),
        run_config=SAMPLE_RUN_CONFIG,
        instance=dg.DagsterInstance.ephemeral(),
    )
    if not result.success:
        raise RuntimeError("the data chain failed on the bundled sample")
    backend = open_storage(str(storage_root))
    fingerprints: dict[str, dict[str, Any]] = {}
    for asset in FINGERPRINTED_ASSETS:
        artifact, folder = fetch_artifact(backend, f"assets/{asset}", storage_root / "_cache")
        for entry in artifact.files:
            if entry.path.endswith(".parquet"):
                fingerprints[f"{asset}/{entry.path}"] = table_fingerprint(folder / entry.path)
    return fingerprints


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="llmft-fingerprint-"))
    # A throwaway home: never the user's .llmft/.
    os.environ["LLMFT_HOME"] = str(home)
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    (home / "dagster").mkdir()
    for variable in ("LLMFT_STORAGE", "MLFLOW_TRACKING_URI"):
        os.environ.pop(variable, None)
    fingerprints = chain_fingerprints(home / "storage")
    Path(sys.argv[1]).write_text(json.dumps(fingerprints, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
