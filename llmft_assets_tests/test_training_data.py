"""Training data: split loading, token-budget batches, and proof that padding-free batches are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmft_assets.training.data import (
    IGNORE_INDEX,
    PackedCollator,
    PaddedCollator,
    TokenBudgetBatchSampler,
    TokenizedSplit,
    plan_token_budget_batches,
)
from llmft_assets_tests.test_training_support import (  # noqa: F401 - fixtures
    TOKENIZED_SCHEMA,
    tiny_model_dir_fixture,
    write_tokenized_split,
)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    full = [
        {
            "num_tokens": len(row["input_ids"] or []),
            "num_assistant_tokens": 0,
            "truncated": False,
            **row,
        }
        for row in rows
    ]
    pq.write_table(pa.Table.from_pylist(full, schema=TOKENIZED_SCHEMA), path)
    return path


def test_split_keeps_counts_truncates_and_drops_rows_without_labels(tmp_path: Path) -> None:
    path = _write_rows(
        tmp_path / "split.parquet",
        [
            {"id": "ok", "input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
            {"id": "long", "input_ids": list(range(10, 30)), "labels": [-100] * 5 + list(range(15, 30))},
            {"id": "prompt-only", "input_ids": [1, 2, 3], "labels": [-100, -100, -100]},
            {
                "id": "labels-cut-off",
                "input_ids": list(range(10, 30)),
                "labels": [-100] * 12 + list(range(22, 30)),
            },
            {"id": "empty", "input_ids": [], "labels": []},
        ],
    )
    split = TokenizedSplit(path, max_seq_len=10)
    assert split.ids == ["ok", "long"]
    assert split.lengths.tolist() == [4, 10]
    item = split[1]
    assert item["input_ids"].tolist() == list(range(10, 20))
    assert item["labels"].tolist() == [-100] * 5 + list(range(15, 20))
    assert item["row_index"] == 1
    stats = split.stats
    assert (stats.rows_read, stats.rows_used, stats.rows_truncated) == (5, 2, 1)
    assert (stats.rows_dropped_no_labels, stats.rows_dropped_empty) == (2, 1)
    assert stats.tokens == 14 and stats.label_tokens == 2 + 5


def test_split_rejects_malformed_rows_with_a_clear_error(tmp_path: Path) -> None:
    mismatched = _write_rows(
        tmp_path / "mismatch.parquet",
        [
            {"id": "fine", "input_ids": [1, 2], "labels": [1, 2]},
            {"id": "bad-row", "input_ids": [1, 2, 3], "labels": [1, 2]},
        ],
    )
    with pytest.raises(ValueError, match=r"row 1 \(id 'bad-row'\) has 3 input_ids but 2 labels"):
        TokenizedSplit(mismatched, max_seq_len=16)

    nulls = _write_rows(tmp_path / "nulls.parquet", [{"id": "n", "input_ids": None, "labels": None}])
    with pytest.raises(ValueError, match="row 0 has a null"):
        TokenizedSplit(nulls, max_seq_len=16)

    no_labels = tmp_path / "no_labels.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2]], pa.list_(pa.int32()))}), no_labels)
    with pytest.raises(ValueError, match="missing column"):
        TokenizedSplit(no_labels, max_seq_len=16)

    with pytest.raises(FileNotFoundError):
        TokenizedSplit(tmp_path / "absent.parquet", max_seq_len=16)


def test_token_budget_batches_cover_every_row_once_within_budget() -> None:
    lengths = np.random.default_rng(0).lognormal(5.0, 0.8, size=500).clip(8, 1024).astype(int)
    batches = plan_token_budget_batches(lengths, max_tokens=2048, seed=7)
    flat = sorted(index for batch in batches for index in batch)
    assert flat == list(range(500))
    sums = [int(lengths[batch].sum()) for batch in batches]
    assert max(sums) <= 2048
    # all but the few window-tail batches are well filled: that is the point of the budget
    assert np.median(sums) > 0.9 * 2048
    assert plan_token_budget_batches(lengths, 2048, seed=7) == batches
    assert plan_token_budget_batches(lengths, 2048, seed=8) != batches

    padded = plan_token_budget_batches(lengths, max_tokens=4096, seed=7, cost="padded")
    assert all(len(batch) * int(lengths[batch].max()) <= 4096 for batch in padded)
    assert sorted(index for batch in padded for index in batch) == list(range(500))


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    lengths = np.random.default_rng(1).integers(10, 300, size=200)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=600, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert len(epoch0) == len(epoch1) == len(sampler)  # fixed length: needed to resume mid-run
    assert epoch0 != epoch1
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, epoch1))  # same batches, new order
    fresh = TokenBudgetBatchSampler(lengths, max_tokens=600, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == epoch1
    # a row longer than the budget still gets a batch of its own
    assert plan_token_budget_batches([10, 5000, 20], max_tokens=100, seed=0).count([1]) == 1


def test_packed_logits_equal_unpacked_logits_per_sequence(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    model.config.use_cache = False
    rng = np.random.default_rng(0)
    features = []
    for index, length in enumerate([7, 31, 12, 64, 3]):
        ids = rng.integers(3, 1000, length)
        labels = ids.copy()
        labels[: length // 2] = IGNORE_INDEX
        features.append({"input_ids": ids, "labels": labels, "row_index": index})

    batch = PackedCollator()(features)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
    assert batch["row_index"].tolist() == [0, 1, 2, 3, 4]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        offset = 0
        for feature in features:
            length = len(feature["input_ids"])
            alone = model(input_ids=torch.as_tensor(feature["input_ids"])[None]).logits[0]
            torch.testing.assert_close(packed[offset : offset + length], alone, atol=2e-5, rtol=1e-4)
            offset += length

        # the loss matches too: packed per-token mean == pad-to-longest per-token mean
        from transformers import AutoTokenizer

        padded = PaddedCollator(AutoTokenizer.from_pretrained(tiny_model_dir))(features)
        assert padded["labels"].shape == padded["input_ids"].shape
        assert (padded["labels"][padded["attention_mask"] == 0] == IGNORE_INDEX).all()
        packed_loss = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]
        ).loss
        padded_loss = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"]
        ).loss
        torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)


def test_packed_batch_with_a_kv_cache_would_leak_across_sequences(tiny_model_dir: Path) -> None:
    """Why the trainer turns the cache off: with one, sequences attend across their boundaries."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.eval()
    rng = np.random.default_rng(1)
    features = [{"input_ids": rng.integers(3, 1000, n), "labels": rng.integers(3, 1000, n)} for n in (20, 20)]
    batch = PackedCollator()(features)
    with torch.no_grad():
        without_cache = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
        with_cache = model(**{k: batch[k] for k in ("input_ids", "position_ids")}, use_cache=True).logits
    assert (with_cache[0, 20:] - without_cache[0, 20:]).abs().max() > 1e-3


def test_padded_collator_needs_a_pad_token() -> None:
    with pytest.raises(ValueError, match="pad token"):
        PaddedCollator(None)


def test_synthetic_split_loads_with_ids(tmp_path: Path) -> None:
    path = write_tokenized_split(tmp_path / "s.parquet", 20, seed=3, prefix="x")
    split = TokenizedSplit(path, max_seq_len=4096)
    assert len(split) == 20 and split.ids[0] == "x-0"
    assert split.stats.rows_truncated == 0
