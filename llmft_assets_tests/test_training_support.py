"""Shared fixtures for the training tests: a tiny chat model and synthetic tokenized splits.

The training code only needs `input_ids`/`labels`, so the splits are synthetic token ids in the
tiny model's vocabulary with the prompt part of every row masked to -100, in the tokenized schema of
docs/architecture.md. Imported by the other `test_training_*` modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TOKENIZED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("num_assistant_tokens", pa.int32()),
        ("truncated", pa.bool_()),
    ]
)


def write_tokenized_split(
    path: Path,
    n_rows: int,
    *,
    vocab_size: int = 1000,
    min_len: int = 16,
    max_len: int = 160,
    seed: int = 0,
    prefix: str = "row",
) -> Path:
    """Rows of random token ids; the first 20-60% of each row is 'prompt' (labels -100)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_rows):
        length = int(rng.integers(min_len, max_len + 1))
        input_ids = rng.integers(3, vocab_size, length).astype(np.int32)
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        labels = input_ids.copy()
        labels[:prompt] = -100
        rows.append(
            {
                "id": f"{prefix}-{index}",
                "input_ids": input_ids.tolist(),
                "labels": labels.tolist(),
                "num_tokens": length,
                "num_assistant_tokens": length - prompt,
                "truncated": False,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA), path)
    return path


@pytest.fixture(scope="session", name="tiny_model_dir")
def tiny_model_dir_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's tiny Qwen2 chat model (random init, with tokenizer), built once per session."""
    from llmft_assets.modeling.tiny_model import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny_model") / "model", pretrain_steps=0, use_cache=False
    )


@pytest.fixture(scope="session", name="tiny_splits")
def tiny_splits_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("splits")
    return {
        "train": write_tokenized_split(root / "train.parquet", 48, seed=1, prefix="train"),
        "validation": write_tokenized_split(root / "validation.parquet", 8, seed=2, prefix="val"),
    }
