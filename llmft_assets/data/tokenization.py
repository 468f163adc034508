"""Tokenization with assistant-only labels, by prompt-prefix masking over the tokenizer's own template.

For every assistant turn k the conversation up to turn k is rendered with ``add_generation_prompt=True``;
that rendering must be a prefix of the full rendering, and everything up to its end is prompt. The turn's
labelled span runs from there to the end of the template's end-of-turn marker (``<|im_end|>`` for
ChatML), found in the rendering of the turns up to and including k. This works with any template that
renders earlier turns unchanged (ChatML, Llama 3, ...) and needs no ``{% generation %}`` markup.

Speed: texts are rendered with ``tokenize=False`` for the whole batch, then tokenized in one call of the
fast (Rust) tokenizer. For a byte-level BPE tokenizer (GPT-2, Qwen, Llama 3: every token stands for a
fixed run of the text's bytes) the encode skips offsets (``encode_batch_fast``) and character spans
become token spans through the cumulative byte lengths of the ids; otherwise, or for any text where the
byte lengths do not add up, through the encodings' ``char_to_token`` (the same token indices).
Each sequence ends right after the final assistant turn's end marker (the template's trailing newline
is dropped: it is never a label, so it is only padding).
"""

from __future__ import annotations

import contextlib
import json
import unicodedata
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from llmft_assets.data.schema import (
    CONVERSATION_COLUMNS,
    CONVERSATION_SCHEMA,
    IGNORE_INDEX,
    TOKENIZED_SCHEMA,
    StageCounts,
)

STAGE = "tokenized"
_SENTINEL = "\u2063llmft-end-probe\u2063"
# Rows per call of the Rust tokenizer: enough to keep every core busy, small enough to bound memory.
ENCODE_CHUNK_ROWS = 256
Spans = list[list[tuple[int, int]]]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used for prompt-prefix masking."""


def assistant_end_marker(tokenizer: Any) -> str:
    """The text the chat template puts after an assistant turn's content (e.g. ``<|im_end|>``)."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    if _SENTINEL not in rendered:
        raise ChatTemplateError("the chat template does not render assistant content verbatim")
    marker = rendered[rendered.rindex(_SENTINEL) + len(_SENTINEL) :].strip()
    if not marker:
        raise ChatTemplateError("the chat template puts no end-of-turn marker after an assistant turn")
    return marker


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenize_batch needs a fast (Rust) tokenizer for batched encoding with offsets")
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the tokenizer has no chat_template")


def _messages_of(row: dict[str, Any]) -> list[dict[str, str]]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {row.get('id')!r}: messages must be a non-empty list")
    try:
        return [{"role": message["role"], "content": message["content"]} for message in messages]
    except (KeyError, TypeError) as error:
        raise ValueError(f"row {row.get('id')!r}: every message needs a role and a content") from error


def _render(
    tokenizer: Any, conversations: list[list[dict[str, str]]], *, generation_prompt: bool
) -> list[str]:
    if not conversations:
        return []
    rendered = tokenizer.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=generation_prompt
    )
    return [rendered] if isinstance(rendered, str) else list(rendered)


