"""dataset_splits in Arrow: the same prompts, the same plan and the same rows per split as the per-row path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmft_assets.data.split_tables import first_user_turns, write_splits
from llmft_assets.data.splits import SPLITS, SplitSettings, first_user_turn, plan_leak_free_splits

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def test_first_user_turns_match_the_python_rule_on_edge_cases() -> None:
    conversations = [
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "after system"}],
        [{"role": "assistant", "content": "no user at all"}],
        [{"role": "user", "content": None}, {"role": "user", "content": "second user"}],
        [],
        [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "two"},
        ],
    ]
    column = pa.chunked_array(
        [pa.array(conversations[:2], MESSAGES_TYPE), pa.array(conversations[2:], MESSAGES_TYPE)]
    )
    assert first_user_turns(column) == [first_user_turn(messages) for messages in conversations]
    assert first_user_turns(column) == ["first", "after system", "", "", "", "one"]


def _table(count: int) -> pa.Table:
    prompts = [f"What is {i % 40} plus {i % 7}? Give the answer." for i in range(count)]
    return pa.table(
        {
            "id": [f"row-{i}" for i in range(count)],
            "messages": pa.array([[{"role": "user", "content": p}] for p in prompts], MESSAGES_TYPE),
            "input_ids": pa.array([[i, i + 1] for i in range(count)], pa.list_(pa.int32())),
            "num_tokens": pa.array([2] * count, pa.int32()),
        }
    )


def test_write_splits_puts_each_row_where_the_plan_says_in_order(tmp_path: Path) -> None:
    table = _table(300)
    data_file = tmp_path / "data.parquet"
    pq.write_table(table, data_file)
    settings = SplitSettings(validation_fraction=0.2, test_fraction=0.2)
    out = {split: tmp_path / f"{split}.parquet" for split in SPLITS}
    result = write_splits(data_file, out, table.schema, settings, batch_size=64)

    rows = table.to_pylist()
    expected = plan_leak_free_splits(
        lambda: iter([[(row["id"], first_user_turn(row["messages"])) for row in rows]]),
        validation_fraction=0.2,
        test_fraction=0.2,
        salt=settings.salt,
    )
    assert result.plan.assignments == expected.assignments
    for split in SPLITS:
        want = [row for row, assigned in zip(rows, expected.assignments, strict=True) if assigned == split]
        assert pq.read_table(out[split]).to_pylist() == want
        assert result.rows[split] == len(want) > 0
        assert result.tokens[split] == 2 * len(want)


def test_write_splits_refuses_a_plan_that_does_not_cover_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmft_assets.data.split_tables as split_tables

    table = _table(50)
    data_file = tmp_path / "data.parquet"
    pq.write_table(table, data_file)
    real_plan = split_tables.plan_leak_free_splits

    def short_plan(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        del plan.assignments[-1]
        return plan

    monkeypatch.setattr(split_tables, "plan_leak_free_splits", short_plan)
    out = {split: tmp_path / f"{split}.parquet" for split in SPLITS}
    with pytest.raises(ValueError, match="more rows than the split plan"):
        write_splits(data_file, out, table.schema, SplitSettings(), batch_size=16)


def test_splits_disjoint_reads_first_user_turns_and_fails_on_a_leaked_prompt(tmp_path: Path) -> None:
    from llmft_assets.data.schema import TOKENIZED_SCHEMA
    from llmft_assets.defs.data.checks import splits_disjoint
    from llmft_assets.defs.storage_resources import ArtifactHandle

    def row(row_id: str, prompt: str | None) -> dict:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        return {
            "id": row_id,
            "messages": [*messages, {"role": "assistant", "content": "4"}],
            "content_hash": row_id,
        }

    def check(prompts: dict[str, list[str | None]]) -> Any:
        for name, values in prompts.items():
            rows = [row(f"{name}{i}", prompt) for i, prompt in enumerate(values)]
            schema = pa.schema([TOKENIZED_SCHEMA.field(name) for name in ("id", "messages", "content_hash")])
            table = pa.Table.from_pylist(rows, schema=schema)
            pq.write_table(table, tmp_path / f"{name}.parquet")
        handle = ArtifactHandle("dataset_splits", "v", "file://x", tmp_path, {"rows": {}})
        return splits_disjoint(dataset_splits=handle)

    clean = check(
        {"train": ["What is 2 + 2?", None], "validation": ["Name a prime above 10."], "test": ["Is 9 odd?"]}
    )
    assert clean.passed and clean.metadata["rows"].value == {"train": 2, "validation": 1, "test": 1}
    leaked = check({"train": ["What is 2 + 2?"], "validation": ["what is  2 + 2?"], "test": ["Is 9 odd?"]})
    assert not leaked.passed and leaked.metadata["shared_problem_keys"].value == 1
