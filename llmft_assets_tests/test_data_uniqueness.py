"""The exact uniqueness check in Arrow: passes unique ids, names every repeated one."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llmft_assets.data.uniqueness import duplicated_values


def _file(tmp_path: Path, ids: list[str | None]) -> Path:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": ids, "other": list(range(len(ids)))}), path, row_group_size=3)
    return path


def test_unique_ids_pass(tmp_path: Path) -> None:
    assert duplicated_values(_file(tmp_path, [f"id-{i}" for i in range(10)]), "id") == (10, 0, [])


def test_repeated_ids_are_counted_across_row_groups(tmp_path: Path) -> None:
    ids = ["a", "b", "c", "d", "a", "e", "b", "f", "b", "g"]
    assert duplicated_values(_file(tmp_path, ids), "id") == (10, 2, ["a", "b"])
    assert duplicated_values(_file(tmp_path, ids), "id", max_examples=1) == (10, 2, ["a"])