def assistant_char_spans(
    rows: Sequence[dict[str, Any]], tokenizer: Any, marker: str
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Rendered texts (cut after the last assistant end marker) and each row's assistant character spans."""
    conversations = [_messages_of(row) for row in rows]
    full_texts = _render(tokenizer, conversations, generation_prompt=False)
    # (row index, assistant turn index) for every assistant turn of the batch.
    turns = [
        (row_index, turn_index)
        for row_index, messages in enumerate(conversations)
        for turn_index, message in enumerate(messages)
        if message["role"] == "assistant"
    ]
    prompts = _render(tokenizer, [conversations[r][:t] for r, t in turns], generation_prompt=True)
    # Turns up to and including k; only rendered when k is not the conversation's last turn.
    inner_turns = [(r, t) for r, t in turns if t + 1 < len(conversations[r])]
    inner_rendered = dict(
        zip(
            inner_turns,
            _render(tokenizer, [conversations[r][: t + 1] for r, t in inner_turns], generation_prompt=False),
            strict=True,
        )
    )
    spans: list[list[tuple[int, int]]] = [[] for _ in rows]
    for (row_index, turn_index), prompt in zip(turns, prompts, strict=True):
        full = full_texts[row_index]
        row_id = rows[row_index].get("id")
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"row {row_id!r}: the template's rendering of turns [0, {turn_index}) with "
                "add_generation_prompt=True is not a prefix of the full conversation; prompt-prefix "
                "masking needs a template that renders earlier turns unchanged"
            )
        through_turn = inner_rendered.get((row_index, turn_index), full)
        if not full.startswith(through_turn):
            raise ChatTemplateError(
                f"row {row_id!r}: the rendering of turns [0, {turn_index}] is not a prefix of the full one"
            )
        end = through_turn.rfind(marker)
        if end < len(prompt):
            raise ChatTemplateError(f"row {row_id!r}: no {marker!r} after assistant turn {turn_index}")
        spans[row_index].append((len(prompt), end + len(marker)))
    # Cut after the final assistant end marker, but never drop a trailing non-assistant turn.
    texts = [
        full[: row_spans[-1][1]] if row_spans and messages[-1]["role"] == "assistant" else full
        for full, row_spans, messages in zip(full_texts, spans, conversations, strict=True)
    ]
    return texts, spans


def _encode(tokenizer: Any, texts: list[str]) -> list[Any]:
    """`tokenizers.Encoding`s of all texts from one call of the Rust tokenizer (parallel over the batch).

    The backend is called directly (no per-row conversion to Python dicts) unless a truncation or padding
    setting is left on it, in which case the transformers call resets those first.
    """
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return backend.encode_batch(texts, add_special_tokens=False)
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False).encodings


def _plain_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer when no truncation or padding is left on it (else None)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return backend
    return None


# Tokenizer components that never add, drop or rewrite the bytes of the text (only split it).
_SAME_BYTES_PRE_TOKENIZERS = {"Sequence", "Split", "ByteLevel", "Digits", "Punctuation"}
_NORMAL_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}


@dataclass(frozen=True)
class ByteSpans:
    """How many bytes of the text each token id stands for, for a byte-level BPE tokenizer.

    There the ids of a text are its UTF-8 bytes cut into runs, so the token holding character ``p`` is
    found by a search over the cumulative byte lengths: no offsets are needed from the encoder
    (``encode_batch_fast`` skips them, ~20% less encode CPU). Valid for texts the normalizer leaves
    unchanged (``normal_form``: None, or the Unicode normal form the texts must already be in).
    """

    token_bytes: np.ndarray  # int64 per token id
    normal_form: str | None

    def applies_to(self, text: str) -> bool:
        return self.normal_form is None or text.isascii() or unicodedata.is_normalized(self.normal_form, text)


_BYTE_SPANS: weakref.WeakKeyDictionary[Any, ByteSpans | None] = weakref.WeakKeyDictionary()


def _component(component: Any) -> dict[str, Any] | None:
    return None if component is None else json.loads(component.__getstate__())


