"""The data chain's outputs on the bundled sample equal those recorded at main before the speed work
(issue 16): the same rows, ids, tokens, labels and split membership, stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

from llmft_assets_tests.data_fingerprints import chain_fingerprints, table_fingerprint

FIXTURE = Path(__file__).parent / "fixtures" / "data_chain_sample_fingerprints.json"


def test_data_chain_outputs_identical_to_recorded(llmft_home: Path) -> None:
    expected = json.loads(FIXTURE.read_text())
    got = chain_fingerprints(llmft_home / "storage")
    assert sorted(got) == sorted(expected)
    assert got["dataset_splits/test.parquet"]["rows"] > 0  # the comparison covers every split
    for name, fingerprint in expected.items():
        assert got[name] == fingerprint, f"{name} changed"


def test_fingerprint_catches_one_changed_label(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b"], "labels": [[1, -100], [2, 3]]})
    pq.write_table(table, tmp_path / "same.parquet", row_group_size=1)
    pq.write_table(table, tmp_path / "relaid.parquet", compression="none")
    planted = table.set_column(1, "labels", pa.array([[1, -100], [2, -100]]))
    pq.write_table(planted, tmp_path / "planted.parquet")
    # Layout and compression do not count; one label does.
    assert table_fingerprint(tmp_path / "same.parquet") == table_fingerprint(tmp_path / "relaid.parquet")
    assert table_fingerprint(tmp_path / "planted.parquet") != table_fingerprint(tmp_path / "same.parquet")
