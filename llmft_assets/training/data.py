"""Training data: tokenized split Parquet -> torch Dataset, token-budget batches, collators.

The fast path is padding-free: a micro-batch is one row of concatenated sequences with `position_ids`
restarting at every sequence (transformers' `DataCollatorWithFlattening`). It is exact only when the
model builds no KV cache and receives no attention mask (then transformers derives the block-diagonal
mask from `position_ids`), so the collator output never carries `attention_mask` and the trainer sets
`model.config.use_cache = False`.

Micro-batches are formed by a token budget: rows are shuffled with the seed, sorted by length inside
windows of a few batches, and cut greedily so every micro-batch carries about the same number of
tokens. Batch composition is fixed for the run (computed once from the seed) and only the order of the
batches is reshuffled every epoch: the number of batches per epoch must not change between epochs,
because the Trainer resumes by skipping `global_step % steps_per_epoch` batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("input_ids", "labels")


@dataclass(frozen=True)
class SplitStats:
    """What loading a split kept and dropped, so nothing is lost silently."""

    path: str
    rows_read: int
    rows_used: int
    rows_truncated: int
    rows_dropped_no_labels: int
    rows_dropped_empty: int
    tokens: int
    label_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TokenizedSplit:
    """A tokenized split (see docs/architecture.md) held as flat int32 arrays plus offsets.

    Items are `{"input_ids": int64 array, "labels": int64 array, "row_index": int}`; `row_index`
    indexes `self.ids`. Rows longer than `max_seq_len` are cut (and counted); rows without any
    assistant token left are dropped (and counted); malformed rows raise a ValueError naming the row.
    """

    def __init__(self, path: Path, max_seq_len: int, batch_rows: int = 8192) -> None:
        import pyarrow.compute as pc

        from llmft_assets.storage.tables import open_parquet

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"tokenized split not found: {self.path}")
        parquet = open_parquet(self.path)
        names = set(parquet.schema_arrow.names)
        missing = [column for column in REQUIRED_COLUMNS if column not in names]
        if missing:
            raise ValueError(f"{self.path}: missing column(s) {missing}; found {sorted(names)}")
        columns = [*REQUIRED_COLUMNS, *(["id"] if "id" in names else [])]

        input_chunks: list[np.ndarray] = []
        label_chunks: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        ids: list[str] = []
        rows_read = truncated = dropped_no_labels = dropped_empty = 0
        flat_offset = 0
        # stream row groups so a large split never needs a second full copy in Arrow form
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            input_col = batch.column("input_ids")
            label_col = batch.column("labels")
            if input_col.null_count or label_col.null_count:
                bad = rows_read + _first_null(input_col, label_col)
                raise ValueError(f"{self.path}: row {bad} has a null input_ids or labels")
            input_lengths = pc.list_value_length(input_col).to_numpy(zero_copy_only=False)
            label_lengths = pc.list_value_length(label_col).to_numpy(zero_copy_only=False)
            batch_ids = (
                [str(value) for value in batch.column("id").to_pylist()]
                if "id" in columns
                else [str(rows_read + index) for index in range(batch.num_rows)]
            )
            mismatched = np.nonzero(input_lengths != label_lengths)[0]
            if mismatched.size:
                row = int(mismatched[0])
                raise ValueError(
                    f"{self.path}: row {rows_read + row} (id {batch_ids[row]!r}) has "
                    f"{input_lengths[row]} input_ids but {label_lengths[row]} labels"
                )
            flat_inputs = input_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            flat_labels = label_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            row_starts = np.concatenate([[0], np.cumsum(input_lengths)[:-1]]).astype(np.int64)
            kept_lengths = np.minimum(input_lengths, max_seq_len).astype(np.int64)
            for row in range(batch.num_rows):
                length = int(kept_lengths[row])
                if length == 0:
                    dropped_empty += 1
                    continue
                start = int(row_starts[row])
                if not np.any(flat_labels[start : start + length] != IGNORE_INDEX):
                    dropped_no_labels += 1
                    continue
                truncated += int(input_lengths[row] > max_seq_len)
                starts.append(np.int64(flat_offset + start))
                lengths.append(np.int64(length))
                ids.append(batch_ids[row])
            input_chunks.append(flat_inputs)
            label_chunks.append(flat_labels)
            flat_offset += len(flat_inputs)
            rows_read += batch.num_rows

        self._input_ids = np.concatenate(input_chunks) if input_chunks else np.zeros(0, np.int32)
        self._labels = np.concatenate(label_chunks) if label_chunks else np.zeros(0, np.int32)
        self._starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.ids = ids
        label_tokens = sum(
            int(np.count_nonzero(self._labels[start : start + length] != IGNORE_INDEX))
            for start, length in zip(self._starts, self.lengths, strict=True)
        )
        self.stats = SplitStats(
            path=str(self.path),
            rows_read=rows_read,
            rows_used=len(ids),
            rows_truncated=truncated,
            rows_dropped_no_labels=dropped_no_labels,
            rows_dropped_empty=dropped_empty,
            tokens=int(self.lengths.sum()),
            label_tokens=label_tokens,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = int(self._starts[index])
        end = start + int(self.lengths[index])
        return {
            "input_ids": self._input_ids[start:end].astype(np.int64),
            "labels": self._labels[start:end].astype(np.int64),
            "row_index": int(index),
        }


def _first_null(*columns: Any) -> int:
    for column in columns:
        mask = column.is_null().to_numpy(zero_copy_only=False)
        if mask.any():
            return int(np.argmax(mask))
    return 0


def as_torch_dataset(split: TokenizedSplit) -> torch.utils.data.Dataset:
    """Wrap a split as a `torch.utils.data.Dataset` (the Trainer checks the type for some paths)."""
    from torch.utils.data import Dataset

    class _SplitDataset(Dataset):
        def __init__(self, inner: TokenizedSplit) -> None:
            self.inner = inner
            self.lengths = inner.lengths
            self.ids = inner.ids

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, index: int) -> dict[str, Any]:
            return self.inner[index]

    return _SplitDataset(split)


def plan_token_budget_batches(
    lengths: Sequence[int] | np.ndarray,
    max_tokens: int,
    seed: int,
    window_batches: int = 16,
    cost: Literal["sum", "padded"] = "sum",
) -> list[list[int]]:
    """Cut row indices into micro-batches of at most `max_tokens` (deterministic by `seed`).

    `cost="sum"` budgets real tokens (padding-free batches); `cost="padded"` budgets
    rows x longest row (pad-to-longest batches). A row longer than the budget gets a batch alone.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    mean_length = max(1.0, float(lengths.mean()))
    rows_per_batch = max(1, int(max_tokens // mean_length))
    window = max(1, rows_per_batch * window_batches)
    # sort longest-first inside each window: neighbours have similar lengths, so greedy cuts waste little
    sorted_order = np.concatenate(
        [
            chunk[np.argsort(-lengths[chunk], kind="stable")]
            for chunk in np.array_split(order, max(1, -(-len(order) // window)))
        ]
    )
    batches: list[list[int]] = []
    current: list[int] = []
    current_sum = 0
    current_max = 0
    for index in sorted_order.tolist():
        length = int(lengths[index])
        if cost == "sum":
            fits = current_sum + length <= max_tokens
        else:
            fits = (len(current) + 1) * max(current_max, length) <= max_tokens
        if current and not fits:
            batches.append(current)
            current, current_sum, current_max = [], 0, 0
        current.append(index)
        current_sum += length
        current_max = max(current_max, length)
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatchSampler:
    """A batch sampler over fixed token-budget batches whose order is reshuffled every epoch.

    `set_epoch` is called by the Trainer (and by `EpochSyncCallback` as a fallback for wrapped
    samplers); the order of epoch `e` depends only on `(seed, e)`, so a resumed run replays it.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        seed: int,
        window_batches: int = 16,
        cost: Literal["sum", "padded"] = "sum",
        shuffle: bool = True,
    ) -> None:
        self.batches = plan_token_budget_batches(lengths, max_tokens, seed, window_batches, cost)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.batch_size = None  # variable-size batches (accelerate's sharding reads this)
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            yield from (list(batch) for batch in self.batches)
            return
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.batches))
        for index in order.tolist():
            yield list(self.batches[index])


class PackedCollator:
    """Padding-free collation: one row of concatenated sequences, `position_ids` restarting per sequence.

    Wraps transformers' `DataCollatorWithFlattening`; adds `row_index` (popped by the trainer before
    the forward pass) and guarantees that no `attention_mask` reaches the model.
    """

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self._flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch.pop("attention_mask", None)
        if "row_index" in features[0]:
            batch["row_index"] = torch.tensor([int(f["row_index"]) for f in features], dtype=torch.long)
        return batch


class PaddedCollator:
    """Pad-to-longest collation (`DataCollatorForSeq2Seq`, labels padded with -100)."""

    def __init__(self, tokenizer: Any, pad_token_id: int | None = None) -> None:
        from transformers import DataCollatorForSeq2Seq

        if tokenizer is None and pad_token_id is not None:
            tokenizer = _pad_only_tokenizer(pad_token_id)
        if tokenizer is None or getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "packing=False needs a pad token: a tokenizer with one in the base model directory "
                "or pad_token_id in its config.json"
            )
        self._pad = DataCollatorForSeq2Seq(
            tokenizer=tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest", return_tensors="pt"
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self._pad(
            [
                {"input_ids": _as_int_list(f["input_ids"]), "labels": _as_int_list(f["labels"])}
                for f in features
            ]
        )
        batch = dict(batch)
        if "row_index" in features[0]:
            batch["row_index"] = torch.tensor([int(f["row_index"]) for f in features], dtype=torch.long)
        return batch


def _pad_only_tokenizer(pad_token_id: int) -> Any:
    """A tokenizer that knows only its pad token: enough for the padding collator of a bare model."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<unused{index}>": index for index in range(pad_token_id)} | {"<pad>": pad_token_id}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>"
    )


def _as_int_list(values: Any) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else [int(value) for value in values]