def _nodes(config: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """A component and, for a Sequence, its members (``key``: where a Sequence keeps them)."""
    return [config, *(node for child in config.get(key, []) for node in _nodes(child, key))]


def byte_spans(tokenizer: Any) -> ByteSpans | None:
    """The byte lengths of the tokenizer's ids, when its tokens are exactly runs of the text's bytes
    (BPE with a ByteLevel pre-tokenizer that adds no prefix space, splitting pre-tokenizers only, a
    Unicode normal form or no normalizer, no offset-trimming post-processor, no added token that strips
    whitespace); None otherwise. Computed once per tokenizer."""
    try:
        return _BYTE_SPANS[tokenizer]
    except (KeyError, TypeError):
        pass
    result = _byte_spans(tokenizer)
    with contextlib.suppress(TypeError):  # not weak-referenceable: computed again next time
        _BYTE_SPANS[tokenizer] = result
    return result


def _byte_spans(tokenizer: Any) -> ByteSpans | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast") or type(backend.model).__name__ != "BPE":
        return None
    normalizer = _component(backend.normalizer)
    if normalizer is not None and normalizer.get("type") not in _NORMAL_FORMS:
        return None
    pre_tokenizers = _nodes(_component(backend.pre_tokenizer) or {}, "pretokenizers")
    byte_levels = [node for node in pre_tokenizers if node.get("type") == "ByteLevel"]
    if (
        not byte_levels
        or any(node.get("add_prefix_space") for node in byte_levels)
        or any(node.get("type") not in _SAME_BYTES_PRE_TOKENIZERS for node in pre_tokenizers)
        or any(node.get("behavior") == "Removed" for node in pre_tokenizers)
    ):
        return None
    post_processor = _component(backend.post_processor)
    for node in _nodes(post_processor or {}, "processors"):
        if node.get("trim_offsets") or node.get("type") not in (
            None,
            "Sequence",
            "ByteLevel",
            "TemplateProcessing",
        ):
            return None
    added = backend.get_added_tokens_decoder()
    if any(token.lstrip or token.rstrip for token in added.values()):
        return None
    # A byte-level vocabulary spells every byte as one character, so a token's length is its byte count.
    token_bytes = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        token_bytes[token_id] = len(token)
    for token_id, token in added.items():
        token_bytes[token_id] = len(token.content.encode("utf-8"))
    return ByteSpans(token_bytes=token_bytes, normal_form=normalizer["type"] if normalizer else None)


def _encode_chunk(tokenizer: Any, texts: list[str]) -> tuple[list[Any], bool]:
    """The chunk's encodings and whether they are without offsets (labels then come from byte lengths)."""
    backend = _plain_backend(tokenizer)
    spans = byte_spans(tokenizer)
    if backend is not None and spans is not None and all(spans.applies_to(text) for text in texts):
        return backend.encode_batch_fast(texts, add_special_tokens=False), True
    return _encode(tokenizer, texts), False


def _check_max_seq_len(max_seq_len: int) -> None:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")


def _chunk_token_arrays(
    rows: Sequence[dict[str, Any]],
    spans: list[list[tuple[int, int]]],
    encodings: list[Any],
    max_seq_len: int,
    out: tuple[list[np.ndarray], list[np.ndarray], list[bool]],
) -> None:
    """Append each row's input ids and labels (cut at ``max_seq_len``) and whether it was cut to ``out``."""
    for row, row_spans, encoding in zip(rows, spans, encodings, strict=True):
        ids = np.array(encoding.ids, dtype=np.int32)
        token_spans = []
        for start, end in row_spans:
            first = encoding.char_to_token(start)
            last = encoding.char_to_token(end - 1)
            if first is None or last is None:
                raise ChatTemplateError(f"row {row.get('id')!r}: assistant span has no tokens")
            token_spans.append((first, last))
        _append_row(ids, token_spans, max_seq_len, out)


def _append_row(
    ids: np.ndarray,
    token_spans: list[tuple[int, int]],
    max_seq_len: int,
    out: tuple[list[np.ndarray], list[np.ndarray], list[bool]],
) -> None:
    all_ids, all_labels, truncated = out
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for first, last in token_spans:
        labels[first : last + 1] = ids[first : last + 1]
    truncated.append(len(ids) > max_seq_len)
    # Slices of numpy arrays are views: cutting copies nothing.
    all_ids.append(ids[:max_seq_len])
    all_labels.append(labels[:max_seq_len])


def _byte_token_spans(
    text: str, ids: np.ndarray, row_spans: list[tuple[int, int]], token_bytes: np.ndarray
) -> list[tuple[int, int]] | None:
    """Each character span's (first, last) token, as ``char_to_token`` of its first and last character
    gives it: the first token holding that character's first byte. None when the ids' bytes do not add
    up to the text's (the caller then takes the offsets)."""
    ends = np.cumsum(token_bytes[ids])
    ascii_text = text.isascii()
    if (int(ends[-1]) if len(ends) else 0) != (len(text) if ascii_text else len(text.encode("utf-8"))):
        return None
    if not row_spans:
        return []
    chars = [position for start, end in row_spans for position in (start, end - 1)]
    positions = chars if ascii_text else [len(text[:char].encode("utf-8")) for char in chars]
    tokens = np.searchsorted(ends, positions, side="right").tolist()
    if max(tokens) >= len(ids):
        raise ChatTemplateError("assistant span has no tokens")
    return list(zip(tokens[::2], tokens[1::2], strict=True))


def _chunk_token_arrays_by_bytes(
    rows: Sequence[dict[str, Any]],
    texts: list[str],
    spans: list[list[tuple[int, int]]],
    encodings: list[Any],
    tokenizer: Any,
    max_seq_len: int,
    out: tuple[list[np.ndarray], list[np.ndarray], list[bool]],
) -> None:
    """`_chunk_token_arrays` for offset-free encodings (`ByteSpans`); a row whose bytes do not add up is
    encoded again with offsets."""
    token_bytes = byte_spans(tokenizer).token_bytes  # type: ignore[union-attr]
    for row, text, row_spans, encoding in zip(rows, texts, spans, encodings, strict=True):
        ids = np.array(encoding.ids, dtype=np.int32)
        try:
            token_spans = _byte_token_spans(text, ids, row_spans, token_bytes)
        except ChatTemplateError as error:
            raise ChatTemplateError(f"row {row.get('id')!r}: {error}") from None
        if token_spans is None:
            _chunk_token_arrays([row], [row_spans], _encode(tokenizer, [text]), max_seq_len, out)
        else:
            _append_row(ids, token_spans, max_seq_len, out)


TokenArrays = tuple[list[np.ndarray], list[np.ndarray], list[bool]]


def _token_arrays(rows: Sequence[dict[str, Any]], tokenizer: Any, max_seq_len: int) -> TokenArrays:
    """Per row: input ids and labels (int32 arrays, cut at ``max_seq_len``) and whether it was cut."""
    return next(_iter_token_arrays([rows], tokenizer, max_seq_len))


@dataclass
class _Batch:
    out: TokenArrays
    chunks_left: int


def _iter_token_arrays(
    batches: Iterable[Sequence[dict[str, Any]]], tokenizer: Any, max_seq_len: int
) -> Iterator[TokenArrays]:
    """`_token_arrays` of each batch, in order, with one encode pipeline over the whole stream.

    Chunk by chunk, the Rust encode (which releases the GIL) runs in a second thread while this one
    renders the next chunk and builds the previous chunk's labels: the Python work overlaps the encode
    instead of leaving cores idle. The next batch's first chunk is encoding while a finished batch is
    yielded (and its table built and written by the caller), so the encoder never waits at a batch
    boundary. At most two chunks of encodings are held at once.
    """
    marker: str | None = None
    waiting: deque[_Batch] = deque()  # batches not yet yielded, in input order
    pending: tuple[Future[tuple[list[Any], bool]], Sequence[dict[str, Any]], list[str], Spans, _Batch] | None
    pending = None

    def finish() -> None:
        assert pending is not None
        encoding, chunk_rows, texts, spans, batch = pending
        encodings, by_bytes = encoding.result()
        if by_bytes:
            _chunk_token_arrays_by_bytes(
                chunk_rows, texts, spans, encodings, tokenizer, max_seq_len, batch.out
            )
        else:
            _chunk_token_arrays(chunk_rows, spans, encodings, max_seq_len, batch.out)
        batch.chunks_left -= 1

    def finished() -> Iterator[TokenArrays]:
        while waiting and waiting[0].chunks_left == 0:
            yield waiting.popleft().out

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmft-encode") as encoder:
        for rows in batches:
            batch = _Batch(out=([], [], []), chunks_left=-(-len(rows) // ENCODE_CHUNK_ROWS))
            waiting.append(batch)
            for start in range(0, len(rows), ENCODE_CHUNK_ROWS):
                if marker is None:
                    _check_tokenizer(tokenizer)
                    marker = assistant_end_marker(tokenizer)
                chunk = rows[start : start + ENCODE_CHUNK_ROWS]
                texts, spans = assistant_char_spans(chunk, tokenizer, marker)
                encoding = encoder.submit(_encode_chunk, tokenizer, texts)
                if pending is not None:
                    finish()
                pending = (encoding, chunk, texts, spans, batch)
                yield from finished()
            yield from finished()
        if pending is not None:
            finish()
        yield from finished()


def _assistant_token_counts(all_labels: list[np.ndarray]) -> list[int]:
    return [int(np.count_nonzero(labels != IGNORE_INDEX)) for labels in all_labels]


def _count(
    counts: StageCounts | None,
    rows_in: int,
    lengths: Sequence[int],
    assistant_counts: Sequence[int],
    truncated: Sequence[bool],
) -> None:
    if counts is None:
        return
    counts.extra["tokens"] += int(sum(lengths))
    counts.extra["assistant_tokens"] += int(sum(assistant_counts))
    counts.extra["truncated"] += int(sum(truncated))
    counts.extra["no_assistant_tokens"] += sum(count == 0 for count in assistant_counts)
    counts.rows_in += rows_in
    counts.rows_out += len(lengths)


def tokenize_batch(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    max_seq_len: int,
    counts: StageCounts | None = None,
) -> list[dict[str, Any]]:
    """Tokenize conversations into TOKENIZED_SCHEMA rows with -100 on every non-assistant token.

    Labels cover each assistant turn's content and its end marker. Sequences longer than
    ``max_seq_len`` are cut and flagged ``truncated``. Raises ChatTemplateError when the template
    cannot be masked by prompt prefix, ValueError for malformed rows or a slow tokenizer.
    See `tokenize_to_table` for the same result as an Arrow table (no Python lists per token).
    """
    _check_max_seq_len(max_seq_len)
    if not rows:
        return []
    _check_tokenizer(tokenizer)
    all_ids, all_labels, truncated = _token_arrays(rows, tokenizer, max_seq_len)
    assistant_counts = _assistant_token_counts(all_labels)
    out: list[dict[str, Any]] = []
    for row, ids, labels, was_cut, assistant_count in zip(
        rows, all_ids, all_labels, truncated, assistant_counts, strict=True
    ):
        tokenized = {column: row.get(column) for column in CONVERSATION_COLUMNS}
        tokenized.update(
            input_ids=ids.tolist(),
            labels=labels.tolist(),
            num_tokens=len(ids),
            num_assistant_tokens=assistant_count,
            truncated=was_cut,
        )
        out.append(tokenized)
    _count(counts, len(rows), [len(ids) for ids in all_ids], assistant_counts, truncated)
    return out


def _list_column(arrays: list[np.ndarray]) -> pa.Array:
    """One ``list<int32>`` column from per-row int32 arrays: one concatenation, no Python ints."""
    lengths = np.fromiter((len(array) for array in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(
            f"{offsets[-1]} tokens in one batch overflow list<int32> offsets: use smaller batches"
        )
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int32()))


def _conversation_columns(rows: Sequence[dict[str, Any]] | pa.Table) -> list[pa.Array | pa.ChunkedArray]:
    if isinstance(rows, pa.Table):
        # Arrow input (e.g. a Parquet row group): the columns pass through without a round trip to Python.
        # A nullable column missing from an older table (e.g. source_format) comes back as nulls.
        return [
            rows.column(field.name).cast(field.type)
            if field.name in rows.column_names or not field.nullable
            else pa.nulls(rows.num_rows, field.type)
            for field in CONVERSATION_SCHEMA
        ]
    return [pa.array([row.get(field.name) for row in rows], type=field.type) for field in CONVERSATION_SCHEMA]


def tokenize_to_table(
    rows: list[dict[str, Any]] | pa.Table | pa.RecordBatch,
    tokenizer: Any,
    *,
    max_seq_len: int,
    counts: StageCounts | None = None,
) -> pa.Table:
    """`tokenize_batch` as an Arrow table in TOKENIZED_SCHEMA, built from numpy arrays.

    ``rows`` may be conversation dicts or an Arrow table/record batch with the conversation columns
    (only ``id`` and ``messages`` are converted to Python, for the chat template).
    """
    ((table, batch_counts),) = iter_token_tables([rows], tokenizer, max_seq_len=max_seq_len)
    if counts is not None:
        counts.merge(batch_counts)
    return table


def iter_token_tables(
    batches: Iterable[list[dict[str, Any]] | pa.Table | pa.RecordBatch], tokenizer: Any, *, max_seq_len: int
) -> Iterator[tuple[pa.Table, StageCounts]]:
    """`tokenize_to_table` of each batch with its counts, in order; one encode pipeline runs over the
    whole stream (see `_iter_token_arrays`), so the next batch is read and encoding while the caller
    writes this one. Consumes the input one batch ahead of what it yields."""
    _check_max_seq_len(max_seq_len)
    sources: deque[list[dict[str, Any]] | pa.Table] = deque()

    def python_rows() -> Iterator[Sequence[dict[str, Any]]]:
        for rows in batches:
            source = pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch) else rows
            sources.append(source)
            yield source.select(["id", "messages"]).to_pylist() if isinstance(source, pa.Table) else source

    for all_ids, all_labels, truncated in _iter_token_arrays(python_rows(), tokenizer, max_seq_len):
        source = sources.popleft()
        counts = StageCounts(stage=STAGE)
        if not all_ids:
            yield TOKENIZED_SCHEMA.empty_table(), counts
            continue
        assistant_counts = _assistant_token_counts(all_labels)
        lengths = [len(ids) for ids in all_ids]
        table = pa.Table.from_arrays(
            [
                *_conversation_columns(source),
                _list_column(all_ids),
                _list_column(all_labels),
                pa.array(lengths, type=pa.int32()),
                pa.array(assistant_counts, type=pa.int32()),
                pa.array(truncated, type=pa.bool_()),
            ],
            schema=TOKENIZED_SCHEMA,
        )
        _count(counts, len(all_ids), lengths, assistant_counts, truncated)
        yield table, counts


def _labelled_runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = None
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def verify_masks(rows: Sequence[dict[str, Any]], tokenizer: Any, *, max_problems: int = 50) -> list[str]:
    """Problems with tokenized rows' labels (empty list = all good).

    Checks, independently of how the labels were made: labels equal input_ids or -100; the decoded
    labelled runs are exactly the assistant turns' contents each followed by the end marker (a prefix of
    them when truncated); the sequence ends with the end marker unless truncated; counts agree.
    """
    marker = assistant_end_marker(tokenizer)
    problems: list[str] = []

    def problem(row: dict[str, Any], text: str) -> None:
        problems.append(f"row {row.get('id')!r}: {text}")

    for row in rows:
        if len(problems) >= max_problems:
            break
        input_ids = list(row["input_ids"])
        labels = list(row["labels"])
        if len(labels) != len(input_ids):
            problem(row, f"{len(labels)} labels for {len(input_ids)} input ids")
            continue
        if row.get("num_tokens") != len(input_ids):
            problem(row, f"num_tokens {row.get('num_tokens')} != {len(input_ids)} input ids")
        mismatched = [
            i for i, (token, label) in enumerate(zip(input_ids, labels, strict=True))
            if label != IGNORE_INDEX and label != token
        ]  # fmt: skip
        if mismatched:
            problem(row, f"labels differ from input_ids at positions {mismatched[:5]}")
            continue
        labelled = len(labels) - labels.count(IGNORE_INDEX)
        if row.get("num_assistant_tokens") != labelled:
            problem(row, f"num_assistant_tokens {row.get('num_assistant_tokens')} != {labelled} labelled")
        expected = [m["content"] + marker for m in row["messages"] if m["role"] == "assistant"]
        decoded = [
            tokenizer.decode(
                input_ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            for start, end in _labelled_runs(labels)
        ]
        truncated = bool(row.get("truncated"))
        if truncated:
            ok = len(decoded) <= len(expected) and all(
                got == want if i < len(decoded) - 1 else want.startswith(got)
                for i, (got, want) in enumerate(zip(decoded, expected, strict=False))
            )
        else:
            ok = decoded == expected
        if not ok:
            shown = [text[:80] for text in decoded]
            problem(row, f"labelled spans {shown} do not match the assistant turns (+{marker!r})")
        if not truncated:
            tail = tokenizer.decode(
                input_ids[-8:], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if not tail.endswith(marker):
                problem(row, f"sequence does not end with {marker!r}")
    return problems
