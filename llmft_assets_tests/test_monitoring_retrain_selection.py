"""Drift-targeted selection: the pool rows nearest to the traffic, test problems never taken, the traffic
slice held out, the mix ratio kept, bad rows counted (pure; the bundled generator's two families)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from llmft_assets.data.cleaning import to_conversation
from llmft_assets.data.sample_gen import generate_rows
from llmft_assets.data.schema import CONVERSATION_SCHEMA
from llmft_assets.data.splits import problem_key
from llmft_assets.monitoring.retrain_selection import (
    SelectionSettings,
    first_user_prompts,
    iter_batches,
    mix_with_training,
    problem_keys,
    select_for_traffic,
    topic_text,
)


def conversations(n: int, *, family: str, seed: int, schema: str = "v1") -> list[dict[str, Any]]:
    return [to_conversation(row) for row in generate_rows(n, schema=schema, seed=seed, family=family)]  # type: ignore[arg-type]


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict[str, Any]]]:
    arithmetic = conversations(900, family="arithmetic", seed=1)
    word = conversations(240, family="word", seed=1)
    return {
        "pool_common": arithmetic[:800],
        "pool_rare": word[:60],  # 7% of the pool: the rare kind
        "train": arithmetic[800:],
        "traffic": [
            row["messages"][0]["content"] for row in conversations(120, family="word", seed=9, schema="v0")
        ],
    }


def ids_of(result_table: pa.Table) -> set[str]:
    return set(result_table.column("id").to_pylist())


def test_the_rare_kind_users_now_ask_for_is_selected_first(data: dict[str, Any]) -> None:
    pool = table(data["pool_common"] + data["pool_rare"])
    settings = SelectionSettings(target_rows=60, traffic_slice_fraction=0.25, min_similarity=0.2)
    selection = select_for_traffic(
        data["traffic"], iter_batches(pool, 128), excluded_keys=set(), settings=settings
    )
    rare = {row["id"] for row in data["pool_rare"]}
    chosen = ids_of(selection.training_rows) | ids_of(selection.traffic_slice)
    stats = selection.stats
    assert stats.pool_rows == 860
    # 7% of the pool, at least 90% of what was selected ("find the sum of a and b" is a little like the
    # word problems that ask for a sum of integers).
    assert len(chosen & rare) >= 0.9 * len(chosen) and len(chosen & rare) >= 50
    assert stats.selected_rows == len(chosen) == stats.training_rows + stats.traffic_slice_rows
    assert 0 < stats.traffic_slice_rows < stats.training_rows
    assert ids_of(selection.training_rows).isdisjoint(ids_of(selection.traffic_slice))
    assert sum(c.selected for c in stats.clusters) == stats.selected_rows
    assert sum(c.quota for c in stats.clusters) == 60
    assert sum(stats.histogram_pool) == 860 and sum(stats.histogram_selected) == stats.selected_rows
    # The additions score below 0.3 (below 0.2 for those sharing no word with a word problem); the
    # selected rows are all above min_similarity.
    assert sum(stats.histogram_pool[:3]) >= 780 and stats.below_min_similarity >= 300
    assert sum(stats.histogram_selected[:2]) == 0
    assert all(selection.similarity[i] >= 0.2 for i in chosen)


def test_the_result_does_not_depend_on_batch_size(data: dict[str, Any]) -> None:
    pool = table(data["pool_common"] + data["pool_rare"])
    settings = SelectionSettings(target_rows=30)
    small = select_for_traffic(data["traffic"], iter_batches(pool, 7), excluded_keys=set(), settings=settings)
    whole = select_for_traffic(
        data["traffic"], iter_batches(pool, 10_000), excluded_keys=set(), settings=settings
    )
    assert small.training_rows.column("id").to_pylist() == whole.training_rows.column("id").to_pylist()
    assert small.stats == whole.stats


def test_a_problem_in_a_test_split_is_never_selected(data: dict[str, Any]) -> None:
    test_rows = data["pool_rare"][:10]
    # The same problems again under other ids and with other whitespace/case: the normalized key matches.
    twins = [
        {
            **row,
            "id": f"twin-{i}",
            "messages": [{"role": "user", "content": "  " + row["messages"][0]["content"].upper()}],
        }
        for i, row in enumerate(test_rows)
    ]
    pool = table(data["pool_rare"] + twins)
    excluded = problem_keys(iter_batches(table(test_rows), 4))
    assert excluded == {problem_key(row["messages"], row["id"]) for row in test_rows}
    selection = select_for_traffic(
        data["traffic"],
        iter_batches(pool, 16),
        excluded_keys=excluded,
        settings=SelectionSettings(target_rows=200),
    )
    chosen = ids_of(selection.training_rows) | ids_of(selection.traffic_slice)
    assert chosen.isdisjoint({row["id"] for row in test_rows} | {row["id"] for row in twins})
    assert selection.stats.dropped_in_test_split == 20
    assert len(chosen) == 50


def test_rows_without_a_prompt_and_repeated_problems_are_counted_not_selected(data: dict[str, Any]) -> None:
    rare = data["pool_rare"][:20]
    no_user = {**rare[0], "id": "no-user", "messages": [{"role": "assistant", "content": "hello"}]}
    empty = {**rare[0], "id": "empty", "messages": []}
    repeat = {**rare[1], "id": "repeat"}
    pool = table([*rare, no_user, empty, repeat])
    selection = select_for_traffic(
        data["traffic"],
        iter_batches(pool, 5),
        excluded_keys=set(),
        settings=SelectionSettings(target_rows=100),
    )
    stats = selection.stats
    assert (stats.pool_rows, stats.dropped_without_prompt, stats.dropped_duplicate_problem) == (23, 2, 1)
    assert ids_of(selection.training_rows) | ids_of(selection.traffic_slice) == {row["id"] for row in rare}


def test_no_traffic_and_bad_settings_are_clear_errors(data: dict[str, Any]) -> None:
    pool = table(data["pool_rare"])
    with pytest.raises(ValueError, match="no non-empty prompt"):
        select_for_traffic(["", "   "], iter_batches(pool, 10), excluded_keys=set())
    with pytest.raises(ValueError, match=r"pool batch has no \['messages'\] column"):
        select_for_traffic(
            data["traffic"], iter_batches(pool.drop_columns(["messages"]), 10), excluded_keys=set()
        )
    with pytest.raises(ValueError, match="mix_ratio"):
        SelectionSettings(mix_ratio=0)
    with pytest.raises(ValueError, match="traffic_slice_fraction"):
        SelectionSettings(traffic_slice_fraction=1.0)


def test_mixing_keeps_the_ratio_and_holds_the_slice_out_of_training(data: dict[str, Any]) -> None:
    pool = table(data["pool_common"][:50] + data["pool_rare"])
    settings = SelectionSettings(
        target_rows=40, mix_ratio=0.25, traffic_slice_fraction=0.3, min_similarity=0.2
    )
    selection = select_for_traffic(
        data["traffic"], iter_batches(pool, 32), excluded_keys=set(), settings=settings
    )
    slice_row = selection.traffic_slice.slice(0, 1).to_pylist()[0]
    # The current training split holds one slice problem (under another id): it leaves the slice.
    current = data["train"] + [{**slice_row, "id": "already-trained"}]
    mixed = mix_with_training(selection, iter_batches(table(current), 16), settings=settings)
    selected = selection.stats.training_rows
    assert mixed.current_rows_kept == 3 * selected  # 25% selected, 75% current training rows
    assert mixed.train.num_rows == 4 * selected
    assert mixed.current_rows_read == len(current)
    assert mixed.current_rows_in_slice == 1
    assert slice_row["id"] not in ids_of(mixed.traffic_slice)
    assert mixed.traffic_slice.num_rows == selection.traffic_slice.num_rows - 1
    assert ids_of(mixed.train).isdisjoint(ids_of(mixed.traffic_slice))
    again = mix_with_training(selection, iter_batches(table(current), 5), settings=settings)
    assert again.train.column("id").to_pylist() == mixed.train.column("id").to_pylist()  # deterministic


def test_prompts_come_from_the_first_user_turn_and_numbers_do_not_matter() -> None:
    rows = pa.Table.from_pylist(
        [
            {"id": "a", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}]},
            {"id": "b", "messages": []},
            {"id": "c", "messages": [{"role": "user", "content": "Only"}]},
        ]
    )  # fmt: skip
    assert first_user_prompts(rows) == ["Q1", None, "Only"]
    assert topic_text("What is  12 + 7.5?") == topic_text("what is 3 + 40?") == "what is # + #?"
